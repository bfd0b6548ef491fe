#include <fastinterleave/compiler.h>

#include <algorithm>

namespace fastinterleave {

namespace {

void collect_refs(const Arg& a, std::vector<int32_t>& out) {
  if (a.kind == Arg::Kind::Ref) {
    out.push_back(a.ref);
    return;
  }
  for (const auto& x : a.items) collect_refs(x, out);
}

}  // namespace

std::shared_ptr<const Plan> compile(std::shared_ptr<const Graph> graph) {
  graph->validate();
  auto plan = std::make_shared<Plan>();
  const auto& nodes = graph->nodes;
  const size_t n = nodes.size();
  plan->site_of_node.assign(n, -1);
  plan->deps_begin.reserve(n + 1);
  plan->use_count.assign(n, 0);
  plan->keep.assign(n, 0);
  plan->alias_root.assign(n, -1);
  plan->inplace.assign(n, 0);
  plan->ops.assign(n, nullptr);
  plan->after_grad.assign(n, 0);
  plan->branch_end.assign(n, -1);
  plan->enclosing_cond.assign(n, -1);
  plan->last_alias_read.assign(n, -1);
  std::vector<int32_t> open_conds;

  std::vector<int32_t> graph_site_to_plan(graph->sites.size(), -1);
  std::vector<int32_t> refs;
  for (size_t i = 0; i < n; ++i) {
    const Node& node = nodes[i];
    plan->keep[i] = node.saved ? 1 : 0;

    // Distinct inputs, so a node reading x twice counts as one use of x.
    refs.clear();
    for (const auto& a : node.args) collect_refs(a, refs);
    for (const auto& kw : node.kwargs) collect_refs(kw.second, refs);
    if (!open_conds.empty()) {
      plan->enclosing_cond[i] = open_conds.back();
      if (node.op != Op::Site) refs.push_back(open_conds.back());
    }
    std::sort(refs.begin(), refs.end());
    refs.erase(std::unique(refs.begin(), refs.end()), refs.end());
    plan->deps_begin.push_back(static_cast<int32_t>(plan->deps.size()));
    for (int32_t r : refs) {
      plan->deps.push_back(r);
      plan->use_count[static_cast<size_t>(r)] += 1;
      const auto& dep = nodes[static_cast<size_t>(r)];
      if (dep.op == Op::Grad || plan->after_grad[static_cast<size_t>(r)]) plan->after_grad[i] = 1;
      const int32_t root = plan->alias_root[static_cast<size_t>(r)];
      if (root >= 0) plan->last_alias_read[static_cast<size_t>(root)] = static_cast<int32_t>(i);
    }

    switch (node.op) {
      case Op::Site: {
        int32_t& ps = graph_site_to_plan[static_cast<size_t>(node.site)];
        if (ps < 0) {
          ps = static_cast<int32_t>(plan->sites.size());
          plan->sites.push_back(SitePlan{graph->sites[static_cast<size_t>(node.site)], {}, {}});
        }
        auto& sp = plan->sites[static_cast<size_t>(ps)];
        if (node.repeats()) sp.repeating.push_back(static_cast<int32_t>(i));
        else sp.requests.emplace_back(node.iteration, static_cast<int32_t>(i));
        plan->site_of_node[i] = ps;
        plan->alias_root[i] = static_cast<int32_t>(i);
        break;
      }
      case Op::Call:
        if (!node.name.empty()) plan->ops[i] = resolve_op(node.name);
        break;
      case Op::Stop:
        plan->stops.push_back(static_cast<int32_t>(i));
        break;
      case Op::Cond:
        open_conds.push_back(static_cast<int32_t>(i));
        break;
      case Op::EndCond:
        plan->branch_end[static_cast<size_t>(open_conds.back())] = static_cast<int32_t>(i);
        open_conds.pop_back();
        break;
      default:
        break;
    }
    const Arg* first = node.args.empty() ? nullptr : &node.args[0];
    if (node.op != Op::Site && first && first->kind == Arg::Kind::Ref && is_view_op(node.op, node.name)) {
      plan->alias_root[i] = plan->alias_root[static_cast<size_t>(first->ref)];
    }
    plan->inplace[i] = is_inplace_op(node.op, node.name) ? 1 : 0;
  }
  plan->deps_begin.push_back(static_cast<int32_t>(plan->deps.size()));
  for (auto& sp : plan->sites) {
    std::stable_sort(sp.requests.begin(), sp.requests.end(),
                     [](const auto& a, const auto& b) { return a.first < b.first; });
  }
  plan->graph = std::move(graph);
  return plan;
}

}  // namespace fastinterleave
