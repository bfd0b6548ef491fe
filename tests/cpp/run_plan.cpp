// Reruns, with no Python, a graph recorded and compiled by the Python tests:
// loads a TorchScript Sequential, calls its children in order, fires their
// sites into the engine, and compares the saved values with the ones the
// Python run produced.
//
//   run_plan GRAPH MODEL DATA
//   DATA: tensors "input" and "saved.<node>" (expected values)
#include <fastinterleave/compiler.h>
#include <fastinterleave/scheduler.h>
#include <fastinterleave/serialize.h>

#include <torch/script.h>

#include <iostream>

using namespace fastinterleave;
using c10::IValue;

namespace {

int32_t find_site(const Plan& plan, const std::string& module, HookKind kind) {
  for (size_t i = 0; i < plan.sites.size(); ++i) {
    if (plan.sites[i].key.module == module && plan.sites[i].key.kind == kind) return static_cast<int32_t>(i);
  }
  return -1;
}

// Fires an Input site with the (args, kwargs) pair the hook would see.
at::Tensor fire_input(Run& run, int32_t site, const at::Tensor& x) {
  if (site < 0) return x;
  IValue pair(c10::ivalue::Tuple::create(
      {IValue(c10::ivalue::Tuple::create({IValue(x)})),
       IValue(c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get()))}));
  run.fire(site, pair);
  return pair.toTupleRef().elements()[0].toTupleRef().elements()[0].toTensor();
}

at::Tensor fire_output(Run& run, int32_t site, const at::Tensor& y) {
  if (site < 0) return y;
  IValue v(y);
  run.fire(site, v);
  return v.toTensor();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: run_plan GRAPH MODEL DATA\n";
    return 2;
  }
  try {
    auto plan = compile(std::make_shared<Graph>(load_graph(argv[1])));
    torch::jit::Module model = torch::jit::load(argv[2]);
    model.eval();
    at::Tensor x;
    std::vector<std::pair<int32_t, at::Tensor>> expected;
    for (auto& [name, t] : deserialize_tensors(read_file(argv[3]))) {
      if (name == "input") x = t;
      else if (name.rfind("saved.", 0) == 0) expected.emplace_back(std::stoi(name.substr(6)), t);
    }
    Run run(plan, {});
    torch::NoGradGuard no_grad;
    try {
      run.begin();
      x = fire_input(run, find_site(*plan, "", HookKind::Input), x);
      for (const auto& child : model.named_children()) {
        x = fire_input(run, find_site(*plan, child.name, HookKind::Input), x);
        torch::jit::Module sub = child.value;
        x = sub.forward({x}).toTensor();
        x = fire_output(run, find_site(*plan, child.name, HookKind::Output), x);
      }
      x = fire_output(run, find_site(*plan, "", HookKind::Output), x);
      run.end();
    } catch (const EarlyStop&) {
      run.end_stopped();
    }
    int bad = 0;
    for (const auto& [node, want] : expected) {
      at::Tensor got = run.value(node).toTensor();
      const bool ok = got.sizes() == want.sizes() && at::allclose(got, want, 1e-5, 1e-6);
      std::cout << "node " << node << ": " << (ok ? "same" : "DIFFERENT") << " " << got.sizes() << "\n";
      bad += ok ? 0 : 1;
    }
    std::cout << expected.size() - static_cast<size_t>(bad) << " of " << expected.size() << " saved values match\n";
    return bad ? 1 : 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
