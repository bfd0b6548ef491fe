// The compiler: a recorded graph in, a flat execution plan out.
#pragma once

#include <fastinterleave/graph.h>
#include <fastinterleave/ops.h>

#include <memory>
#include <vector>

namespace fastinterleave {

// The requests at one hook site: which nodes bind its value, at which call.
struct SitePlan {
  SiteKey key;
  // Requests for one call: (call index, node), sorted by call, then recording order.
  std::vector<std::pair<int32_t, int32_t>> requests;
  // Requests for several calls (.all(), .iter[...]), in recording order.
  std::vector<int32_t> repeating;
};

// Everything the scheduler needs, as flat arrays indexed by node.
struct Plan {
  std::shared_ptr<const Graph> graph;
  std::vector<SitePlan> sites;          // only the sites with requests (hooks go there only)
  std::vector<int32_t> site_of_node;    // Site nodes: index into `sites`; others -1
  // Distinct nodes each node reads (CSR).
  std::vector<int32_t> deps_begin;      // size n + 1
  std::vector<int32_t> deps;
  std::vector<int32_t> use_count;       // how many nodes read each node's value
  std::vector<uint8_t> keep;            // saved: never freed
  std::vector<int32_t> alias_root;      // the Site node whose value this node may share storage with, or -1
  // Site nodes: the last node reading this site's value or a view of it (-1:
  // none). An edit that runs after the module used the value is dead only when
  // no node recorded after the edit reads it.
  std::vector<int32_t> last_alias_read;
  std::vector<uint8_t> inplace;         // writes into its first argument (or, for Swap, its site)
  std::vector<const OpCandidates*> ops; // Call nodes: resolved ATen overloads, or nullptr
  std::vector<int32_t> stops;           // Stop nodes
  std::vector<uint8_t> after_grad;      // reads a gradient: waits for a backward pass
  std::vector<int32_t> branch_end;      // Cond nodes: index of their EndCond
  // The innermost Cond whose branch holds the node, or -1. Every node of a
  // branch but its Site nodes reads that Cond (a dependency): it runs only once
  // the condition is known, and not at all in a branch not taken.
  std::vector<int32_t> enclosing_cond;

  size_t size() const { return use_count.size(); }
};

// Validates and compiles. Throws std::invalid_argument for a malformed graph.
std::shared_ptr<const Plan> compile(std::shared_ptr<const Graph> graph);

}  // namespace fastinterleave
