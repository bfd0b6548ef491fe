#include <fastinterleave/scheduler.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <numeric>

namespace fastinterleave {

using c10::IValue;

namespace {

std::string error_text(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const c10::Error& err) {
    return err.what_without_backtrace();
  } catch (const std::exception& err) {
    return err.what();
  } catch (...) {
    return "unknown error";
  }
}

// Clears `running` on every way out of a node's execution.
// Sets `running` for one node's execution (nodes nest: a backward pass runs
// gradient readers inside the node that called backward).
struct RunningGuard {
  int32_t& running;
  int32_t before;
  explicit RunningGuard(int32_t& r, int32_t node) : running(r), before(r) { running = node; }
  ~RunningGuard() { running = before; }
};

}  // namespace

Run::Run(std::shared_ptr<const Plan> plan, Options options)
    : plan_(std::move(plan)),
      options_(std::move(options)),
      graph_(*plan_->graph),
      batch_size_(graph_.batch_size),
      sliced_(graph_.invokers.size() > 1) {
  const size_t n = plan_->size();
  slots_.resize(n);
  done_.assign(n, 0);
  remaining_uses_ = plan_->use_count;
  skip_.resize(n + 1);
  std::iota(skip_.begin(), skip_.end(), 0);
  window_open_.assign(n, 0);
  armed_.assign(n, 0);
  in_progress_.assign(n, 0);
  skipped_.assign(n, 0);
  scratch_.assign(n, 0);
  calls_.assign(plan_->sites.size(), 0);
  cursor_.assign(plan_->sites.size(), 0);
}

Run::~Run() { remove_grad_hooks(); }

void Run::remove_grad_hooks() {
  for (auto& h : grad_hooks_) {
    try {
      h.tensor.remove_hook(h.handle);
    } catch (...) {  // the tensor's graph may be gone already
    }
  }
  grad_hooks_.clear();
}

bool Run::deps_done(int32_t node) const {
  const auto b = plan_->deps_begin[static_cast<size_t>(node)], e = plan_->deps_begin[static_cast<size_t>(node) + 1];
  for (auto k = b; k < e; ++k) {
    if (!done_[static_cast<size_t>(plan_->deps[static_cast<size_t>(k)])]) return false;
  }
  return true;
}

bool Run::reads_skipped(int32_t node) const {
  const auto b = plan_->deps_begin[static_cast<size_t>(node)], e = plan_->deps_begin[static_cast<size_t>(node) + 1];
  for (auto k = b; k < e; ++k) {
    if (skipped_[static_cast<size_t>(plan_->deps[static_cast<size_t>(k)])]) return true;
  }
  return false;
}

// Marks a node done without running it: its value stays unset.
void Run::skip(int32_t node) {
  const auto i = static_cast<size_t>(node);
  done_[i] = 1;
  skipped_[i] = 1;
  skip_[i] = node + 1;
  slots_[i] = Slot{};
  if (recording_body_ >= 0) bodies_[recording_body_].push_back(node);
}

namespace {
bool truthy(const IValue& v, const std::string& where) {
  if (v.isBool()) return v.toBool();
  if (v.isInt()) return v.toInt() != 0;
  if (v.isDouble()) return v.toDouble() != 0.0;
  if (v.isNone()) return false;
  if (v.isTensor()) {
    const at::Tensor& t = v.toTensor();
    TORCH_CHECK(t.numel() == 1, "the condition of a branch must be one value, not a tensor of ", t.numel(),
                " elements (use .any() or .all()): ", where);
    return t.item<bool>();
  }
  TORCH_CHECK(false, "the condition of a branch must be a bool, a number or a one-element tensor: ", where);
}
}  // namespace

// Whether a Cond node's branch runs; its value records whether any branch of
// its chain (if / elif / else) has run so far.
bool Run::branch_taken(int32_t node) {
  const Node& nd = graph_.nodes[static_cast<size_t>(node)];
  bool runs;
  bool chain_taken;
  if (nd.name == "else") {
    const int32_t prev = nd.args[0].ref;
    const bool before = !skipped_[static_cast<size_t>(prev)] && slots_[static_cast<size_t>(prev)].value.toBool();
    const Arg cond = resolve(nd.args[1]);
    runs = !before && (cond.value.isNone() || truthy(cond.value, graph_.describe(node)));
    chain_taken = before || runs;
  } else {
    runs = truthy(resolve(nd.args[0]).value, graph_.describe(node));
    chain_taken = runs;
  }
  Slot s;
  s.set = true;
  s.value = IValue(chain_taken);
  slots_[static_cast<size_t>(node)] = std::move(s);
  return runs;
}

int32_t Run::next_undone(int32_t i) {
  const auto n = static_cast<int32_t>(done_.size());
  int32_t r = i;
  while (r < n && done_[static_cast<size_t>(r)]) r = skip_[static_cast<size_t>(r)];
  while (i < n && done_[static_cast<size_t>(i)]) {  // path compression
    int32_t next = skip_[static_cast<size_t>(i)];
    skip_[static_cast<size_t>(i)] = r;
    i = next;
  }
  return r;
}

void Run::begin() {
  execute_from(0);
  flush_writes();
}

void Run::check_site(int32_t site) const {
  if (site < 0 || static_cast<size_t>(site) >= calls_.size()) {
    throw std::out_of_range("fastinterleave: site " + std::to_string(site) + " is not in this plan (it has " +
                            std::to_string(calls_.size()) + ")");
  }
}

// nnsight 0.4.11's rule: run the nodes recorded from `first` on, in order,
// skipping those already run, until an access to a site that has not fired yet
// or a node whose inputs are not all there.
void Run::execute_from(int32_t first) {
  const auto n = static_cast<int32_t>(done_.size());
  const auto& nodes = graph_.nodes;
  for (int32_t j = next_undone(first); j < n; j = next_undone(j + 1)) {
    const Op op = nodes[static_cast<size_t>(j)].op;
    if (op == Op::Site) return;
    // Deferred writes land before anything else runs (GetItem flushes them
    // unless it only picks an element of a container).
    if (op != Op::SetItem && op != Op::GetItem) flush_writes();
    // The node that started this walk (backward() running gradient readers)
    // is not finished: nothing after it runs before it ends.
    if (in_progress_[static_cast<size_t>(j)]) return;
    if (op == Op::Grad) {
      // Reached in order: hook its tensor now, so it reads the next backward pass.
      if (!armed_[static_cast<size_t>(j)]) {
        if (!deps_done(j)) return;
        arm_grad(j);
      }
      continue;
    }
    // Gradient readers wait for the backward pass; they do not block the walk.
    if (plan_->after_grad[static_cast<size_t>(j)] && grad_depth_ == 0) continue;
    if (!deps_done(j) && !run_on_demand(j)) return;
    // What reads a value of a branch not taken is not taken either.
    if (reads_skipped(j)) {
      skip(j);
      continue;
    }
    if (op == Op::Cond) {
      const bool runs = [&] {
        RunningGuard guard(running_node_, j);
        try {
          return branch_taken(j);
        } catch (const NodeError&) {
          throw;
        } catch (...) {
          auto cause = std::current_exception();
          throw NodeError(NodeError::Kind::Failed, j, -1, error_text(cause) + "\n  in: " + graph_.describe(j), cause);
        }
      }();
      done_[static_cast<size_t>(j)] = 1;
      skip_[static_cast<size_t>(j)] = j + 1;
      if (recording_body_ >= 0) bodies_[recording_body_].push_back(j);
      consume(j);
      if (!runs) {
        // Site nodes of the branch may be bound already (their module ran
        // before the condition was known): they are not taken either.
        const int32_t end = plan_->branch_end[static_cast<size_t>(j)];
        for (int32_t k = j + 1; k <= end; ++k) {
          if (!done_[static_cast<size_t>(k)] || graph_.nodes[static_cast<size_t>(k)].op == Op::Site) skip(k);
        }
      }
      continue;
    }
    execute(j);
  }
}

// On-demand values: the undone inputs of `node` that are plain computations
// (no site access, no write, no gradient, not in a branch still undecided),
// whose own inputs are there or are such computations in turn, run now, in
// recording order. An earlier walk stopped before them at a site that has not
// fired, but nothing they compute waits for it. Returns whether every input of
// `node` is then done; runs nothing when some input cannot be had yet.
bool Run::run_on_demand(int32_t node) {
  std::vector<int32_t> needed;
  std::vector<int32_t> stack{node};
  std::vector<uint8_t>& seen = scratch_;  // all 0 between uses
  struct Unsee {  // (on the way out with an input that cannot be had yet)
    std::vector<uint8_t>& seen;
    const std::vector<int32_t>& nodes;
    ~Unsee() {
      for (const int32_t d : nodes) seen[static_cast<size_t>(d)] = 0;
    }
  } unsee{seen, needed};
  while (!stack.empty()) {
    const auto k = static_cast<size_t>(stack.back());
    stack.pop_back();
    for (auto e = plan_->deps_begin[k]; e < plan_->deps_begin[k + 1]; ++e) {
      const int32_t d = plan_->deps[static_cast<size_t>(e)];
      const auto di = static_cast<size_t>(d);
      if (done_[di] || seen[di]) continue;
      const Op op = graph_.nodes[di].op;
      const bool computation = op == Op::Call || op == Op::GetItem || op == Op::GetAttr || op == Op::Identity;
      if (!computation || plan_->inplace[di] || plan_->after_grad[di] || in_progress_[di]) return false;
      seen[di] = 1;
      needed.push_back(d);
      stack.push_back(d);
    }
  }
  for (const int32_t d : needed) seen[static_cast<size_t>(d)] = 0;  // (free for what runs below)
  std::sort(needed.begin(), needed.end());  // inputs are recorded before their readers
  for (const int32_t d : needed) {
    if (reads_skipped(d)) skip(d);
    else execute(d);
  }
  return true;
}

IValue Run::materialize(Slot& slot) {
  if (!slot.lazy()) return slot.value;
  const int64_t start = slot.start, size = slot.size, full = batch_size_;
  slot.base = slot.value;
  slot.narrowed = true;
  slot.value = map_tensors(slot.value, [&](const at::Tensor& t) {
    return t.dim() > 0 && t.size(0) == full ? IValue(t.narrow(0, start, size)) : IValue(t);
  });
  return slot.value;
}

IValue Run::ref_value(int32_t node) {
  Slot& s = slots_[static_cast<size_t>(node)];
  TORCH_INTERNAL_ASSERT(s.set, "fastinterleave: value of node ", node, " read after it was freed");
  return materialize(s);
}

Arg Run::resolve(const Arg& a) {
  if (a.kind == Arg::Kind::Ref) return Arg::make_const(ref_value(a.ref));
  if (a.kind == Arg::Kind::Const || a.kind == Arg::Kind::Ellipsis) return a;
  Arg out;
  out.kind = a.kind;
  out.keys = a.keys;
  out.items.reserve(a.items.size());
  for (const auto& x : a.items) out.items.push_back(resolve(x));
  return out;
}

void Run::check_window(int32_t node) {
  if (!plan_->inplace[static_cast<size_t>(node)]) return;
  const Node& nd = graph_.nodes[static_cast<size_t>(node)];
  if (nd.args.empty() || nd.args[0].kind != Arg::Kind::Ref) return;
  const int32_t root = nd.op == Op::Swap ? nd.args[0].ref : plan_->alias_root[static_cast<size_t>(nd.args[0].ref)];
  if (root < 0 || window_open_[static_cast<size_t>(root)]) return;
  // Too late for the module, but a node recorded after the edit reads the
  // edited value: the edit runs, and that reader sees it.
  if (nd.op != Op::Swap && plan_->last_alias_read[static_cast<size_t>(root)] > node) return;
  const SiteKey& key = graph_.sites[static_cast<size_t>(graph_.nodes[static_cast<size_t>(root)].site)];
  std::string what = (key.module.empty() ? std::string("the model") : key.module) +
                     (key.kind == HookKind::Output ? " output" : " input");
  std::string msg = "this edit of " + what + " (read at " + graph_.describe(root) + ") would run after " +
                    (key.module.empty() ? std::string("the model") : key.module) +
                    " has already used the value, so it could not change anything: " + graph_.describe(node);
  if (firing_node_ >= 0) {
    msg += "\n  It waits for the access recorded before it at " + graph_.describe(firing_node_) +
           ", which the forward pass reaches later. Record the edit before that access.";
  }
  throw NodeError(NodeError::Kind::IneffectiveEdit, node, firing_node_, msg);
}

IValue Run::run_fallback(int32_t node) {
  const Node& nd = graph_.nodes[static_cast<size_t>(node)];
  if (!options_.fallback || !options_.allow_fallback) {
    throw NodeError(NodeError::Kind::NoFallback, node, -1,
                    std::string("the engine cannot run this ") + op_name(nd.op) +
                        (nd.name.empty() ? std::string() : " '" + nd.name + "'") +
                        " natively and the Python fallback is " +
                        (options_.fallback ? "switched off" : "not available") + ": " + graph_.describe(node));
  }
  ResolvedArgs args;
  args.reserve(nd.args.size());
  for (const auto& a : nd.args) args.push_back(resolve(a));
  ResolvedKwargs kwargs;
  for (const auto& kw : nd.kwargs) kwargs.emplace_back(kw.first, resolve(kw.second));
  return options_.fallback(nd, args, kwargs);
}

IValue Run::run_call(int32_t node) {
  const Node& nd = graph_.nodes[static_cast<size_t>(node)];
  if (const OpCandidates* op = plan_->ops[static_cast<size_t>(node)]) {
    std::vector<IValue> args;
    args.reserve(nd.args.size());
    bool ok = true;
    for (const auto& a : nd.args) {
      auto v = a.kind == Arg::Kind::Ref ? std::optional<IValue>(ref_value(a.ref)) : to_ivalue(resolve(a));
      if (!v) { ok = false; break; }
      args.push_back(std::move(*v));
    }
    Kwargs kwargs;
    for (const auto& kw : nd.kwargs) {
      if (!ok) break;
      auto v = to_ivalue(resolve(kw.second));
      if (!v) { ok = false; break; }
      kwargs.emplace_back(kw.first, std::move(*v));
    }
    if (ok) {
      if (auto out = call_op(*op, args, kwargs)) return std::move(*out);
    }
  }
  if (nd.py_fn >= 0) return run_fallback(node);
  throw NodeError(NodeError::Kind::Unsupported, node, -1,
                  "no overload of aten::" + nd.name + " accepts these arguments: " + graph_.describe(node));
}

void Run::execute(int32_t node) {
  const size_t i = static_cast<size_t>(node);
  const Node& nd = graph_.nodes[i];
  Slot out;
  out.set = true;
  {
    RunningGuard guard(running_node_, node);
    struct InProgress {
      std::vector<uint8_t>& flags;
      size_t i;
      ~InProgress() { flags[i] = 0; }
    } in_progress{in_progress_, i};
    in_progress_[i] = 1;
    try {
      check_window(node);
      switch (nd.op) {
        case Op::Call:
          out.value = run_call(node);
          break;
        case Op::GetItem: {
          const Arg& target = nd.args[0];
          const Arg& index = nd.args[1];
          if (target.kind == Arg::Kind::Ref) {
            Slot& src = slots_[static_cast<size_t>(target.ref)];
            const bool lazy_container = src.lazy() && (src.value.isTuple() || src.value.isList() ||
                                                          src.value.isGenericDict() || as_record(src.value));
            if (lazy_container && index.kind == Arg::Kind::Const &&
                (index.value.isInt() || index.value.isString())) {
              // Pick the element without narrowing its siblings: narrow on use.
              if (auto v = get_item(src.value, index)) {
                out.value = std::move(*v);
                out.start = src.start;
                out.size = src.size;
                break;
              }
            }
          }
          flush_writes();
          Arg tgt = resolve(target);
          if (auto v = get_item(tgt.value, resolve(index))) out.value = std::move(*v);
          else out.value = run_fallback(node);
          break;
        }
        case Op::SetItem: {
          const Arg index = resolve(nd.args[1]);
          auto item = to_ivalue(resolve(nd.args[2]));
          if (item && defer_write(node, index, *item)) break;
          flush_writes();
          Arg tgt = resolve(nd.args[0]);
          if (!(item && set_item(tgt.value, index, *item))) run_fallback(node);
          break;
        }
        case Op::GetAttr: {
          Arg tgt = resolve(nd.args[0]);
          if (auto v = get_attr(tgt.value, nd.name)) out.value = std::move(*v);
          else out.value = run_fallback(node);
          break;
        }
        case Op::Identity: {
          auto v = to_ivalue(resolve(nd.args[0]));
          if (!v) throw NodeError(NodeError::Kind::Unsupported, node, -1, "an index expression is not a value: " + graph_.describe(node));
          out.value = std::move(*v);
          break;
        }
        case Op::Swap: {
          auto v = to_ivalue(resolve(nd.args[1]));
          if (!v) throw NodeError(NodeError::Kind::Unsupported, node, -1, "an index expression is not a value: " + graph_.describe(node));
          pending_swaps_.emplace_back(nd.args[0].ref, std::move(*v));
          break;
        }
        case Op::Stop:
          stopped_ = true;
          throw EarlyStop();
        case Op::EndCond:
          break;
        case Op::Site:
        case Op::Grad:
        case Op::Cond:
        case Op::kCount:
          TORCH_INTERNAL_ASSERT(false, "fastinterleave: site and gradient nodes are bound, not executed");
      }
    } catch (const EarlyStop&) {
      throw;
    } catch (const NodeError&) {
      throw;
    } catch (...) {
      auto cause = std::current_exception();
      throw NodeError(NodeError::Kind::Failed, node, -1, error_text(cause) + "\n  in: " + graph_.describe(node), cause);
    }
  }
  done_[i] = 1;
  skip_[i] = node + 1;
  if (plan_->use_count[i] > 0 || plan_->keep[i]) slots_[i] = std::move(out);
  if (recording_body_ >= 0) bodies_[recording_body_].push_back(node);
  consume(node);
}

bool Run::defer_write(int32_t node, const Arg& index, const IValue& item) {
  const Arg& target = graph_.nodes[static_cast<size_t>(node)].args[0];
  if (target.kind != Arg::Kind::Ref) return false;
  const Slot& src = slots_[static_cast<size_t>(target.ref)];
  // Only an invoke's rows not narrowed yet: the batch tensor itself is at hand.
  if (!src.lazy() || !src.value.isTensor()) return false;
  const at::Tensor& batch = src.value.toTensor();
  if (batch.dim() == 0 || batch.size(0) != batch_size_) return false;
  auto w = row_write(batch, src.start, src.size, index, item);
  if (!w) return false;
  PendingWrites& p = writes_;
  if (!p.writes.empty()) {
    bool joins = p.batch.unsafeGetTensorImpl() == batch.unsafeGetTensorImpl() &&
                 p.writes[0].coords.size() == w->coords.size();
    if (joins && w->row < p.end_row) {  // rows out of order: they must not overlap any pending
      for (const auto& o : p.writes) {
        if (w->row < o.row + o.rows && o.row < w->row + w->rows) {
          joins = false;
          break;
        }
      }
    }
    if (!joins) flush_writes();
  }
  if (p.writes.empty()) {
    p.batch = batch;
    p.first_node = node;
  }
  p.end_row = std::max(p.end_row, w->row + w->rows);
  p.writes.push_back(std::move(*w));
  return true;
}

void Run::flush_writes() {
  if (writes_.writes.empty()) return;
  PendingWrites p = std::move(writes_);
  writes_.clear();
  try {
    write_rows(p.batch, p.writes);
  } catch (...) {
    const int32_t first = p.first_node;
    auto cause = std::current_exception();
    throw NodeError(NodeError::Kind::Failed, first, -1, error_text(cause) + "\n  in: " + graph_.describe(first), cause);
  }
}

void Run::consume(int32_t node) {
  const auto b = plan_->deps_begin[static_cast<size_t>(node)], e = plan_->deps_begin[static_cast<size_t>(node) + 1];
  for (auto k = b; k < e; ++k) {
    const auto d = static_cast<size_t>(plan_->deps[static_cast<size_t>(k)]);
    if (--remaining_uses_[d] == 0 && !plan_->keep[d] && defer_frees_ == 0) slots_[d] = Slot{};
  }
}

namespace {

// Writes `repl` into rows [start, start + size) of every batch-sized leaf of
// `full`, on a copy: values read before the swap keep their content.
IValue write_slice(const IValue& full, const IValue& repl, int64_t start, int64_t size, int64_t batch) {
  if (full.isTensor()) {
    const at::Tensor& t = full.toTensor();
    if (t.dim() == 0 || t.size(0) != batch) return repl;
    at::Tensor out = t.clone();
    if (repl.isTensor()) out.narrow(0, start, size).copy_(repl.toTensor());
    else if (repl.isInt() || repl.isDouble() || repl.isBool()) out.narrow(0, start, size).fill_(repl.toScalar());
    else TORCH_CHECK(false, "with several invokes a batched tensor can only be swapped for a tensor or a number");
    return IValue(out);
  }
  if (full.isTuple() || full.isList()) {
    c10::ArrayRef<IValue> a = full.isTuple() ? full.toTupleRef().elements() : full.toListRef();
    TORCH_CHECK(repl.isTuple() || repl.isList(), "with several invokes a swap must keep the value's structure (a sequence of ", a.size(), ")");
    c10::ArrayRef<IValue> r = repl.isTuple() ? repl.toTupleRef().elements() : repl.toListRef();
    TORCH_CHECK(a.size() == r.size(), "with several invokes a swap must keep the value's structure (a sequence of ", a.size(), ", got ", r.size(), ")");
    std::vector<IValue> items;
    for (size_t k = 0; k < a.size(); ++k) items.push_back(write_slice(a[k], r[k], start, size, batch));
    if (full.isTuple()) return IValue(c10::ivalue::Tuple::create(std::move(items)));
    c10::impl::GenericList out(full.toList().elementType());
    for (auto& x : items) out.push_back(std::move(x));
    return IValue(std::move(out));
  }
  if (const Record* fr = as_record(full)) {
    const Record* rr = as_record(repl);
    TORCH_CHECK(rr, "with several invokes a swap must keep the value's structure (a record)");
    return make_record(write_slice(IValue(fr->fields), IValue(rr->fields), start, size, batch).toGenericDict(), fr->type);
  }
  if (full.isGenericDict() && repl.isGenericDict()) {
    auto d = full.toGenericDict();
    auto r = repl.toGenericDict();
    c10::impl::GenericDict out(d.keyType(), d.valueType());
    for (const auto& kv : d) {
      auto it = r.find(kv.key());
      out.insert(kv.key(), it == r.end() ? kv.value() : write_slice(kv.value(), it->value(), start, size, batch));
    }
    return IValue(std::move(out));
  }
  return repl;
}

}  // namespace

static at::Tensor write_slice_tensor(const at::Tensor& full, const IValue& repl, int64_t start, int64_t size) {
  return write_slice(IValue(full), repl, start, size, full.size(0)).toTensor();
}

IValue Run::apply_swap(const IValue& current, int32_t site_node, const IValue& replacement) {
  const Node& nd = graph_.nodes[static_cast<size_t>(site_node)];
  const InvokerSlice* inv = sliced_ && nd.invoker >= 0 ? &graph_.invokers[static_cast<size_t>(nd.invoker)] : nullptr;
  auto put = [&](const IValue& full) {
    return inv ? write_slice(full, replacement, inv->start, inv->size, batch_size_) : replacement;
  };
  if (nd.projection == Projection::FirstArg) {
    const auto& pair = current.toTupleRef().elements();
    std::vector<IValue> args = pair[0].toTupleRef().elements().vec();
    args[0] = put(args[0]);
    return IValue(c10::ivalue::Tuple::create({IValue(c10::ivalue::Tuple::create(std::move(args))), pair[1]}));
  }
  return put(current);
}

void Run::arm_grad(int32_t node) {
  const Node& nd = graph_.nodes[static_cast<size_t>(node)];
  Slot& src = slots_[static_cast<size_t>(nd.args[0].ref)];
  TORCH_INTERNAL_ASSERT(src.set, "fastinterleave: gradient target freed");
  // An invoker's rows are a view; a hook on a view never fires. Hook the full
  // tensor and narrow the gradient.
  at::Tensor full;
  int64_t start = 0, size = -1;
  if (src.size >= 0 && (src.narrowed ? src.base : src.value).isTensor()) {
    full = (src.narrowed ? src.base : src.value).toTensor();
    if (full.dim() > 0 && full.size(0) == batch_size_) {
      start = src.start;
      size = src.size;
    }
  } else {
    IValue v = materialize(src);
    if (!v.isTensor()) {
      throw NodeError(NodeError::Kind::Unsupported, node, -1, "only a tensor has a gradient: " + graph_.describe(node));
    }
    full = v.toTensor();
  }
  if (!full.requires_grad()) {
    throw NodeError(NodeError::Kind::Unsupported, node, -1,
                    "this value does not require grad, so no gradient reaches it: " + graph_.describe(node));
  }
  unsigned handle = full.register_hook([this, node, start, size](at::Tensor grad) -> at::Tensor {
    return on_grad(node, grad, start, size);
  });
  grad_hooks_.push_back(GradHook{full, handle});
  armed_[static_cast<size_t>(node)] = 1;
}

at::Tensor Run::on_grad(int32_t node, const at::Tensor& grad, int64_t start, int64_t size) {
  const size_t i = static_cast<size_t>(node);
  if (finished_ || done_[i]) return at::Tensor();  // each gradient node reads one backward pass
  Slot s;
  s.set = true;
  s.value = IValue(size >= 0 ? grad.narrow(0, start, size) : grad);
  done_[i] = 1;
  skip_[i] = node + 1;
  if (plan_->use_count[i] > 0 || plan_->keep[i]) slots_[i] = std::move(s);
  const int32_t outer_firing = firing_node_;
  window_open_[i] = 1;
  firing_node_ = node;
  ++grad_depth_;
  struct Restore {
    Run& run;
    size_t i;
    int32_t outer;
    ~Restore() {
      run.writes_.clear();  // left only by an error
      --run.grad_depth_;
      run.window_open_[i] = 0;
      run.firing_node_ = outer;
    }
  } restore{*this, i, outer_firing};
  execute_from(node + 1);
  flush_writes();
  // Swaps of this gradient (`proxy.grad = g`) replace what flows on.
  at::Tensor result;
  for (auto it = pending_swaps_.begin(); it != pending_swaps_.end();) {
    if (it->first != node) {
      ++it;
      continue;
    }
    IValue repl = it->second;
    if (size >= 0) {
      result = write_slice_tensor(result.defined() ? result : grad, repl, start, size);
    } else {
      TORCH_CHECK(repl.isTensor(), "a gradient can only be swapped for a tensor");
      result = repl.toTensor();
    }
    it = pending_swaps_.erase(it);
  }
  return result;
}

bool Run::pending(int32_t site) const {
  check_site(site);
  const SitePlan& sp = plan_->sites[static_cast<size_t>(site)];
  const int32_t call = calls_[static_cast<size_t>(site)];
  const size_t cur = cursor_[static_cast<size_t>(site)];
  if (cur < sp.requests.size() && sp.requests[cur].first == call) return true;
  for (int32_t r : sp.repeating) {
    if (graph_.nodes[static_cast<size_t>(r)].reads_call(call)) return true;
  }
  return false;
}

void Run::reset_body(int32_t node) {
  // Only what depends on the site's value runs again for the next call: a node
  // the walk reached after the binding but that reads nothing of it (a value
  // read before the block, an edit of another call) ran once, as written.
  std::vector<int32_t>& body = bodies_[node];
  std::vector<uint8_t>& depends = scratch_;  // all 0 between uses
  depends[static_cast<size_t>(node)] = 1;
  size_t kept = 0;
  for (const int32_t j : body) {
    const auto i = static_cast<size_t>(j);
    // A branch in the body is decided anew at each call (what it skipped runs again),
    // and so is everything inside it (its Site nodes too).
    const Op op = graph_.nodes[i].op;
    const int32_t cond = plan_->enclosing_cond[i];
    bool reads = op == Op::Cond || op == Op::EndCond || (cond >= 0 && depends[static_cast<size_t>(cond)] != 0);
    for (auto k = plan_->deps_begin[i]; k < plan_->deps_begin[i + 1] && !reads; ++k) {
      reads = depends[static_cast<size_t>(plan_->deps[static_cast<size_t>(k)])] != 0;
    }
    if (reads) {
      depends[i] = 1;
      body[kept++] = j;
    }
  }
  body.resize(kept);
  depends[static_cast<size_t>(node)] = 0;
  for (const int32_t j : body) depends[static_cast<size_t>(j)] = 0;
  for (int32_t j : body) {
    const auto i = static_cast<size_t>(j);
    done_[i] = 0;
    skipped_[i] = 0;
    slots_[i] = Slot{};
    remaining_uses_[i] = plan_->use_count[i];
    for (auto k = plan_->deps_begin[i]; k < plan_->deps_begin[i + 1]; ++k) {
      remaining_uses_[static_cast<size_t>(plan_->deps[static_cast<size_t>(k)])] += 1;
    }
  }
  bodies_[node].clear();
  done_[static_cast<size_t>(node)] = 0;
  remaining_uses_[static_cast<size_t>(node)] = plan_->use_count[static_cast<size_t>(node)];
  // Undone nodes are back in the walk: rebuild its skip links.
  for (size_t i = 0; i + 1 < skip_.size(); ++i) skip_[i] = static_cast<int32_t>(i) + (done_[i] ? 1 : 0);
}

bool Run::fire(int32_t site, IValue& value) {
  check_site(site);
  // A node may be running: it called the module (`envoy(x, hook=True)`, or
  // Python code calling it), and that call is one of the module's calls, as in
  // nnsight. What the outer firing set up is put back when this one returns.
  if (finished_) return false;
  const SitePlan& sp = plan_->sites[static_cast<size_t>(site)];
  const int32_t call = calls_[static_cast<size_t>(site)]++;

  // The nodes reading this call, in recording order.
  std::vector<int32_t> matching;
  size_t& cur = cursor_[static_cast<size_t>(site)];
  while (cur < sp.requests.size() && sp.requests[cur].first == call) matching.push_back(sp.requests[cur++].second);
  const size_t fixed = matching.size();
  for (int32_t r : sp.repeating) {
    if (graph_.nodes[static_cast<size_t>(r)].reads_call(call)) matching.push_back(r);
  }
  if (matching.empty()) return false;
  if (fixed && fixed < matching.size()) std::sort(matching.begin(), matching.end());

  bool changed = false;
  IValue current = value;
  struct Restore {  // the module uses the value once the hook returns
    Run& run;
    const std::vector<int32_t>& nodes;
    int32_t firing, body, defer;
    std::vector<std::pair<int32_t, c10::IValue>> swaps;  // the outer firing's, if nested
    ~Restore() {
      for (int32_t n : nodes) run.window_open_[static_cast<size_t>(n)] = 0;
      run.firing_node_ = firing;
      run.recording_body_ = body;
      run.defer_frees_ = defer;
      run.pending_swaps_ = std::move(swaps);
      run.writes_.clear();  // left only by an error
    }
  } restore{*this, matching, firing_node_, recording_body_, defer_frees_, std::move(pending_swaps_)};
  pending_swaps_.clear();

  for (const int32_t node : matching) {
    const size_t i = static_cast<size_t>(node);
    const Node& nd = graph_.nodes[i];
    const bool repeats = nd.repeats();
    if (skipped_[i]) continue;  // in a branch not taken
    // (A repeating site reset with an enclosing body still has its own body to reset.)
    if (repeats && (done_[i] || !bodies_[node].empty())) reset_body(node);
    Slot s;
    s.set = true;
    if (nd.projection == Projection::FirstArg) {
      const auto& args = current.toTupleRef().elements()[0].toTupleRef().elements();
      if (args.empty()) {
        throw NodeError(NodeError::Kind::Unsupported, node, -1,
                        "the module was called without a positional argument, so it has no .input: " + graph_.describe(node));
      }
      s.value = args[0];
    } else {
      s.value = current;
    }
    if (sliced_ && nd.invoker >= 0) {
      s.start = graph_.invokers[static_cast<size_t>(nd.invoker)].start;
      s.size = graph_.invokers[static_cast<size_t>(nd.invoker)].size;
    }
    done_[i] = 1;
    skip_[i] = node + 1;
    if (plan_->use_count[i] > 0 || plan_->keep[i]) slots_[i] = std::move(s);
    window_open_[i] = 1;
    firing_node_ = node;
    recording_body_ = repeats ? node : -1;
    // Until its last call, what a repeating body reads must outlive the body.
    defer_frees_ = repeats && (nd.last_call() == kUnbounded || call < nd.last_call()) ? 1 : 0;
    execute_from(node + 1);
    recording_body_ = -1;
    defer_frees_ = 0;
    // The next invoke's writes into this site join the pending ones; a swap reads the value.
    if (!pending_swaps_.empty()) flush_writes();
    for (const auto& [target, repl] : pending_swaps_) {
      current = apply_swap(current, target, repl);
      changed = true;
    }
    pending_swaps_.clear();
  }
  flush_writes();
  if (changed) value = std::move(current);
  return changed;
}

void Run::end() {
  finished_ = true;
  const auto n = static_cast<int32_t>(done_.size());
  for (int32_t j = 0; j < n; ++j) {
    const Node& nd = graph_.nodes[static_cast<size_t>(j)];
    if (nd.op != Op::Site || skipped_[static_cast<size_t>(j)]) continue;
    const int32_t ps = plan_->site_of_node[static_cast<size_t>(j)];
    const int32_t c = calls_[static_cast<size_t>(ps)];
    const int32_t last = nd.last_call();
    // Every call a request names must have happened; .all() reads what there is.
    const bool missing = last == kUnbounded ? false : c <= last;
    if (!missing) continue;
    const SiteKey& key = graph_.sites[static_cast<size_t>(nd.site)];
    std::string who = key.module.empty() ? std::string("the model") : "module '" + key.module + "'";
    std::string msg = std::string("this intervention needs the ") + (key.kind == HookKind::Output ? "output" : "input") +
                      " of " + who + " at call " + std::to_string(last) + ", but " +
                      (c == 0 ? who + " was never called" : who + " was called only " + std::to_string(c) + " time" + (c == 1 ? "" : "s")) +
                      " during the forward pass: " + graph_.describe(j);
    throw NodeError(NodeError::Kind::NeverFired, j, -1, msg);
  }
}

void Run::end_stopped() { finished_ = true; }

bool Run::has_value(int32_t node) const {
  if (node < 0 || static_cast<size_t>(node) >= slots_.size()) return false;
  return slots_[static_cast<size_t>(node)].set;
}

IValue Run::value(int32_t node) {
  if (!has_value(node)) throw std::out_of_range("fastinterleave: node " + std::to_string(node) + " holds no value");
  return materialize(slots_[static_cast<size_t>(node)]);
}

void Run::release() {
  remove_grad_hooks();
  slots_.assign(slots_.size(), Slot{});
  pending_swaps_.clear();
  writes_.clear();
  finished_ = true;
}

}  // namespace fastinterleave
