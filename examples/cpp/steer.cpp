// Runs an intervention recorded in Python (examples/cpp/make_files.py) inside a
// TorchScript GPT-2-shaped model, with no Python: prints the saved values and
// how much the intervention changed the output.
//
//   steer MODEL.pt GRAPH.fig
#include <fastinterleave/torchscript.h>

#include <torch/script.h>

#include <iomanip>
#include <iostream>

namespace {

constexpr int64_t kSeqLen = 8;

// The two prompts make_files.py recorded the intervention on, batched.
at::Tensor token_ids() {
  at::Tensor t = at::arange(kSeqLen, at::kLong);
  return at::stack({(t * 7 + 1) % 100, (t * 7 + 14) % 100});
}

void print(const std::string& name, const at::Tensor& t) {
  std::cout << "c++:    " << name << " (";
  for (int64_t i = 0; i < t.dim(); ++i) std::cout << (i ? ", " : "") << t.size(i);
  std::cout << (t.dim() == 1 ? ",)" : ")") << " sum " << std::fixed << std::setprecision(6) << t.sum().item<double>()
            << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: steer MODEL.pt GRAPH.fig\n";
    return 2;
  }
  try {
    torch::NoGradGuard no_grad;
    // The graph file: recorded and exported in Python, checked as it loads.
    auto steer = fastinterleave::Intervention::load(argv[2]);
    // The traced wrapper holds the Python model as `self.model`: the graph's
    // module paths ("transformer.h.1.mlp") are relative to it.
    fastinterleave::ScriptModel model(torch::jit::load(argv[1]), "model");

    at::Tensor ids = token_ids();  // invoke 0's prompt, then invoke 1's
    at::Tensor plain = model.forward({ids}).toTensor();
    fastinterleave::Result result = model.run(*steer, {ids});

    for (const auto& [name, value] : result.saved) print(name, value.toTensor());
    at::Tensor change = (result.output.toTensor() - plain).abs().amax({1, 2});
    std::cout << "c++:    max |logit change| per prompt [" << std::setprecision(6) << change[0].item<double>()
              << ", " << change[1].item<double>() << "]\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
