// Engine unit tests: graphs built by hand, compiled and run on tensors, every
// value checked against ATen computing the same thing directly. No Python.
#include <limits>
#include <fastinterleave/compiler.h>
#include <fastinterleave/scheduler.h>
#include <fastinterleave/serialize.h>

#include <ATen/ATen.h>

#include <functional>
#include <iostream>
#include <string>
#include <vector>

using namespace fastinterleave;
using c10::IValue;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::cerr << "FAILED: " << what << "\n";
    ++failures;
  }
}

void expect_close(const at::Tensor& a, const at::Tensor& b, const std::string& what) {
  expect(a.sizes() == b.sizes() && at::allclose(a, b), what);
}

template <typename E>
bool throws(const std::function<void()>& fn, std::string* message = nullptr) {
  try {
    fn();
  } catch (const E& e) {
    if (message) *message = e.what();
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

Node site(int32_t s, int32_t invoker = 0, int32_t iteration = 0) {
  Node n;
  n.op = Op::Site;
  n.site = s;
  n.invoker = invoker;
  n.iteration = iteration;
  return n;
}

Node call(const std::string& name, std::vector<Arg> args, bool saved = false) {
  Node n;
  n.op = Op::Call;
  n.name = name;
  n.args = std::move(args);
  n.saved = saved;
  return n;
}

// The plan's index of a site (plans list only requested sites, in first-use order).
int32_t plan_site(const Plan& plan, const std::string& module) {
  for (size_t i = 0; i < plan.sites.size(); ++i) {
    if (plan.sites[i].key.module == module) return static_cast<int32_t>(i);
  }
  throw std::runtime_error("no site " + module);
}

Arg ref(int32_t i) { return Arg::make_ref(i); }
Arg c(IValue v) { return Arg::make_const(std::move(v)); }
Arg slice_all() { return Arg::make_seq(Arg::Kind::Slice, {c(IValue()), c(IValue()), c(IValue())}); }

std::shared_ptr<Graph> two_sites() {
  auto g = std::make_shared<Graph>();
  g->sites = {SiteKey{"l1", HookKind::Output}, SiteKey{"l2", HookKind::Output}};
  g->batch_size = 1;
  g->invokers = {InvokerSlice{0, 1}};
  return g;
}

void test_save_and_op() {
  auto g = two_sites();
  g->nodes.push_back(site(0));
  g->nodes.push_back(call("mul", {ref(0), c(IValue(2.0))}, true));
  g->nodes.push_back(call("sum", {ref(1), c(IValue(1))}, true));  // int for int[1]
  Run run(compile(g), {});
  run.begin();
  at::Tensor h = at::arange(6, at::kFloat).reshape({2, 3});
  IValue v(h);
  expect(!run.fire(0, v), "no swap reported");
  run.end();
  std::string msg;
  expect(throws<std::out_of_range>([&] { run.fire(1, v); }, &msg), "firing a site the plan lacks is an error");
  expect_close(run.value(1).toTensor(), h * 2, "mul by a double scalar");
  expect_close(run.value(2).toTensor(), (h * 2).sum(1), "sum(dim) with an int for int[1]");
  expect(!run.has_value(0), "unsaved site value freed after its last use");
}

void test_inplace_edit_lands() {
  auto g = two_sites();
  g->nodes.push_back(site(0));
  Node set;
  set.op = Op::SetItem;
  set.args = {ref(0), Arg::make_seq(Arg::Kind::Tuple, {slice_all(), c(IValue(int64_t{1}))}), c(IValue(0.0))};
  g->nodes.push_back(set);
  Run run(compile(g), {});
  run.begin();
  at::Tensor h = at::ones({2, 3});
  IValue v(h);
  run.fire(0, v);
  at::Tensor expected = at::ones({2, 3});
  expected.select(1, 1).zero_();
  expect_close(h, expected, "setitem writes into the module's tensor");
}

void test_swap_and_read_after() {
  auto g = two_sites();
  g->nodes.push_back(site(0));                                        // 0: l1.output
  g->nodes.push_back(call("mul", {ref(0), c(IValue(int64_t{3}))}));   // 1
  Node swap;
  swap.op = Op::Swap;
  swap.args = {ref(0), ref(1)};
  g->nodes.push_back(swap);                                           // 2: l1.output = l1.output * 3
  Node again = site(0);
  again.saved = true;
  g->nodes.push_back(again);                                          // 3: l1.output (new read)
  Run run(compile(g), {});
  run.begin();
  at::Tensor h = at::full({1, 2}, 2.0);
  IValue v(h);
  expect(run.fire(0, v), "swap reported");
  expect_close(v.toTensor(), h * 3, "hook value replaced");
  expect_close(run.value(3).toTensor(), h * 3, "a read after the swap sees it");
  expect_close(h, at::full({1, 2}, 2.0), "the original tensor is untouched");
}

void test_out_of_order_and_ineffective_edit() {
  // b = l2.output.save(); l1.output[:, 0] = 0   -> the edit lands (runs at l1)
  {
    auto g = two_sites();
    Node b = site(1);
    b.saved = true;
    g->nodes.push_back(b);
    g->nodes.push_back(site(0));
    Node set;
    set.op = Op::SetItem;
    set.args = {ref(1), Arg::make_seq(Arg::Kind::Tuple, {slice_all(), c(IValue(int64_t{0}))}), c(IValue(int64_t{0}))};
    g->nodes.push_back(set);
    auto plan = compile(g);
    Run run(plan, {});
    run.begin();
    at::Tensor h = at::ones({1, 2});
    IValue v(h);
    run.fire(plan_site(*plan, "l1"), v);
    expect(h[0][0].item<float>() == 0.f, "out-of-order edit lands at l1");
  }
  // a = l1.output; b = l2.output; a[:, 0] = 0   -> would run after l1 is used: error
  {
    auto g = two_sites();
    g->nodes.push_back(site(0));
    g->nodes.push_back(site(1));
    Node set;
    set.op = Op::SetItem;
    set.args = {ref(0), Arg::make_seq(Arg::Kind::Tuple, {slice_all(), c(IValue(int64_t{0}))}), c(IValue(int64_t{0}))};
    g->nodes.push_back(set);
    auto plan = compile(g);
    Run run(plan, {});
    run.begin();
    IValue v1(at::ones({1, 2}));
    run.fire(plan_site(*plan, "l1"), v1);
    IValue v2(at::ones({1, 2}));
    std::string msg;
    bool raised = throws<NodeError>([&] { run.fire(plan_site(*plan, "l2"), v2); }, &msg);
    expect(raised, "an edit after its module ran raises");
    expect(msg.find("l1 output") != std::string::npos, "the message names the edited site: " + msg);
  }
}

// Invoke 0 reads l1 and then l2; invoke 1 writes into its l1 a value computed
// from invoke 0's l1. The walk after invoke 0's l1 stops at its l2 read, before
// the computation; invoke 1's edit needs it while l1 fires: it runs on demand.
void test_on_demand_values() {
  auto g = two_sites();
  g->batch_size = 2;
  g->invokers = {InvokerSlice{0, 1}, InvokerSlice{1, 1}};
  g->nodes.push_back(site(0, 0));                                           // 0: h (clean l1)
  g->nodes.push_back(site(1, 0));                                           // 1: clean l2
  Node pick;
  pick.op = Op::GetItem;
  pick.args = {ref(0), Arg::make_seq(Arg::Kind::Tuple, {slice_all(), c(IValue(int64_t{0}))})};
  pick.invoker = 1;
  g->nodes.push_back(pick);                                                 // 2: h[:, 0]
  Node scaled = call("mul", {ref(2), c(IValue(10.0))});
  scaled.invoker = 1;
  g->nodes.push_back(scaled);                                               // 3: h[:, 0] * 10
  g->nodes.push_back(site(0, 1));                                           // 4: corrupted l1
  Node set;
  set.op = Op::SetItem;
  set.args = {ref(4), Arg::make_seq(Arg::Kind::Tuple, {slice_all(), c(IValue(int64_t{0}))}), ref(3)};
  set.invoker = 1;
  g->nodes.push_back(set);                                                  // 5: l1[:, 0] = ...
  auto plan = compile(g);
  Run run(plan, {});
  run.begin();
  at::Tensor h = at::arange(6, at::kFloat).reshape({2, 3}) + 1;
  const at::Tensor before = h.clone();
  IValue v(h);
  run.fire(plan_site(*plan, "l1"), v);
  expect(h[1][0].item<float>() == before[0][0].item<float>() * 10, "the patch computed on demand landed in row 1");
  expect_close(h[0], before[0], "row 0 is untouched");
  expect_close(h[1].slice(0, 1), before[1].slice(0, 1), "only column 0 of row 1 is written");
  IValue v2(at::ones({2, 2}));
  run.fire(plan_site(*plan, "l2"), v2);
  run.end();
}

void test_never_fired() {
  auto g = two_sites();
  Node n = site(1, 0, 2);  // third call of l2
  n.saved = true;
  g->nodes.push_back(n);
  auto plan = compile(g);
  Run run(plan, {});
  run.begin();
  IValue v(at::ones({1}));
  run.fire(plan_site(*plan, "l2"), v);  // calls 0 and 1: nothing requested
  run.fire(plan_site(*plan, "l2"), v);
  std::string msg;
  expect(throws<NodeError>([&] { run.end(); }, &msg), "a request that never fired raises at the end");
  expect(msg.find("'l2'") != std::string::npos && msg.find("called only 2 times") != std::string::npos, "message: " + msg);
}

void test_batch_slices() {
  auto g = two_sites();
  g->batch_size = 3;
  g->invokers = {InvokerSlice{0, 1}, InvokerSlice{1, 2}};
  Node a = site(0, 0);
  a.saved = true;
  g->nodes.push_back(a);  // 0: invoker 0's rows
  Node b = site(0, 1);
  b.saved = true;
  g->nodes.push_back(b);  // 1: invoker 1's rows
  Node swap;
  swap.op = Op::Swap;
  swap.invoker = 1;
  // Swapping a tuple output: a tuple of the same structure.
  swap.args = {ref(1), Arg::make_seq(Arg::Kind::Tuple, {c(IValue(at::zeros({2, 4}))), c(IValue(at::full({5}, 7.0)))})};
  g->nodes.push_back(swap);
  Run run(compile(g), {});
  run.begin();
  at::Tensor h = at::arange(12, at::kFloat).reshape({3, 4});
  at::Tensor before = h.clone();
  // A tuple output: (batched tensor, a tensor that is not batch-sized).
  at::Tensor side = at::ones({5});
  IValue v(c10::ivalue::Tuple::create({IValue(h), IValue(side)}));
  expect(run.fire(0, v), "swap reported");
  const auto& out = v.toTupleRef().elements();
  expect_close(out[0].toTensor().narrow(0, 0, 1), before.narrow(0, 0, 1), "invoker 0 rows untouched");
  expect_close(out[0].toTensor().narrow(0, 1, 2), at::zeros({2, 4}), "invoker 1 rows swapped");
  expect_close(out[1].toTensor(), at::full({5}, 7.0), "a leaf that is not batch-sized is replaced whole");
  const auto& s0 = run.value(0).toTupleRef().elements();
  expect_close(s0[0].toTensor(), before.narrow(0, 0, 1), "invoker 0 sees its row");
  const auto& s1 = run.value(1).toTupleRef().elements();
  expect_close(s1[0].toTensor(), before.narrow(0, 1, 2), "a value read before the swap keeps its content");
  expect_close(h, before, "the module's tensor is not written in place by a swap");
}

void test_invoker_ranges_are_checked_without_overflow() {
  // start + size would wrap around past INT64_MAX: still outside the batch.
  auto g = two_sites();
  g->batch_size = 4;
  g->invokers = {InvokerSlice{2, std::numeric_limits<int64_t>::max()}};
  expect(throws<std::invalid_argument>([&] { g->validate(); }), "a huge invoker size is refused");
  g->invokers = {InvokerSlice{std::numeric_limits<int64_t>::max(), 1}};
  expect(throws<std::invalid_argument>([&] { g->validate(); }), "a huge invoker start is refused");
  g->invokers = {InvokerSlice{1, 3}};
  expect(!throws<std::invalid_argument>([&] { g->validate(); }), "rows 1..3 of 4 are accepted");
  g->invokers = {InvokerSlice{4, 0}};
  expect(!throws<std::invalid_argument>([&] { g->validate(); }), "an empty slice at the end is accepted");
}

void test_serialize_roundtrip_and_hostile_files() {
  auto g = two_sites();
  g->lines = {"model.py:3"};
  g->nodes.push_back(site(0));
  Node n = call("add", {ref(0), c(IValue(at::full({1, 2}, 5.0)))}, true);
  n.line = 0;
  g->nodes.push_back(n);
  std::string bytes = serialize_graph(*g);
  auto g2 = std::make_shared<Graph>(deserialize_graph(bytes));
  expect(g2->nodes.size() == 2 && g2->nodes[1].name == "add" && g2->nodes[1].saved, "roundtrip keeps nodes");
  Run run(compile(g2), {});
  run.begin();
  IValue v(at::ones({1, 2}));
  run.fire(0, v);
  expect_close(run.value(1).toTensor(), at::full({1, 2}, 6.0), "a loaded graph runs");

  // Every truncation is an error, never a crash.
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    expect(throws<std::invalid_argument>([&] { deserialize_graph(bytes.substr(0, cut)); }),
           "truncated at " + std::to_string(cut));
  }
  std::string wrong_version = bytes;
  wrong_version[8] = 9;
  std::string msg;
  expect(throws<std::invalid_argument>([&] { deserialize_graph(wrong_version); }, &msg) &&
             msg.find("version") != std::string::npos,
         "wrong version named: " + msg);
  // A reference to a later node (a cycle) is rejected.
  auto cyc = two_sites();
  cyc->nodes.push_back(call("neg", {ref(1)}));
  cyc->nodes.push_back(call("neg", {ref(0)}));
  expect(throws<std::invalid_argument>([&] { compile(cyc); }), "forward reference rejected");
  // Flipping any single byte gives a graph or an error, never a crash.
  for (size_t i = 8; i < bytes.size(); ++i) {
    std::string mutated = bytes;
    mutated[i] = static_cast<char>(mutated[i] ^ 0x5a);
    try {
      auto mg = std::make_shared<Graph>(deserialize_graph(mutated));
      compile(mg);
    } catch (const std::invalid_argument&) {
    }
  }
}

}  // namespace

// Invokes write their rows of one site (writes into disjoint rows join into
// one; a second write into the same rows waits for the first), and a read of
// rows written just before comes between: all see what the writes done in
// recording order give.
void test_joined_row_writes() {
  auto g = two_sites();
  g->batch_size = 5;
  g->invokers = {InvokerSlice{0, 1}, InvokerSlice{1, 2}, InvokerSlice{3, 1}, InvokerSlice{4, 1}};
  auto setitem = [](int32_t target, Arg index, Arg item, int32_t invoker) {
    Node n;
    n.op = Op::SetItem;
    n.args = {ref(target), std::move(index), std::move(item)};
    n.invoker = invoker;
    return n;
  };
  auto col = [](int64_t j) { return Arg::make_seq(Arg::Kind::Tuple, {slice_all(), c(IValue(j))}); };
  g->nodes.push_back(site(0, 0));                                                     // 0
  g->nodes.push_back(setitem(0, col(0), c(IValue(-1.0)), 0));                         // 1
  g->nodes.push_back(site(0, 1));                                                     // 2
  g->nodes.push_back(setitem(2, col(1), c(IValue(at::tensor({5.0, 6.0}))), 1));             // 3
  g->nodes.push_back(site(0, 2));                                                     // 4
  g->nodes.push_back(setitem(4, Arg::make_seq(Arg::Kind::Tuple, {c(IValue(int64_t{0})), c(IValue(int64_t{2}))}),
                             c(IValue(int64_t{9})), 2));                              // 5: h[0, 2] = 9
  g->nodes.push_back(setitem(4, col(2), c(IValue(8.0)), 2));                          // 6: same place, later
  g->nodes.push_back(site(0, 3));                                                     // 7
  Node sum = call("sum", {ref(4)}, true);                                             // 8: invoke 2's rows
  sum.invoker = 3;
  g->nodes.push_back(sum);
  g->nodes.push_back(setitem(7, col(3), c(IValue(0.5)), 3));                          // 9
  Run run(compile(g), {});
  run.begin();
  at::Tensor h = at::arange(20, at::kFloat).reshape({5, 4});
  at::Tensor want = h.clone();
  IValue v(h);
  run.fire(0, v);
  run.end();
  want.narrow(0, 0, 1).select(1, 0).fill_(-1.0);
  want.narrow(0, 1, 2).select(1, 1).copy_(at::tensor({5.0, 6.0}));
  want.narrow(0, 3, 1).select(1, 2).fill_(8.0);
  at::Tensor sum_want = want.narrow(0, 3, 1).sum();
  want.narrow(0, 4, 1).select(1, 3).fill_(0.5);
  expect_close(h, want, "joined row writes land as the writes done in order");
  expect_close(run.value(8).toTensor(), sum_want, "a read between writes sees the writes before it");
}

int main() {
  test_save_and_op();
  test_inplace_edit_lands();
  test_swap_and_read_after();
  test_out_of_order_and_ineffective_edit();
  test_on_demand_values();
  test_never_fired();
  test_batch_slices();
  test_joined_row_writes();
  test_invoker_ranges_are_checked_without_overflow();
  test_serialize_roundtrip_and_hostile_files();
  if (failures) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "engine tests passed\n";
  return 0;
}
