// Running an intervention recorded in Python inside a TorchScript model, from
// C++ with no Python: load a graph file (written by `tracer.export(path)`),
// attach it to a torch::jit::Module, run, read the saved values by name.
//
//   auto steer = fastinterleave::Intervention::load("steer.fig");
//   fastinterleave::ScriptModel model(torch::jit::load("gpt2.pt"), "model");
//   fastinterleave::Result r = model.run(*steer, {ids});
//   at::Tensor logits = r.output.toTensor();
//   at::Tensor h = r.tensor("h");
//
// How: attach() rewrites the TorchScript graphs of the model's code so that
// each call of an intercepted submodule passes its inputs / output through the
// op fastinterleave::tap, which hands them to the engine while a run() is
// active on the calling thread and returns at once otherwise. A graph belongs
// to a module's class, which every instance of it shares (h.0 and h.1 of a
// scripted model), so the tap tells instances apart by the module object it
// is given.
#pragma once

#include <fastinterleave/compiler.h>
#include <fastinterleave/serialize.h>

#include <torch/csrc/jit/api/module.h>

#include <memory>
#include <optional>
#include <set>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fastinterleave {

// A graph file, loaded and compiled. Immutable: share it between threads and runs.
class Intervention {
 public:
  // Throw std::invalid_argument for a file that is not a valid graph file
  // (see docs/graph-format.md); a bad file never makes them read out of bounds.
  static std::shared_ptr<const Intervention> load(const std::string& path);
  static std::shared_ptr<const Intervention> from_bytes(const std::string& bytes);
  explicit Intervention(GraphFile file);

  const Graph& graph() const { return *plan_->graph; }
  const std::shared_ptr<const Plan>& plan() const { return plan_; }
  // The names the exporter gave saved values, in file order.
  const SavedNames& names() const { return names_; }
  // The node a name refers to; throws (TORCH_CHECK) for an unknown name.
  int32_t node(const std::string& name) const;
  // The recorded structure of a graph site's value, or nullptr.
  const ValueStructure* structure(int32_t graph_site) const;

 private:
  std::shared_ptr<const Plan> plan_;
  SavedNames names_;
  std::vector<std::optional<ValueStructure>> structures_;
};

// What one run gives back.
struct Result {
  c10::IValue output;    // the model's output with the intervention applied (None if stop() ended the run)
  bool stopped = false;  // stop() ended the forward pass
  std::vector<std::pair<std::string, c10::IValue>> saved;  // named saved values that were set, in file order
  std::unordered_map<int32_t, c10::IValue> nodes;          // every saved value that was set, by node

  bool has(const std::string& name) const;
  // A named saved value; throws (TORCH_CHECK) when the name is unknown or the
  // value was never set (e.g. stop() ended the run before it).
  const c10::IValue& at(const std::string& name) const;
  at::Tensor tensor(const std::string& name) const;
};

// A TorchScript module prepared to run interventions. It runs its own copy of
// the module's code (parameters shared, not copied): the module passed in is
// left as it was.
class ScriptModel {
 public:
  // `prefix`: the submodule the graph's module paths are relative to: "" for
  // the root, "model" when the traced module holds the recorded Python model
  // as `self.model` (a wrapper fixing the call's keywords).
  explicit ScriptModel(torch::jit::Module module, std::string prefix = "");
  ScriptModel(const ScriptModel&) = delete;
  ScriptModel& operator=(const ScriptModel&) = delete;

  // Makes the intervention's sites intercepted (run() does it when needed;
  // call it first to keep the first run fast). Throws (TORCH_CHECK) when a
  // site's module is not in the model or its code never calls it.
  void attach(const Intervention& intervention);
  // module.forward(inputs) with the intervention applied. With several
  // invokes, `inputs` must be their batch as Python built it (rows in invoke
  // order along the first dimension). Several threads may run at once.
  Result run(const Intervention& intervention, std::vector<c10::IValue> inputs);
  // module.forward(inputs), no intervention.
  c10::IValue forward(std::vector<c10::IValue> inputs);

  const torch::jit::Module& module() const { return module_; }
  const std::string& prefix() const { return prefix_; }

 private:
  // (module path relative to the prefix, hook kind)
  using Tap = std::pair<std::string, HookKind>;
  std::vector<Tap> taps_for(const Intervention& intervention) const;
  void rebuild();  // holds mutex_ exclusively

  torch::jit::Module base_;    // the module given; its code is never changed
  torch::jit::Module module_;  // what runs: base_, or a copy whose code calls the tap
  std::string prefix_;
  // Module paths (relative to the prefix) -> the objects of module_ at them.
  std::unordered_map<std::string, const c10::ivalue::Object*> objects_;
  std::set<Tap> tapped_;
  mutable std::shared_mutex mutex_;
};

}  // namespace fastinterleave
