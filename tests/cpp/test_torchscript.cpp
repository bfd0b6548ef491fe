// The TorchScript embedding (fastinterleave/torchscript.h), with no Python.
//
//   test_torchscript
//       unit tests on TorchScript modules defined here, every value checked
//       against ATen computing the same thing by hand;
//   test_torchscript run MODEL PREFIX GRAPH INPUTS OUT
//       runs a graph file in a saved TorchScript model (driven by
//       tests/test_torchscript.py): INPUTS holds tensors "input.0", "input.1",
//       ...; OUT gets "output" and "saved.<name>" ("<key>.<i>" for the i-th
//       tensor of a value holding several);
//   test_torchscript load FILE...
//       loads each graph file, printing "FILE: ok" or "FILE: error: <why>"
//       (hostile files from tests/test_torchscript.py: errors, never a crash).
#include <fastinterleave/scheduler.h>
#include <fastinterleave/torchscript.h>

#include <torch/script.h>

#include <atomic>
#include <functional>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

using namespace fastinterleave;
using c10::IValue;
using torch::jit::Module;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::cerr << "FAILED: " << what << "\n";
    ++failures;
  }
}

void expect_close(const at::Tensor& a, const at::Tensor& b, const std::string& what) {
  expect(a.defined() && a.sizes() == b.sizes() && at::allclose(a, b), what);
}

// The message of the exception `fn` throws ("" if none).
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// -- models ------------------------------------------------------------------------------

// Net: a = Scale(2), b = a copy of a (same TorchScript class) scaled by 3,
// pair = Pair (a tuple output), unused = never called.
//   forward(x) = pair(b(a(x)))[0] + pair(...)[1] = (6x + 1) + 12x = 18x + 1
Module make_net() {
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  Module a("Scale", cu, true);
  a.register_parameter("w", at::full({4}, 2.0), false);
  a.define("def forward(self, x):\n  return x * self.w\n");
  Module b = a.deepcopy();
  b.setattr("w", at::full({4}, 3.0));
  Module pair("Pair", cu, true);
  pair.define("def forward(self, x):\n  return (x + 1.0, x * 2.0)\n");
  Module unused("Unused", cu, true);
  unused.define("def forward(self, x):\n  return x\n");
  Module net("Net", cu, true);
  net.register_module("a", a);
  net.register_module("b", b);
  net.register_module("pair", pair);
  net.register_module("unused", unused);
  net.define(R"(
def forward(self, x):
    h = self.a.forward(x)
    h = self.b.forward(h)
    p = self.pair.forward(h)
    return p[0] + p[1]
)");
  net.eval();
  return net;
}

// Outer holds a Net as `inner` (a wrapper, like a traced HF model's).
Module make_outer() {
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  Module outer("Outer", cu, true);
  outer.register_module("inner", make_net());
  outer.define("def forward(self, x):\n  return self.inner.forward(x) - 1.0\n");
  return outer;
}

at::Tensor net_ref(const at::Tensor& x) { return x * 18 + 1; }

// -- graphs ------------------------------------------------------------------------------

struct G {
  GraphFile file;
  Graph& g = file.graph;
  G(std::vector<SiteKey> sites, int64_t batch = 2) {
    g.sites = std::move(sites);
    g.batch_size = batch;
    g.invokers = {InvokerSlice{0, batch}};
  }
  int32_t add(Node n, const std::string& name = "") {
    if (!name.empty()) {
      n.saved = true;
      file.names.emplace_back(name, static_cast<int32_t>(g.nodes.size()));
    }
    g.nodes.push_back(std::move(n));
    return static_cast<int32_t>(g.nodes.size() - 1);
  }
  std::shared_ptr<const Intervention> make() const { return std::make_shared<const Intervention>(file); }
};

SiteKey out(const std::string& m) { return SiteKey{m, HookKind::Output}; }
SiteKey in(const std::string& m) { return SiteKey{m, HookKind::Input}; }
Arg ref(int32_t i) { return Arg::make_ref(i); }
Arg c(IValue v) { return Arg::make_const(std::move(v)); }
Arg col(int64_t j) {
  Arg all = Arg::make_seq(Arg::Kind::Slice, {c(IValue()), c(IValue()), c(IValue())});
  return Arg::make_seq(Arg::Kind::Tuple, {all, c(IValue(j))});
}

Node site(int32_t s, int32_t invoker = 0, Projection p = Projection::Whole) {
  Node n;
  n.op = Op::Site;
  n.site = s;
  n.invoker = invoker;
  n.projection = p;
  return n;
}
Node op(Op o, std::vector<Arg> args, int32_t invoker = 0, const std::string& name = "") {
  Node n;
  n.op = o;
  n.args = std::move(args);
  n.invoker = invoker;
  n.name = name;
  return n;
}
Node call(const std::string& name, std::vector<Arg> args, int32_t invoker = 0) { return op(Op::Call, std::move(args), invoker, name); }

ValueStructure tensor_structure(int32_t ndim) {
  ValueStructure s;
  s.kind = ValueStructure::Kind::Tensor;
  s.ndim = ndim;
  return s;
}
ValueStructure tuple_structure(std::vector<ValueStructure> items) {
  ValueStructure s;
  s.kind = ValueStructure::Kind::Tuple;
  s.items = std::move(items);
  return s;
}

at::Tensor input(int64_t rows = 2) { return at::arange(rows * 4, at::kFloat).reshape({rows, 4}) / 10; }

// -- tests -------------------------------------------------------------------------------

// Two instances of one TorchScript class: only the requested one is changed.
void test_instances_of_one_class_save_and_swap() {
  G t({out("a"), out("b")});
  t.add(site(0), "a");
  int32_t b = t.add(site(1));
  int32_t b10 = t.add(call("mul", {ref(b), c(IValue(10.0))}));
  t.add(op(Op::Swap, {ref(b), ref(b10)}));
  t.add(site(1), "b_after");
  auto iv = t.make();
  Module net = make_net();
  ScriptModel model(net);
  at::Tensor x = input();
  for (int i = 0; i < 4; ++i) {  // past the profiling runs: the optimized code taps too
    Result r = model.run(*iv, {x});
    expect_close(r.tensor("a"), x * 2, "a's output saved (run " + std::to_string(i) + ")");
    expect_close(r.tensor("b_after"), x * 60, "b's swapped output read after the swap");
    expect_close(r.output.toTensor(), x * 180 + 1, "the swap of b (not of a, same class) changes the output");
  }
  expect_close(model.forward({x}).toTensor(), net_ref(x), "no intervention: the model as it was");
  expect_close(net.forward({x}).toTensor(), net_ref(x), "the module passed in is left as it was");
}

// A tuple output edited in place through output[0].
void test_tuple_output_inplace_edit() {
  G t({out("pair")});
  int32_t p = t.add(site(0), "pair");
  int32_t p0 = t.add(op(Op::GetItem, {ref(p), c(IValue(int64_t{0}))}));
  t.add(op(Op::SetItem, {ref(p0), col(0), c(IValue(0.0))}));
  auto iv = t.make();
  ScriptModel model(make_net());
  at::Tensor x = input();
  Result r = model.run(*iv, {x});
  at::Tensor first = x * 6 + 1;
  first.select(1, 0).zero_();
  const auto& saved = r.at("pair").toTupleRef().elements();
  expect(saved.size() == 2, "the saved output is the tuple");
  expect_close(saved[0].toTensor(), first, "output[0] edited in place");
  expect_close(r.output.toTensor(), first + x * 12, "the edit reaches the model's output");
}

// torch.jit.trace flattens a submodule's output tuple: the recorded structure
// gives the graph the value as Python saw it.
void test_flattened_output_gets_its_python_structure() {
  G t({out("b")});
  t.file.structures = {tuple_structure({tensor_structure(2)})};  // Python: (tensor,)
  int32_t b = t.add(site(0));
  int32_t b0 = t.add(op(Op::GetItem, {ref(b), c(IValue(int64_t{0}))}), "b0");
  int32_t zero = t.add(call("mul", {ref(b0), c(IValue(0.0))}));
  t.add(op(Op::Swap, {ref(b), Arg::make_seq(Arg::Kind::Tuple, {ref(zero)})}));
  auto iv = t.make();
  ScriptModel model(make_net());
  at::Tensor x = input();
  Result r = model.run(*iv, {x});
  expect_close(r.tensor("b0"), x * 6, "output[0] is the whole tensor, not its first row");
  expect_close(r.output.toTensor(), at::ones_like(x), "a swap with a 1-tuple gives TorchScript the tensor");

  G more({out("b")});
  more.file.structures = {tuple_structure({tensor_structure(2), tuple_structure({tensor_structure(4), tensor_structure(4)})})};
  more.add(site(0), "b");
  std::string msg = error_of([&] { ScriptModel(make_net()).run(*more.make(), {x}); });
  expect(contains(msg, "holds 3 tensors in Python but 1"), "a pruned output is an error: " + msg);

  G rank({out("b")});
  rank.file.structures = {tensor_structure(3)};
  rank.add(site(0), "b");
  msg = error_of([&] { ScriptModel(make_net()).run(*rank.make(), {x}); });
  expect(contains(msg, "dimensions"), "a tensor of another rank is an error: " + msg);
}

// Input sites (.input) and the root module's sites.
void test_inputs_and_root() {
  G t({in("a"), out(""), in("")});
  int32_t root_in = t.add(site(2, 0, Projection::FirstArg));
  int32_t plus = t.add(call("add", {ref(root_in), c(IValue(1.0))}));
  t.add(op(Op::Swap, {ref(root_in), ref(plus)}));
  int32_t a_in = t.add(site(0, 0, Projection::FirstArg), "a_in");
  int32_t twice = t.add(call("mul", {ref(a_in), c(IValue(2.0))}));
  t.add(op(Op::Swap, {ref(a_in), ref(twice)}));
  t.add(site(1), "out");
  auto iv = t.make();
  ScriptModel model(make_net());
  at::Tensor x = input();
  Result r = model.run(*iv, {x});
  expect_close(r.tensor("a_in"), x + 1, "a's input is the swapped model input");
  expect_close(r.output.toTensor(), (x + 1) * 36 + 1, "a's input doubled");
  expect_close(r.tensor("out"), r.output.toTensor(), "the root output saved");
  expect_close(x, input(), "the caller's input tensor is not written");
}

// Paths relative to a submodule (a wrapper around the recorded model).
void test_prefix() {
  G t({out("b"), out("")});
  t.add(site(0), "b");
  int32_t root = t.add(site(1), "inner_out");
  int32_t zero = t.add(call("mul", {ref(root), c(IValue(0.0))}));
  t.add(op(Op::Swap, {ref(root), ref(zero)}));
  auto iv = t.make();
  ScriptModel model(make_outer(), "inner");
  at::Tensor x = input();
  Result r = model.run(*iv, {x});
  expect_close(r.tensor("b"), x * 6, "inner.b read");
  expect_close(r.tensor("inner_out"), net_ref(x), "\"\" is the prefix module");
  expect_close(r.output.toTensor(), at::full_like(x, -1.0), "its output swapped");
  std::string msg = error_of([&] { ScriptModel(make_outer(), "nope"); });
  expect(contains(msg, "no submodule 'nope'"), "a missing prefix is an error: " + msg);
}

// Several invokes: each sees and changes its own rows.
void test_several_invokes() {
  G t({out("b")}, 3);
  t.g.invokers = {InvokerSlice{0, 1}, InvokerSlice{1, 2}};
  t.add(site(0, 0), "b0");
  int32_t b1 = t.add(site(0, 1));
  int32_t zero = t.add(call("mul", {ref(b1), c(IValue(0.0))}, 1), "zero1");
  t.add(op(Op::Swap, {ref(b1), ref(zero)}, 1));
  auto iv = t.make();
  ScriptModel model(make_net());
  at::Tensor x = input(3);
  Result r = model.run(*iv, {x});
  expect_close(r.tensor("b0"), x.narrow(0, 0, 1) * 6, "invoke 0 sees its row");
  expect(r.tensor("zero1").size(0) == 2, "invoke 1 sees its two rows");
  at::Tensor want = net_ref(x);
  want.narrow(0, 1, 2).fill_(1.0);
  expect_close(r.output.toTensor(), want, "invoke 1's rows swapped, invoke 0's kept");
  std::string msg = error_of([&] { model.run(*iv, {input(2)}); });
  expect(contains(msg, "batch of 3 rows"), "a batch of another size is an error: " + msg);
}

void test_stop_and_errors() {
  ScriptModel model(make_net());
  at::Tensor x = input();
  {
    G t({out("a"), out("b")});
    t.add(site(0), "a");
    t.add(op(Op::Stop, {}));
    t.add(site(1), "b");
    Result r = model.run(*t.make(), {x});
    expect(r.stopped && r.output.isNone(), "stop() ends the run");
    expect(r.has("a") && !r.has("b"), "values saved before stop() are kept");
    expect(contains(error_of([&] { r.at("b"); }), "stop()"), "reading a value stop() skipped says so");
  }
  {
    G t({out("a")});
    int32_t a = t.add(site(0));
    t.add(call("matmul", {ref(a), c(IValue(at::ones({7, 7})))}));
    bool node_error = false;
    try {
      model.run(*t.make(), {x});
    } catch (const NodeError& e) {
      node_error = e.kind == NodeError::Kind::Failed && e.node == 1;
    } catch (...) {
    }
    expect(node_error, "a failing node raises the engine's NodeError through the TorchScript interpreter");
    expect_close(model.forward({x}).toTensor(), net_ref(x), "after a failed run the model runs as before");
  }
  {
    G t({out("nope")});
    t.add(site(0), "x");
    std::string msg = error_of([&] { model.attach(*t.make()); });
    expect(contains(msg, "no submodule 'nope'"), "a missing module is named: " + msg);
    G u({out("unused")});
    u.add(site(0), "x");
    msg = error_of([&] { model.attach(*u.make()); });
    expect(contains(msg, "never calls module 'unused'"), "a module the code never calls is named: " + msg);
    // The model still runs what it ran before.
    G a({out("a")});
    a.add(site(0), "a");
    expect_close(model.run(*a.make(), {x}).tensor("a"), x * 2, "attach failures leave the model usable");
  }
  {
    G t({out("b")});
    int32_t b = t.add(site(0));
    t.add(op(Op::Swap, {ref(b), c(IValue(int64_t{3}))}));
    std::string msg = error_of([&] { model.run(*t.make(), {x}); });
    expect(contains(msg, "gives 0 tensors where the TorchScript model passes 1"), "a swap of another structure: " + msg);
  }
}

// One model, interventions switched between runs (the code is rewritten once per new site).
void test_switching_interventions() {
  G s({out("a")});
  s.add(site(0), "a");
  auto save_a = s.make();
  G t({out("pair")});
  int32_t p = t.add(site(0));
  int32_t p1 = t.add(op(Op::GetItem, {ref(p), c(IValue(int64_t{1}))}));
  t.add(op(Op::SetItem, {ref(p1), col(1), c(IValue(0.0))}));
  auto edit = t.make();
  ScriptModel model(make_net());
  at::Tensor x = input();
  for (int i = 0; i < 3; ++i) {
    expect_close(model.run(*save_a, {x}).tensor("a"), x * 2, "first intervention");
    at::Tensor want = net_ref(x);
    want.select(1, 1).copy_(x.select(1, 1) * 6 + 1);
    expect_close(model.run(*edit, {x}).output.toTensor(), want, "second intervention");
    expect_close(model.forward({x}).toTensor(), net_ref(x), "none");
  }
}

// Several threads run one model at once, each with its own intervention.
void test_threads() {
  G s({out("a")});
  s.add(site(0), "a");
  auto save_a = s.make();
  G t({out("b")});
  int32_t b = t.add(site(0));
  int32_t zero = t.add(call("mul", {ref(b), c(IValue(0.0))}));
  t.add(op(Op::Swap, {ref(b), ref(zero)}));
  auto zero_b = t.make();
  ScriptModel model(make_net());
  model.attach(*save_a);
  model.attach(*zero_b);
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      torch::NoGradGuard no_grad;
      try {
        for (int i = 0; i < 25; ++i) {
          at::Tensor x = input() + k;
          if (k % 2) {
            if (!at::allclose(model.run(*zero_b, {x}).output.toTensor(), at::ones_like(x))) ++wrong;
          } else {
            Result r = model.run(*save_a, {x});
            if (!at::allclose(r.tensor("a"), x * 2) || !at::allclose(r.output.toTensor(), net_ref(x))) ++wrong;
          }
          if (!at::allclose(model.forward({x}).toTensor(), net_ref(x))) ++wrong;
        }
      } catch (...) {
        ++wrong;
      }
    });
  }
  for (auto& th : threads) th.join();
  expect(wrong == 0, "concurrent runs each see their own intervention only");
}

void test_file_roundtrip() {
  G t({out("b")});
  t.file.structures = {tuple_structure({tensor_structure(2)})};
  int32_t b = t.add(site(0));
  t.add(op(Op::GetItem, {ref(b), c(IValue(int64_t{0}))}), "b0");
  auto iv = Intervention::from_bytes(serialize_graph_file(t.file));
  expect(iv->names().size() == 1 && iv->node("b0") == 1, "names survive the file");
  expect(iv->structure(0) && iv->structure(0)->num_tensors() == 1, "structures survive the file");
  expect(contains(error_of([&] { iv->node("zz"); }), "no saved value named 'zz'"), "unknown names are errors");
  at::Tensor x = input();
  expect_close(ScriptModel(make_net()).run(*iv, {x}).tensor("b0"), x * 6, "a loaded file runs");
}

// -- file mode ---------------------------------------------------------------------------

void add_leaves(NamedTensors& out, const std::string& key, const IValue& v) {
  if (v.isTensor()) {
    out.emplace_back(key, v.toTensor());
    return;
  }
  std::vector<IValue> items;
  if (v.isTuple()) items = v.toTupleRef().elements().vec();
  else if (v.isList()) items = v.toListRef().vec();
  for (size_t i = 0; i < items.size(); ++i) add_leaves(out, key + "." + std::to_string(i), items[i]);
}

int run_files(char** argv) {
  try {
    torch::NoGradGuard no_grad;
    auto iv = Intervention::load(argv[4]);
    ScriptModel model(torch::jit::load(argv[2]), argv[3]);
    std::vector<IValue> inputs;
    for (auto& [name, t] : deserialize_tensors(read_file(argv[5]))) inputs.emplace_back(t);
    Result r = model.run(*iv, inputs);
    NamedTensors out;
    add_leaves(out, "output", r.output);
    for (const auto& [name, v] : r.saved) add_leaves(out, "saved." + name, v);
    write_file(argv[6], serialize_tensors(out));
    std::cout << "ran: " << r.saved.size() << " saved values\n";
    return 0;
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
  }
  return 1;
}

int load_files(int argc, char** argv) {
  for (int i = 2; i < argc; ++i) {
    std::cout << argv[i] << ": ";
    try {
      auto iv = Intervention::load(argv[i]);
      std::cout << "ok (" << iv->graph().nodes.size() << " nodes)\n";
    } catch (const std::exception& e) {
      std::cout << "error: " << e.what() << "\n";
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "load") return load_files(argc, argv);
  if (argc > 1) {
    if (argc != 7 || std::string(argv[1]) != "run") {
      std::cerr << "usage: test_torchscript [run MODEL PREFIX GRAPH INPUTS OUT | load FILE...]\n";
      return 2;
    }
    return run_files(argv);
  }
  torch::NoGradGuard no_grad;
  test_instances_of_one_class_save_and_swap();
  test_tuple_output_inplace_edit();
  test_flattened_output_gets_its_python_structure();
  test_inputs_and_root();
  test_prefix();
  test_several_invokes();
  test_stop_and_errors();
  test_switching_interventions();
  test_threads();
  test_file_roundtrip();
  if (failures) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "torchscript tests passed\n";
  return 0;
}
