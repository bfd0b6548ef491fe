"""Activation patching with fastinterleave: a whole sweep in one trace.

What this example shows
-----------------------
We take a small GPT-2-shaped model (random weights, nothing is downloaded), a
"clean" token sequence and a "corrupted" one that differs in a single position.
Activation patching asks: if we copy the clean run's residual stream at
(layer, position) into the corrupted run, how much of the clean behaviour comes
back? We measure that with a normalized logit difference at the last position:
0 = the corrupted run, 1 = the clean run.

With fastinterleave (``import fastinterleave as nnsight`` works for nnsight 0.4
code) the whole sweep is ONE trace and ONE forward pass:

    invoke 0          clean input, read every block output at every position
    invoke 1          corrupted input, no patch (the baseline)
    invoke 2, 3, ...  corrupted input, one (layer, position) patched with the
                      clean activation from invoke 0

The same sweep is then written by hand with plain PyTorch forward hooks on the
same batch; the two tables must agree (the script exits non-zero otherwise),
and both are timed.

Run:  .venv/bin/python examples/patching.py
"""

import statistics
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fastinterleave as nnsight

N_LAYERS = 4
SEQ_LEN = 12
VOCAB = 1000
CORRUPTED_POSITION = 4  # the one token that differs between the two inputs
REPEATS = 11


# -- set-up ------------------------------------------------------------------------


def build_model():
    """A 4-layer GPT-2 with random (seeded) weights.

    The weights are drawn ten times wider than GPT-2's default (0.2 instead of
    0.02) so that attention is sharp enough for one changed token to change the
    prediction; with the default, a random model barely looks back."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=N_LAYERS,
        n_embd=128,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        use_cache=False,
        initializer_range=0.2,
    )
    return GPT2LMHeadModel(config).eval()


def make_inputs():
    """A clean and a corrupted sequence of SEQ_LEN tokens, differing at one position."""
    generator = torch.Generator().manual_seed(2)
    clean = torch.randint(0, VOCAB, (1, SEQ_LEN), generator=generator)
    corrupted = clean.clone()
    corrupted[0, CORRUPTED_POSITION] = (clean[0, CORRUPTED_POSITION] + 1) % VOCAB
    return clean, corrupted


def pick_metric_tokens(model, clean, corrupted):
    """The clean run's top next token and the corrupted run's top next token."""
    with torch.no_grad():
        clean_top = model(clean).logits[0, -1].argmax().item()
        corrupted_top = model(corrupted).logits[0, -1].argmax().item()
    if clean_top == corrupted_top:
        sys.exit("clean and corrupted runs predict the same token: pick other inputs")
    return clean_top, corrupted_top


def logit_diff(last_logits, clean_token, corrupted_token):
    """logit(clean token) - logit(corrupted token), one value per row."""
    return last_logits[:, clean_token] - last_logits[:, corrupted_token]


def effect_table(last_logits, clean_token, corrupted_token):
    """Rows: clean, corrupted baseline, then one per (layer, position) patch.

    Returns a (layers x positions) tensor: 0 = corrupted baseline, 1 = clean."""
    diff = logit_diff(last_logits, clean_token, corrupted_token)
    clean_diff, corrupted_diff, patched = diff[0], diff[1], diff[2:]
    normalized = (patched - corrupted_diff) / (clean_diff - corrupted_diff)
    return normalized.reshape(N_LAYERS, SEQ_LEN)


# -- the sweep with fastinterleave ---------------------------------------------------------


def sweep_fastinterleave(model, clean, corrupted):
    """One trace: a clean invoke, a baseline invoke, and one invoke per patch.

    Returns the last-position logits of every invoke, stacked in that order."""
    blocks = model.transformer.h
    last_logits = []
    with model.trace() as tracer:
        with tracer.invoke(clean):
            clean_acts = {}  # (layer, pos) -> the clean block output there
            for layer in range(N_LAYERS):
                for pos in range(SEQ_LEN):
                    clean_acts[layer, pos] = blocks[layer].output[0][:, pos]
            last_logits.append(model.lm_head.output[:, -1].save())

        with tracer.invoke(corrupted):
            last_logits.append(model.lm_head.output[:, -1].save())

        for layer in range(N_LAYERS):
            for pos in range(SEQ_LEN):
                with tracer.invoke(corrupted):
                    blocks[layer].output[0][:, pos] = clean_acts[layer, pos]
                    last_logits.append(model.lm_head.output[:, -1].save())

    # The proxies sit in a list, so we read their values with `.value`.
    return torch.cat([proxy.value for proxy in last_logits])


# -- the same sweep with plain PyTorch hooks ------------------------------------------------


def sweep_plain_hooks(model, clean, corrupted):
    """The same rows in one batched forward, patched by hand-written forward hooks.

    Row 0 is clean, row 1 the corrupted baseline, row 2 + layer * SEQ_LEN + pos
    the corrupted input with (layer, pos) patched from row 0."""
    n_patches = N_LAYERS * SEQ_LEN
    batch = torch.cat([clean, corrupted, corrupted.expand(n_patches, -1)])

    def make_hook(layer):
        def hook(module, inputs, output):
            hidden = output[0]
            for pos in range(SEQ_LEN):
                row = 2 + layer * SEQ_LEN + pos
                hidden[row, pos] = hidden[0, pos]

        return hook

    handles = [block.register_forward_hook(make_hook(layer)) for layer, block in enumerate(model.transformer.h)]
    try:
        logits = model(batch).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits[:, -1]


# -- timing and printing ----------------------------------------------------------------


def median_ms(fn, *args):
    """Median wall time of fn(*args) in milliseconds, after one warm-up call."""
    fn(*args)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def print_table(table):
    print("Effect of patching the clean block output into the corrupted run")
    print("(0 = corrupted baseline, 1 = clean; position marked * is the corrupted token)\n")
    header = "".join(f"{pos:>6}{'*' if pos == CORRUPTED_POSITION else ' '}" for pos in range(SEQ_LEN))
    print(f"{'position':>9} {header}")
    for layer in range(N_LAYERS):
        cells = "".join(f"{table[layer, pos].item():>6.2f} " for pos in range(SEQ_LEN))
        print(f"{'layer ' + str(layer):>9} {cells}")
    print("\nPositions before the corrupted token never matter (attention is causal); block 0")
    print("has already carried the corruption onward, so the last position carries most of it.\n")


def main():
    torch.set_num_threads(1)
    raw_model = build_model()
    model = nnsight.NNsight(raw_model)
    clean, corrupted = make_inputs()
    clean_token, corrupted_token = pick_metric_tokens(raw_model, clean, corrupted)
    print(f"clean tokens:     {clean[0].tolist()}")
    print(f"corrupted tokens: {corrupted[0].tolist()}")
    print(f"metric: logit[{clean_token}] - logit[{corrupted_token}] at the last position\n")

    with torch.no_grad():
        fi_logits = sweep_fastinterleave(model, clean, corrupted)
        hook_logits = sweep_plain_hooks(raw_model, clean, corrupted)

    fi_table = effect_table(fi_logits, clean_token, corrupted_token)
    hook_table = effect_table(hook_logits, clean_token, corrupted_token)
    print_table(fi_table)

    try:
        torch.testing.assert_close(fi_logits, hook_logits)
        torch.testing.assert_close(fi_table, hook_table)
    except AssertionError as e:
        print(f"MISMATCH between fastinterleave and plain hooks:\n{e}")
        sys.exit(1)
    print("fastinterleave and plain hooks agree (torch.testing.assert_close)\n")

    with torch.no_grad():
        fi_ms = median_ms(sweep_fastinterleave, model, clean, corrupted)
        hook_ms = median_ms(sweep_plain_hooks, raw_model, clean, corrupted)
    n_invokes = 2 + N_LAYERS * SEQ_LEN
    print(
        f"fastinterleave: {fi_ms:.1f} ms per sweep (one trace, {n_invokes} invokes)   "
        f"plain hooks: {hook_ms:.1f} ms   ratio {fi_ms / hook_ms:.2f}x"
    )


if __name__ == "__main__":
    main()
