"""Makes the two files examples/cpp/steer runs: a TorchScript GPT-2-shaped model and
an intervention recorded on it in Python.

    .venv/bin/python examples/cpp/make_files.py OUT_DIR

writes OUT_DIR/gpt2.pt (the model, traced) and OUT_DIR/steer.fig (the graph), and
prints the values the Python run gave, for comparison with what the C++ program
prints. The intervention, in two invokes batched into one forward pass:

    invoke 0 (prompt A)  save block 1's output[0] (a block returns a tuple) and
                         the output of the MLP inside block 1
    invoke 1 (prompt B)  add a steering vector to the output of block 1's MLP,
                         zero one neuron of block 0's MLP (an ablation), save
                         block 1's output[0] and the last position's logits

The model has random weights (nothing is downloaded). HF models cannot be
torch.jit.script-ed; torch.jit.trace of a wrapper fixing the call's keywords
works, and the C++ side then names the wrapped model's submodules with the
prefix "model" (ScriptModel(module, "model")).
"""

import sys
import warnings
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fastinterleave as nnsight

SEQ_LEN = 8


def token_ids():
    """Two prompts of SEQ_LEN tokens (examples/cpp/steer.cpp builds the same)."""
    t = torch.arange(SEQ_LEN)
    return torch.stack([(7 * t + 13 * b + 1) % 100 for b in range(2)])


class Traceable(torch.nn.Module):
    """What torch.jit.trace records: the model called with fixed keywords."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False, return_dict=False)[0]


def main(out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
                        use_cache=False)  # record with the keywords the traced model runs with
    net = GPT2LMHeadModel(config).eval()
    ids = token_ids()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace / save are deprecated, and still the way for HF models
        torch.jit.save(torch.jit.trace(Traceable(net), ids), str(out_dir / "gpt2.pt"))

    model = nnsight.NNsight(net)
    steer = torch.linspace(-1, 1, config.n_embd)
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(ids[:1]):
            clean = model.transformer.h[1].output[0].save()
            clean_mlp = model.transformer.h[1].mlp.output.save()
        with tracer.invoke(ids[1:]):
            model.transformer.h[0].mlp.output[:, :, 5] = 0
            model.transformer.h[1].mlp.output = model.transformer.h[1].mlp.output + steer
            steered = model.transformer.h[1].output[0].save()
            last_logits = model.output.logits[:, -1].save()
    tracer.export(str(out_dir / "steer.fig"))

    with torch.no_grad():
        plain = net(ids).logits
    for name, value in [("clean", clean), ("clean_mlp", clean_mlp), ("steered", steered), ("last_logits", last_logits)]:
        print(f"python: {name} {tuple(value.shape)} sum {value.sum().item():.6f}")
    change = (tracer.output.logits - plain).abs().amax(dim=(1, 2))
    print("python: max |logit change| per prompt [" + ", ".join(f"{v:.6f}" for v in change.tolist()) + "]")
    print(f"wrote {out_dir / 'gpt2.pt'} and {out_dir / 'steer.fig'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/cpp/out")
