// Interventions inside TorchScript models: the tap op, the graph rewriting that
// routes submodule calls through it, and the mapping between the values
// TorchScript passes and the values the recorded graph expects.
#include <fastinterleave/torchscript.h>

#include <fastinterleave/ops.h>
#include <fastinterleave/scheduler.h>

#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/library.h>

#include <array>
#include <map>
#include <mutex>

namespace fastinterleave {

using c10::IValue;

namespace {

constexpr const char* kTapOp = "fastinterleave::tap";

std::string what_of(HookKind kind) { return kind == HookKind::Output ? "output" : "input"; }

std::string module_name(const std::string& path) {
  return path.empty() ? std::string("the model") : "module '" + path + "'";
}

// Tensor leaves, depth-first (tuples, lists, dicts, records).
void tensor_leaves(const IValue& v, std::vector<at::Tensor>& out) {
  if (v.isTensor()) {
    out.push_back(v.toTensor());
  } else if (v.isTuple()) {
    for (const auto& x : v.toTupleRef().elements()) tensor_leaves(x, out);
  } else if (v.isList()) {
    for (const auto& x : v.toListRef()) tensor_leaves(x, out);
  } else if (v.isGenericDict()) {
    for (const auto& kv : v.toGenericDict()) tensor_leaves(kv.value(), out);
  } else if (const Record* r = as_record(v)) {
    for (const auto& kv : r->fields) tensor_leaves(kv.value(), out);
  }
}

// `like` with its tensor leaves replaced, in order, by `leaves[next...]`;
// containers keep their TorchScript types.
IValue replace_leaves(const IValue& like, const std::vector<at::Tensor>& leaves, size_t& next) {
  if (like.isTensor()) return IValue(leaves[next++]);
  if (like.isTuple()) {
    std::vector<IValue> items;
    for (const auto& x : like.toTupleRef().elements()) items.push_back(replace_leaves(x, leaves, next));
    return IValue(c10::ivalue::Tuple::create(std::move(items)));
  }
  if (like.isList()) {
    c10::impl::GenericList out(like.toList().elementType());
    for (const auto& x : like.toListRef()) out.push_back(replace_leaves(x, leaves, next));
    return IValue(std::move(out));
  }
  if (like.isGenericDict()) {
    auto d = like.toGenericDict();
    c10::impl::GenericDict out(d.keyType(), d.valueType());
    for (const auto& kv : d) out.insert(kv.key(), replace_leaves(kv.value(), leaves, next));
    return IValue(std::move(out));
  }
  return like;
}

// The value the recorded graph expects: `structure` filled with `leaves`.
IValue build(const ValueStructure& s, const std::vector<at::Tensor>& leaves, size_t& next, const std::string& where) {
  using K = ValueStructure::Kind;
  switch (s.kind) {
    case K::Tensor: {
      const at::Tensor& t = leaves[next];
      TORCH_CHECK(t.dim() == s.ndim, "the TorchScript model's tensor ", next, " of ", where, " has ", t.dim(),
                  " dimensions where the recorded Python value has ", s.ndim,
                  ": the model passes other tensors there than the one the intervention was recorded on");
      ++next;
      return IValue(t);
    }
    case K::Const: return s.value;
    case K::Opaque: return IValue();
    case K::Tuple: {
      std::vector<IValue> items;
      for (const auto& x : s.items) items.push_back(build(x, leaves, next, where));
      return IValue(c10::ivalue::Tuple::create(std::move(items)));
    }
    case K::List: {
      Arg list = Arg::make_seq(Arg::Kind::List, {});
      for (const auto& x : s.items) list.items.push_back(Arg::make_const(build(x, leaves, next, where)));
      return *to_ivalue(list);  // typed like the Python engine types it (Tensor[], int[], ...)
    }
    case K::Dict:
    case K::Record: {
      c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
      for (size_t i = 0; i < s.items.size(); ++i) d.insert(s.keys[i], build(s.items[i], leaves, next, where));
      return s.kind == K::Dict ? IValue(std::move(d)) : make_record(std::move(d), nullptr);
    }
  }
  TORCH_INTERNAL_ASSERT(false, "unknown value structure kind");
}

// One run's state, reached by the tap through a thread-local pointer.
struct RunContext {
  Run* run = nullptr;
  const Intervention* intervention = nullptr;
  std::unordered_map<const c10::ivalue::Object*, std::array<int32_t, 2>> sites;  // object -> plan site per HookKind
  std::exception_ptr error;  // what failed inside a tap (the interpreter would rewrap it)

  // Per plan site: the recorded structure of its value, and whether some node
  // reads the whole (args, kwargs) pair of an input site.
  std::vector<const ValueStructure*> structures;
  std::vector<uint8_t> whole_input;

  void prepare() {
    const Plan& plan = run->plan();
    const Graph& g = intervention->graph();
    structures.assign(plan.sites.size(), nullptr);
    whole_input.assign(plan.sites.size(), 0);
    for (size_t ps = 0; ps < plan.sites.size(); ++ps) {
      for (size_t i = 0; i < g.sites.size(); ++i) {
        if (g.sites[i] == plan.sites[ps].key) structures[ps] = intervention->structure(static_cast<int32_t>(i));
      }
    }
    for (size_t i = 0; i < g.nodes.size(); ++i) {
      const int32_t ps = plan.site_of_node[i];
      if (ps >= 0 && g.nodes[i].projection == Projection::Whole) whole_input[static_cast<size_t>(ps)] = 1;
    }
  }

  const SiteKey& key(int32_t site) const { return run->plan().sites[static_cast<size_t>(site)].key; }
  const ValueStructure* structure(int32_t site) const { return structures[static_cast<size_t>(site)]; }
  bool reads_whole_input(int32_t site) const { return whole_input[static_cast<size_t>(site)] != 0; }

  // TorchScript's value -> the value as the graph saw it in Python.
  IValue present(int32_t site, const IValue& ts) const {
    const SiteKey& k = key(site);
    const ValueStructure* s = structure(site);
    const std::string where = "the " + what_of(k.kind) + " of " + module_name(k.module);
    auto empty_kwargs = [] { return IValue(c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get())); };
    if (k.kind == HookKind::Input && !reads_whole_input(site)) {
      // Only `.input` is read. A traced submodule takes the tensors it uses, in
      // the order it first uses them, so only the first argument is Python's
      // first: check it is the kind of value Python saw there.
      const auto& args = ts.toTupleRef().elements();
      if (s && s->kind == ValueStructure::Kind::Tuple && !s->items.empty() && !s->items[0].items.empty()) {
        const ValueStructure& first = s->items[0].items[0];
        TORCH_CHECK(!args.empty() && (first.kind != ValueStructure::Kind::Tensor ||
                                      (args[0].isTensor() && args[0].toTensor().dim() == first.ndim)),
                    "the TorchScript model's first argument of ", module_name(k.module),
                    " is not the tensor the intervention was recorded on (its .input)");
      }
      return IValue(c10::ivalue::Tuple::create({ts, empty_kwargs()}));
    }
    if (s && s->kind == ValueStructure::Kind::Tensor && ts.isTensor()) {
      size_t next = 0;
      return build(*s, {ts.toTensor()}, next, where);  // the common case: checks the rank
    }
    std::vector<at::Tensor> leaves;
    tensor_leaves(ts, leaves);
    if (s) {
      TORCH_CHECK(s->num_tensors() == leaves.size(), where, " holds ", s->num_tensors(), " tensors in Python but ",
                  leaves.size(), " in the TorchScript model (torch.jit.trace keeps only the tensors the rest of ",
                  "the model uses): record the intervention with the keywords the model was traced with (e.g. ",
                  "use_cache=False)", k.kind == HookKind::Input ? ", or read the module's .input, not .inputs" : "");
      size_t next = 0;
      return build(*s, leaves, next, where);
    }
    // No recorded structure: the value as TorchScript has it.
    if (k.kind == HookKind::Input) return IValue(c10::ivalue::Tuple::create({ts, empty_kwargs()}));
    return ts;
  }

  // The graph's (possibly swapped) value -> what TorchScript expects there.
  IValue restore(int32_t site, const IValue& original, const IValue& changed) const {
    const SiteKey& k = key(site);
    std::vector<at::Tensor> old_leaves, new_leaves;
    tensor_leaves(original, old_leaves);
    tensor_leaves(changed, new_leaves);
    TORCH_CHECK(old_leaves.size() == new_leaves.size(), "a swap of the ", what_of(k.kind), " of ", module_name(k.module),
                " gives ", new_leaves.size(), " tensors where the TorchScript model passes ", old_leaves.size(),
                ": swap in a value of the same structure");
    size_t next = 0;
    return replace_leaves(original, new_leaves, next);
  }

  IValue fire(int32_t site, IValue value) {
    Run& r = *run;
    if (r.paused()) return value;
    if (!r.pending(site)) {
      r.skip_call(site);
      return value;
    }
    IValue v = present(site, value);
    if (!r.fire(site, v)) return value;
    return restore(site, value, v);
  }

  IValue tap(const c10::ivalue::Object* module, int64_t kind, IValue value) {
    if (error || kind < 0 || kind > 1) return value;
    auto it = sites.find(module);
    if (it == sites.end()) return value;
    const int32_t site = it->second[static_cast<size_t>(kind)];
    if (site < 0) return value;
    try {
      return fire(site, std::move(value));
    } catch (...) {
      error = std::current_exception();
      throw std::runtime_error("fastinterleave: the intervention failed (ScriptModel::run rethrows the cause)");
    }
  }
};

thread_local RunContext* t_context = nullptr;

struct ContextGuard {
  RunContext* before;
  explicit ContextGuard(RunContext* ctx) : before(t_context) { t_context = ctx; }
  ~ContextGuard() { t_context = before; }
};

// fastinterleave::tap(Any module, int kind, Any value) -> Any (typed like `value` in the graph)
void tap_kernel(const c10::OperatorHandle& /*op*/, torch::jit::Stack* stack) {
  IValue value = torch::jit::pop(*stack);
  const int64_t kind = torch::jit::pop(*stack).toInt();
  IValue module = torch::jit::pop(*stack);
  if (RunContext* ctx = t_context; ctx && module.isObject()) {
    value = ctx->tap(&module.toObjectRef(), kind, std::move(value));
  }
  torch::jit::push(*stack, std::move(value));
}

using TypeKind = std::pair<const c10::ClassType*, HookKind>;

bool wants(const std::set<TypeKind>& want, const c10::ClassType* cls, HookKind kind) {
  return want.count(TypeKind{cls, kind}) != 0;
}

// Routes the calls of the wanted module types through the tap: the output
// after the call, the arguments (as one tuple) before it.
void rewrite_block(torch::jit::Block* block, const std::set<TypeKind>& want, std::map<TypeKind, int>& found) {
  namespace jit = torch::jit;
  static const c10::Symbol tap = c10::Symbol::fromQualString(kTapOp);
  for (auto it = block->nodes().begin(); it != block->nodes().end();) {
    jit::Node* n = *it;
    ++it;  // nodes inserted around `n` are not visited
    for (jit::Block* sub : n->blocks()) rewrite_block(sub, want, found);
    if (n->kind() != c10::prim::CallMethod || n->s(c10::attr::name) != "forward") continue;
    auto cls = n->input(0)->type()->cast<c10::ClassType>();
    if (!cls) continue;
    jit::Graph* g = n->owningGraph();
    if (wants(want, cls.get(), HookKind::Input)) {
      jit::WithInsertPoint guard(n);
      std::vector<jit::Value*> args(n->inputs().begin() + 1, n->inputs().end());
      jit::Value* tuple = g->insertNode(g->createTuple(args))->output();
      jit::Value* kind = g->insertConstant(IValue(static_cast<int64_t>(HookKind::Input)));
      jit::Node* t = g->create(tap, {n->input(0), kind, tuple}, 1);
      t->output()->setType(tuple->type());
      g->insertNode(t);
      jit::Node* unpack = g->insertNode(g->createTupleUnpack(t->output()));
      for (size_t i = 0; i < args.size(); ++i) n->replaceInput(i + 1, unpack->output(i));
      ++found[TypeKind{cls.get(), HookKind::Input}];
    }
    if (wants(want, cls.get(), HookKind::Output)) {
      jit::Value* out = n->output();
      jit::WithInsertPoint guard(n->next());
      jit::Value* kind = g->insertConstant(IValue(static_cast<int64_t>(HookKind::Output)));
      jit::Node* t = g->create(tap, {n->input(0), kind, out}, 1);
      t->output()->setType(out->type());
      g->insertNode(t);
      out->replaceAllUsesWith(t->output());
      t->replaceInput(2, out);
      ++found[TypeKind{cls.get(), HookKind::Output}];
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastinterleave, m) {
  // CONSERVATIVE: it may write into its value and has side effects, so the
  // TorchScript optimizer neither removes nor reorders it.
  m.def(torch::schema("tap(Any module, int kind, Any value) -> Any", c10::AliasAnalysisKind::CONSERVATIVE),
        torch::CppFunction::makeFromBoxedFunction<&tap_kernel>());
}

// -- Intervention -------------------------------------------------------------------

Intervention::Intervention(GraphFile file)
    : plan_(compile(std::make_shared<const Graph>(std::move(file.graph)))),
      names_(std::move(file.names)),
      structures_(std::move(file.structures)) {}

std::shared_ptr<const Intervention> Intervention::load(const std::string& path) {
  return std::make_shared<const Intervention>(load_graph_file(path));
}

std::shared_ptr<const Intervention> Intervention::from_bytes(const std::string& bytes) {
  return std::make_shared<const Intervention>(deserialize_graph_file(bytes));
}

int32_t Intervention::node(const std::string& name) const {
  for (const auto& [n, node] : names_) {
    if (n == name) return node;
  }
  TORCH_CHECK(false, "this graph has no saved value named '", name, "'");
}

const ValueStructure* Intervention::structure(int32_t graph_site) const {
  if (graph_site < 0 || static_cast<size_t>(graph_site) >= structures_.size()) return nullptr;
  const auto& s = structures_[static_cast<size_t>(graph_site)];
  return s ? &*s : nullptr;
}

// -- Result ---------------------------------------------------------------------------

bool Result::has(const std::string& name) const {
  for (const auto& kv : saved) {
    if (kv.first == name) return true;
  }
  return false;
}

const IValue& Result::at(const std::string& name) const {
  for (const auto& kv : saved) {
    if (kv.first == name) return kv.second;
  }
  TORCH_CHECK(false, "no saved value named '", name, "' was set in this run",
              stopped ? " (stop() ended the forward pass before it)" : "");
}

at::Tensor Result::tensor(const std::string& name) const {
  const IValue& v = at(name);
  TORCH_CHECK(v.isTensor(), "the saved value '", name, "' is a ", v.tagKind(), ", not a tensor");
  return v.toTensor();
}

// -- ScriptModel ------------------------------------------------------------------------

ScriptModel::ScriptModel(torch::jit::Module module, std::string prefix)
    : base_(std::move(module)), module_(base_), prefix_(std::move(prefix)) {
  std::unique_lock lock(mutex_);
  rebuild();
}

void ScriptModel::rebuild() {
  // A graph's executor keeps the code it first ran: rewrite a fresh copy
  // (sharing the parameters) rather than code that may have run already.
  module_ = tapped_.empty() ? base_ : base_.clone(/*inplace=*/true);
  objects_.clear();
  bool found_prefix = prefix_.empty();
  for (const auto& m : module_.named_modules()) {
    std::string path;
    if (prefix_.empty()) {
      path = m.name;
    } else if (m.name == prefix_) {
      path = "";
      found_prefix = true;
    } else if (m.name.size() > prefix_.size() && m.name.compare(0, prefix_.size() + 1, prefix_ + ".") == 0) {
      path = m.name.substr(prefix_.size() + 1);
    } else {
      continue;
    }
    objects_.emplace(std::move(path), m.value._ivalue().get());
  }
  TORCH_CHECK(found_prefix, "the TorchScript model has no submodule '", prefix_, "' (the prefix)");
  if (tapped_.empty()) return;

  std::set<TypeKind> want;
  for (const auto& [path, kind] : tapped_) want.insert(TypeKind{objects_.at(path)->type().get(), kind});
  std::map<TypeKind, int> found;
  std::set<const c10::ClassType*> seen;
  for (const auto& m : module_.modules()) {
    const c10::ClassType* cls = m.type().get();
    if (!seen.insert(cls).second) continue;
    for (torch::jit::Function* fn : m.type()->methods()) {
      if (auto* gf = torch::jit::tryToGraphFunction(*fn)) rewrite_block(gf->graph()->block(), want, found);
    }
  }
  for (const auto& [path, kind] : tapped_) {
    const c10::ClassType* cls = objects_.at(path)->type().get();
    TORCH_CHECK(found.count(TypeKind{cls, kind}), "the TorchScript model's code never calls ", module_name(path),
                " (of type ", cls->repr_str(), ") through its forward method, so its ", what_of(kind),
                " cannot be intercepted");
  }
}

std::vector<ScriptModel::Tap> ScriptModel::taps_for(const Intervention& intervention) const {
  std::vector<Tap> taps;
  for (const auto& sp : intervention.plan()->sites) {
    const std::string& path = sp.key.module;
    if (path.empty() && prefix_.empty()) continue;  // the root: run() fires it around forward()
    TORCH_CHECK(objects_.count(path), "the TorchScript model has no submodule '",
                prefix_.empty() ? path : prefix_ + "." + path, "', which the intervention reads");
    taps.emplace_back(path, sp.key.kind);
  }
  return taps;
}

void ScriptModel::attach(const Intervention& intervention) {
  std::unique_lock lock(mutex_);
  std::vector<Tap> added;
  for (auto& t : taps_for(intervention)) {
    if (tapped_.insert(t).second) added.push_back(std::move(t));
  }
  if (added.empty()) return;
  try {
    rebuild();
  } catch (...) {
    for (const auto& t : added) tapped_.erase(t);
    rebuild();
    throw;
  }
}

c10::IValue ScriptModel::forward(std::vector<c10::IValue> inputs) {
  std::shared_lock lock(mutex_);
  ContextGuard none(nullptr);
  return module_.forward(std::move(inputs));
}

namespace {

const at::Tensor* first_tensor(const IValue& v) {
  if (v.isTensor()) return &v.toTensor();
  if (v.isTuple()) {
    for (const auto& x : v.toTupleRef().elements()) {
      if (auto* t = first_tensor(x)) return t;
    }
  } else if (v.isList()) {
    for (const auto& x : v.toListRef()) {
      if (auto* t = first_tensor(x)) return t;
    }
  }
  return nullptr;
}

}  // namespace

Result ScriptModel::run(const Intervention& intervention, std::vector<c10::IValue> inputs) {
  std::shared_lock lock(mutex_);
  for (;;) {
    bool all = true;
    for (const auto& t : taps_for(intervention)) all = all && tapped_.count(t);
    if (all) break;
    lock.unlock();
    attach(intervention);
    lock.lock();
  }
  const Graph& g = intervention.graph();
  if (g.invokers.size() > 1) {
    const at::Tensor* t = nullptr;
    for (const auto& x : inputs) {
      if ((t = first_tensor(x))) break;
    }
    TORCH_CHECK(t && t->dim() > 0 && t->size(0) == g.batch_size, "this intervention was recorded with ",
                g.invokers.size(), " invokes on a batch of ", g.batch_size,
                " rows; pass their inputs batched the same way (the first input tensor has ",
                t && t->dim() > 0 ? std::to_string(t->size(0)) : std::string("no"), " rows)");
  }

  Run run(intervention.plan(), Run::Options{});
  RunContext ctx;
  ctx.run = &run;
  ctx.intervention = &intervention;
  ctx.prepare();
  int32_t root[2] = {-1, -1};
  const auto& sites = intervention.plan()->sites;
  for (size_t i = 0; i < sites.size(); ++i) {
    const SiteKey& k = sites[i].key;
    const auto kind = static_cast<size_t>(k.kind);
    if (k.module.empty() && prefix_.empty()) {
      root[kind] = static_cast<int32_t>(i);
      continue;
    }
    auto& slot = ctx.sites.try_emplace(objects_.at(k.module), std::array<int32_t, 2>{-1, -1}).first->second;
    slot[kind] = static_cast<int32_t>(i);
  }

  Result result;
  {
    ContextGuard guard(&ctx);
    try {
      run.begin();
      if (root[1] >= 0) {
        IValue args(c10::ivalue::Tuple::create(inputs));
        IValue changed = ctx.fire(root[1], args);
        inputs = changed.toTupleRef().elements().vec();
      }
      IValue out = module_.forward(inputs);
      if (root[0] >= 0) out = ctx.fire(root[0], std::move(out));
      run.end();
      result.output = std::move(out);
    } catch (...) {
      std::exception_ptr cause = ctx.error ? ctx.error : std::current_exception();
      try {
        std::rethrow_exception(cause);
      } catch (const EarlyStop&) {
        run.end_stopped();
        result.stopped = true;
      }
    }
  }
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const auto node = static_cast<int32_t>(i);
    if (g.nodes[i].saved && run.has_value(node)) result.nodes.emplace(node, run.value(node));
  }
  for (const auto& [name, node] : intervention.names()) {
    auto it = result.nodes.find(node);
    if (it != result.nodes.end()) result.saved.emplace_back(name, it->second);
  }
  run.release();
  return result;
}

}  // namespace fastinterleave
