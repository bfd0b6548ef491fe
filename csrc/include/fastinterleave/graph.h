// The recorded intervention graph: what the Python front (or a graph file) hands
// the engine. Plain C++ + libtorch; no Python anywhere in the engine.
#pragma once

#include <ATen/core/ivalue.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fastinterleave {

// What a node does. Values are stable: they are written to graph files.
enum class Op : uint8_t {
  Site = 0,     // read a module's input/output at one call, for one invoker
  Swap = 1,     // args[0] = Ref(Site or Grad node), args[1] = new value: replace that value
  Call = 2,     // ATen op `name` (with an optional Python fallback `py_fn`), or py_fn alone
  GetItem = 3,  // args[0][args[1]]
  SetItem = 4,  // args[0][args[1]] = args[2], in place
  GetAttr = 5,  // getattr(args[0], name)
  Stop = 6,     // end the forward pass early (tracer.stop())
  Identity = 7, // args[0] itself (a value made from constants, e.g. nnsight.list())
  Grad = 8,     // the gradient reaching args[0] in the next backward pass (set when it runs)
  Cond = 9,     // opens a branch: runs the nodes up to its EndCond if args[0] is true;
                // name "else": args[0] = Ref(previous Cond of the chain), args[1] = condition or None
  EndCond = 10, // closes the innermost open Cond
  kCount = 11,
};

// Which hook of a module a site belongs to.
enum class HookKind : uint8_t {
  Output = 0,  // forward hook: value = the module's output
  Input = 1,   // forward pre-hook: value = (args tuple, kwargs dict)
};

// A Site node's view of its hook value.
enum class Projection : uint8_t {
  Whole = 0,     // the whole value (output, or the (args, kwargs) pair)
  FirstArg = 1,  // args[0] of an Input hook (nnsight's `.input`)
};

// An argument: a reference to an earlier node, a constant, or a container /
// index expression built of them. Index expressions (slices, Ellipsis) only
// make sense to GetItem/SetItem and to the Python fallback.
struct Arg {
  enum class Kind : uint8_t { Ref = 0, Const = 1, Tuple = 2, List = 3, Dict = 4, Slice = 5, Ellipsis = 6 };
  Kind kind = Kind::Const;
  int32_t ref = -1;                // Ref: node index
  c10::IValue value;               // Const (None for a None constant)
  std::vector<Arg> items;          // Tuple/List/Dict values; Slice: start, stop, step
  std::vector<std::string> keys;   // Dict keys

  static Arg make_ref(int32_t node) { Arg a; a.kind = Kind::Ref; a.ref = node; return a; }
  static Arg make_const(c10::IValue v) { Arg a; a.kind = Kind::Const; a.value = std::move(v); return a; }
  static Arg make_seq(Kind k, std::vector<Arg> items) { Arg a; a.kind = k; a.items = std::move(items); return a; }
};

// Node::iter_stop values that are not a bound.
constexpr int32_t kSingleCall = -2;  // only call `iteration`
constexpr int32_t kUnbounded = -1;   // every call from `iteration` on (.all())

struct Node {
  Op op = Op::Call;
  std::string name;                                   // Call: ATen op name; GetAttr: attribute
  std::vector<Arg> args;
  std::vector<std::pair<std::string, Arg>> kwargs;
  int32_t site = -1;        // Site: index into Graph::sites
  int32_t iteration = 0;    // Site: which call of the module (0 = first), or the first of several
  // Site: the calls it reads: kSingleCall, kUnbounded, or an exclusive stop
  // (calls [iteration, iter_stop)). A non-empty iter_list names them instead
  // (sorted). A Site reading several calls binds at each, and the nodes run
  // after it run again for each.
  int32_t iter_stop = kSingleCall;
  std::vector<int32_t> iter_list;
  int32_t invoker = 0;      // which invoke recorded it (Site: whose batch slice it sees; -1: the whole batch)
  Projection projection = Projection::Whole;
  int32_t py_fn = -1;       // Python fallback callable (binding layer's table), -1: none
  int32_t line = -1;        // index into Graph::lines, -1: unknown
  bool saved = false;       // .save(): the value outlives the run

  bool repeats() const { return iter_stop != kSingleCall || !iter_list.empty(); }
  bool reads_call(int32_t call) const;
  // The last call it reads, or kUnbounded.
  int32_t last_call() const;
};

struct SiteKey {
  std::string module;       // module path, "" for the root module
  HookKind kind = HookKind::Output;
  bool operator==(const SiteKey&) const = default;
};

// One invoke's rows of the batch.
struct InvokerSlice {
  int64_t start = 0;
  int64_t size = 0;
};

struct Graph {
  std::vector<Node> nodes;            // in recording order
  std::vector<SiteKey> sites;         // distinct hook sites the nodes refer to
  std::vector<InvokerSlice> invokers; // batch layout; one invoker: no narrowing
  int64_t batch_size = 0;             // total rows of the batched input
  std::vector<std::string> lines;     // user source lines, for messages

  // Index of `key` in `sites`, appending it if new.
  int32_t site_index(const SiteKey& key);
  // "file.py:12: a[:, 3] = 0" for node i, or "node i" when its line is unknown.
  std::string describe(int32_t node) const;
  // Checks indices, references (to earlier nodes only), site / invoker ranges.
  // Throws std::invalid_argument naming the first bad node.
  void validate() const;
};

const char* op_name(Op op);

}  // namespace fastinterleave
