// The scheduler: runs a compiled plan while the model's forward pass fires its
// hook sites, with nnsight 0.4.11's ordering rules, batch-slice dispatch and
// frees after last use.
#pragma once

#include <fastinterleave/compiler.h>

#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace fastinterleave {

// Raised (and caught by whoever runs the forward) when a Stop node runs.
class EarlyStop : public std::exception {
 public:
  const char* what() const noexcept override { return "fastinterleave: stop() ended the forward pass"; }
};

// A user-visible error tied to graph nodes (so the front can name their lines).
class NodeError : public std::runtime_error {
 public:
  enum class Kind {
    Failed,           // the node's operation raised: `cause` holds the original exception
    IneffectiveEdit,  // an edit of a site's value that runs after the module consumed it
    NeverFired,       // a requested site was never reached by the forward pass
    NoFallback,       // the node needs Python and the fallback is off / absent
    Unsupported,      // the engine cannot run this node on this value
  };
  NodeError(Kind kind, int32_t node, int32_t other, const std::string& message,
            std::exception_ptr cause = nullptr)
      : std::runtime_error(message), kind(kind), node(node), other(other), cause(std::move(cause)) {}
  Kind kind;
  int32_t node;
  int32_t other;   // a second node involved (e.g. the access the edit waited for), or -1
  std::exception_ptr cause;
};

// An argument tree with every Ref replaced by its value (Kind::Const).
using ResolvedArgs = std::vector<Arg>;
using ResolvedKwargs = std::vector<std::pair<std::string, Arg>>;
// Runs a node the engine cannot (a Python callable); installed by the binding layer.
using Fallback = std::function<c10::IValue(const Node&, const ResolvedArgs&, const ResolvedKwargs&)>;

class Run {
 public:
  struct Options {
    Fallback fallback;          // empty: no Python available
    bool allow_fallback = true; // false: nodes needing the fallback raise
  };
  Run(std::shared_ptr<const Plan> plan, Options options);
  ~Run();
  Run(const Run&) = delete;
  Run& operator=(const Run&) = delete;

  const Plan& plan() const { return *plan_; }

  // Runs the nodes that need no site (recorded before the first site access).
  void begin();

  // A hook site fired with `value` (for Output hooks the module output, for
  // Input hooks the (args tuple, kwargs dict) pair). Returns true when `value`
  // was replaced by a swap. Cheap when the site has nothing at this call.
  bool fire(int32_t site, c10::IValue& value);
  // Whether the site's next call has requests (so the hook must convert and
  // fire); when not, skip_call() just counts the call.
  bool pending(int32_t site) const;
  void skip_call(int32_t site) {
    check_site(site);
    ++calls_[static_cast<size_t>(site)];
  }
  // Throws std::out_of_range for a site index the plan does not have.
  void check_site(int32_t site) const;

  // Whether hooks should ignore fires right now (the run finished). A module
  // called by a running node (`envoy(x, hook=True)`) fires as any call does.
  bool paused() const { return finished_; }

  // The forward pass returned: every request must have fired. Throws NodeError
  // (NeverFired) otherwise.
  void end();
  // The forward pass was ended by a Stop node.
  void end_stopped();
  bool stopped() const { return stopped_; }

  bool done(int32_t node) const {
    return node >= 0 && static_cast<size_t>(node) < done_.size() && done_[static_cast<size_t>(node)] != 0;
  }
  bool has_value(int32_t node) const;
  // The node's value (batch-sliced for its invoker). Throws if unset or freed.
  c10::IValue value(int32_t node);
  // How many times each plan site fired so far.
  int32_t calls(int32_t site) const {
    check_site(site);
    return calls_[static_cast<size_t>(site)];
  }

  // Drops every value held (saved ones included).
  void release();

 private:
  struct Slot {
    c10::IValue value;
    int64_t start = 0, size = -1;  // size >= 0: narrow batch-sized leaves to [start, start + size) on use
    bool set = false;
    bool narrowed = false;         // `value` is narrowed already; `base` is the full value
    c10::IValue base;
    bool lazy() const { return size >= 0 && !narrowed; }
  };
  struct GradHook {
    at::Tensor tensor;
    unsigned handle;
  };

  void execute_from(int32_t first);
  void execute(int32_t node);
  // Index assignments into an invoke's rows of a batch tensor wait while the
  // next nodes to run are more such writes into other rows of the same tensor
  // (the same edit in every invoke, typically); then they run as one write
  // (write_rows). Anything else that runs, or the hook returning, flushes them.
  bool defer_write(int32_t node, const Arg& index, const c10::IValue& item);
  void flush_writes();
  void consume(int32_t node);
  c10::IValue materialize(Slot& slot);
  c10::IValue ref_value(int32_t node);
  Arg resolve(const Arg& a);
  void check_window(int32_t node);
  c10::IValue run_call(int32_t node);
  c10::IValue run_fallback(int32_t node);
  int32_t next_undone(int32_t i);
  void reset_body(int32_t node);
  bool deps_done(int32_t node) const;
  bool run_on_demand(int32_t node);
  bool reads_skipped(int32_t node) const;
  void skip(int32_t node);
  bool branch_taken(int32_t node);
  void arm_grad(int32_t node);
  at::Tensor on_grad(int32_t node, const at::Tensor& grad, int64_t start, int64_t size);
  void remove_grad_hooks();
  c10::IValue apply_swap(const c10::IValue& current, int32_t site_node, const c10::IValue& replacement);

  std::shared_ptr<const Plan> plan_;
  Options options_;
  const Graph& graph_;
  int64_t batch_size_;
  bool sliced_;
  std::vector<Slot> slots_;
  std::vector<uint8_t> done_;
  std::vector<int32_t> remaining_uses_;
  std::vector<int32_t> skip_;          // union-find: next node that may be undone
  std::vector<uint8_t> window_open_;   // Site nodes: their hook is running
  std::vector<int32_t> calls_;         // per plan site
  std::vector<size_t> cursor_;         // per plan site: next request to look at
  std::vector<std::pair<int32_t, c10::IValue>> pending_swaps_;
  struct PendingWrites {
    at::Tensor batch;
    std::vector<RowWrite> writes;
    int32_t first_node = -1;  // named by an error of the joined write
    int64_t end_row = 0;  // the end of the rows written so far
    void clear() { *this = PendingWrites{}; }
  } writes_;
  // Repeating sites (.all(), .iter[...]): the nodes run after each binding,
  // reset and run again at the next call they read.
  std::unordered_map<int32_t, std::vector<int32_t>> bodies_;
  int32_t recording_body_ = -1;
  int32_t defer_frees_ = 0;            // > 0: a body will run again, keep what it reads
  std::vector<uint8_t> armed_;         // Grad nodes: hook registered
  std::vector<uint8_t> in_progress_;   // nodes executing now (nested by backward hooks)
  std::vector<uint8_t> skipped_;       // done without running: a branch not taken, or reads such a node
  // run_on_demand's and reset_body's marks: all 0 between uses (neither runs a
  // node while its marks are set, so a nested firing never sees them).
  std::vector<uint8_t> scratch_;
  std::vector<GradHook> grad_hooks_;
  int32_t grad_depth_ = 0;             // > 0: inside a backward hook, gradient readers may run
  int32_t firing_node_ = -1;           // the Site node whose hook is running
  int32_t running_node_ = -1;
  bool stopped_ = false;
  bool finished_ = false;
};

}  // namespace fastinterleave
