#include <fastinterleave/graph.h>

#include <algorithm>
#include <stdexcept>

namespace fastinterleave {

const char* op_name(Op op) {
  switch (op) {
    case Op::Site: return "site";
    case Op::Swap: return "swap";
    case Op::Call: return "call";
    case Op::GetItem: return "getitem";
    case Op::SetItem: return "setitem";
    case Op::GetAttr: return "getattr";
    case Op::Stop: return "stop";
    case Op::Identity: return "identity";
    case Op::Grad: return "grad";
    case Op::Cond: return "cond";
    case Op::EndCond: return "endcond";
    case Op::kCount: break;
  }
  return "?";
}

bool Node::reads_call(int32_t call) const {
  if (!iter_list.empty()) return std::binary_search(iter_list.begin(), iter_list.end(), call);
  if (iter_stop == kSingleCall) return call == iteration;
  return call >= iteration && (iter_stop == kUnbounded || call < iter_stop);
}

int32_t Node::last_call() const {
  if (!iter_list.empty()) return iter_list.back();
  if (iter_stop == kSingleCall) return iteration;
  return iter_stop == kUnbounded ? kUnbounded : iter_stop - 1;
}

int32_t Graph::site_index(const SiteKey& key) {
  for (size_t i = 0; i < sites.size(); ++i) {
    if (sites[i] == key) return static_cast<int32_t>(i);
  }
  sites.push_back(key);
  return static_cast<int32_t>(sites.size() - 1);
}

std::string Graph::describe(int32_t node) const {
  if (node >= 0 && static_cast<size_t>(node) < nodes.size()) {
    int32_t line = nodes[static_cast<size_t>(node)].line;
    if (line >= 0 && static_cast<size_t>(line) < lines.size()) return lines[static_cast<size_t>(line)];
  }
  return "node " + std::to_string(node);
}

namespace {

constexpr int kMaxArgDepth = 64;

[[noreturn]] void bad(size_t node, const std::string& what) {
  throw std::invalid_argument("malformed graph: node " + std::to_string(node) + ": " + what);
}

void validate_arg(const Arg& a, size_t node, int depth) {
  if (depth > kMaxArgDepth) bad(node, "arguments nested too deeply");
  switch (a.kind) {
    case Arg::Kind::Ref:
      if (a.ref < 0 || static_cast<size_t>(a.ref) >= node) {
        bad(node, "refers to node " + std::to_string(a.ref) + ", which is not an earlier node");
      }
      break;
    case Arg::Kind::Const:
    case Arg::Kind::Ellipsis:
      break;
    case Arg::Kind::Slice:
      if (a.items.size() != 3) bad(node, "a slice needs start, stop and step");
      [[fallthrough]];
    case Arg::Kind::Tuple:
    case Arg::Kind::List:
      for (const auto& x : a.items) validate_arg(x, node, depth + 1);
      break;
    case Arg::Kind::Dict:
      if (a.keys.size() != a.items.size()) bad(node, "dict keys and values differ in number");
      for (const auto& x : a.items) validate_arg(x, node, depth + 1);
      break;
    default:
      bad(node, "unknown argument kind");
  }
}

}  // namespace

void Graph::validate() const {
  if (batch_size < 0) throw std::invalid_argument("malformed graph: negative batch size");
  for (const auto& inv : invokers) {
    if (inv.start < 0 || inv.size < 0 || inv.start > batch_size || inv.size > batch_size - inv.start) {
      throw std::invalid_argument("malformed graph: an invoker's rows lie outside the batch");
    }
  }
  size_t open_conds = 0;
  for (size_t i = 0; i < nodes.size(); ++i) {
    const Node& n = nodes[i];
    if (static_cast<uint8_t>(n.op) >= static_cast<uint8_t>(Op::kCount)) bad(i, "unknown op");
    if (n.line < -1 || (n.line >= 0 && static_cast<size_t>(n.line) >= lines.size())) bad(i, "bad line index");
    if (n.invoker < -1 || (!invokers.empty() && n.invoker >= 0 && static_cast<size_t>(n.invoker) >= invokers.size())) {
      bad(i, "bad invoker index");
    }
    for (const auto& a : n.args) validate_arg(a, i, 0);
    for (const auto& kw : n.kwargs) validate_arg(kw.second, i, 0);
    auto need_args = [&](size_t k) {
      if (n.args.size() != k) bad(i, std::string(op_name(n.op)) + " takes " + std::to_string(k) + " arguments");
    };
    switch (n.op) {
      case Op::Site:
        need_args(0);
        if (n.site < 0 || static_cast<size_t>(n.site) >= sites.size()) bad(i, "bad site index");
        if (n.iteration < 0) bad(i, "negative call index");
        if (n.iter_stop < kSingleCall || (n.iter_stop >= 0 && n.iter_stop <= n.iteration)) bad(i, "bad call range");
        for (size_t k = 0; k < n.iter_list.size(); ++k) {
          if (n.iter_list[k] < 0 || (k > 0 && n.iter_list[k] <= n.iter_list[k - 1])) {
            bad(i, "call list must be sorted, distinct and non-negative");
          }
        }
        if (n.projection == Projection::FirstArg && sites[static_cast<size_t>(n.site)].kind != HookKind::Input) {
          bad(i, "only an input site has a first argument");
        }
        if (static_cast<uint8_t>(n.projection) > 1) bad(i, "unknown projection");
        break;
      case Op::Swap:
        need_args(2);
        if (n.args[0].kind != Arg::Kind::Ref || (nodes[static_cast<size_t>(n.args[0].ref)].op != Op::Site &&
                                                  nodes[static_cast<size_t>(n.args[0].ref)].op != Op::Grad)) {
          bad(i, "a swap must target a site or gradient node");
        }
        break;
      case Op::GetItem: need_args(2); break;
      case Op::SetItem: need_args(3); break;
      case Op::GetAttr:
        need_args(1);
        if (n.name.empty()) bad(i, "getattr needs a name");
        break;
      case Op::Identity: need_args(1); break;
      case Op::Grad:
        need_args(1);
        if (n.args[0].kind != Arg::Kind::Ref) bad(i, "grad needs a node");
        break;
      case Op::Cond:
        if (n.name == "else") {
          need_args(2);
          if (n.args[0].kind != Arg::Kind::Ref || nodes[static_cast<size_t>(n.args[0].ref)].op != Op::Cond) {
            bad(i, "an else branch must follow a cond");
          }
        } else {
          need_args(1);
        }
        ++open_conds;
        break;
      case Op::EndCond:
        need_args(0);
        if (open_conds-- == 0) bad(i, "endcond without a cond");
        break;
      case Op::Call:
        if (n.name.empty() && n.py_fn < 0) bad(i, "a call needs an op name or a Python function");
        break;
      case Op::Stop:
      case Op::kCount:
        break;
    }
  }
  if (open_conds != 0) throw std::invalid_argument("malformed graph: a cond is never closed");
}

}  // namespace fastinterleave
