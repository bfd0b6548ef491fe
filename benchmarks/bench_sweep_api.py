"""The sweep API against the same activation-patching sweep written three other ways.

Every layer x every position of a GPT-2-shaped model with random weights (seq 16, one
clean / corrupted pair): gpt2-tiny (4 x 16 = 64 patches) and gpt2-small's shape
(12 x 16 = 192 patches). Each approach computes the same table: the logit difference
of two tokens at the last position for every patched run, plus the clean and the
corrupted (baseline) runs.

  sweep API     fastinterleave.sweep.run(...), default packing (one forward pass here)
  loop          one trace for the clean activations, then one trace per patch
  hand-packed   one trace: a clean invoke, a baseline invoke, one invoke per patch
                (examples/patching.py), as many rows per forward as the sweep API used
  raw hooks     plain register_forward_hook hooks, one batched forward of the same rows
                (clean row, baseline row, one row per patch; each layer's hook writes all
                of its rows with one indexed assignment): the floor

Values are checked equal before timing. Times are medians of interleaved repetitions,
one intra-op thread; the target is sweep API <= 1.05x raw hooks.

Run: .venv/bin/python benchmarks/bench_sweep_api.py [--quick]   (~10 min; --quick ~3 min)
"""

import gc
import statistics
import sys
import time

import torch

torch.set_num_threads(1)

import fastinterleave as nnsight  # noqa: E402
from fastinterleave import sweep  # noqa: E402

SEQ = 16
SHAPES = {
    "gpt2-tiny": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=1000),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
}


def build(shape):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(**SHAPES[shape], n_positions=64, use_cache=False)
    return GPT2LMHeadModel(config).eval()


def val(x):
    """A saved value: top-level locals are the value after a trace, proxies in lists give .value."""
    return x if isinstance(x, torch.Tensor) else x.value


def approaches(net, clean, corrupted, good, bad, rows_per_forward):
    model = nnsight.NNsight(net)
    blocks = list(net.transformer.h)
    n_layers = len(blocks)
    runs = [(layer, pos) for layer in range(n_layers) for pos in range(SEQ)]
    metric = sweep.logit_diff(good, bad)

    def table(diffs):
        """(reference, baseline, [layer, position]) from the metric of each row."""
        return diffs[0], diffs[1], diffs[2:].reshape(n_layers, SEQ)

    def api():
        res = sweep.run(model, clean=clean, corrupted=corrupted, sites=sweep.Sites("transformer.h.*", positions="each"),
                        intervention=sweep.Patch(), metric=metric, progress=False)
        return res.reference, res.baseline, res.values

    def loop():
        with torch.no_grad():
            with model.trace(clean):
                acts = [model.transformer.h[layer].output[0].save() for layer in range(n_layers)]
                ref = model.output.logits[:, -1].save()
            with model.trace(corrupted):
                base = model.output.logits[:, -1].save()
            out = []
            for layer, pos in runs:
                with model.trace(corrupted):
                    model.transformer.h[layer].output[0][:, pos] = val(acts[layer])[:, pos]
                    logits = model.output.logits[:, -1].save()
                out.append(logits)
        last = torch.cat([val(ref), val(base)] + [val(x) for x in out])
        return table(last[:, good] - last[:, bad])

    per_forward = rows_per_forward - 2

    def hand_packed():
        lasts = []
        with torch.no_grad():
            for start in range(0, len(runs), per_forward):
                chunk = runs[start:start + per_forward]
                saved = []
                with model.trace() as tracer:
                    with tracer.invoke(clean):
                        # Slices taken here (as in examples/patching.py): an edit in a later
                        # invoke may only use nodes recorded before the next module access.
                        acts = {(layer, pos): model.transformer.h[layer].output[0][:, pos] for layer, pos in chunk}
                        if start == 0:
                            saved.append(model.output.logits[:, -1].save())
                    if start == 0:
                        with tracer.invoke(corrupted):
                            saved.append(model.output.logits[:, -1].save())
                    for layer, pos in chunk:
                        with tracer.invoke(corrupted):
                            model.transformer.h[layer].output[0][:, pos] = acts[layer, pos]
                            saved.append(model.output.logits[:, -1].save())
                lasts.extend(val(p) for p in saved)
        last = torch.cat(lasts)
        return table(last[:, good] - last[:, bad])

    def raw_hooks():
        """Rows: clean, baseline, then the patches; hooks copy the clean row's values."""
        diffs = []
        with torch.no_grad():
            for start in range(0, len(runs), per_forward):
                chunk = runs[start:start + per_forward]
                first = 2 if start == 0 else 1  # the clean row (+ the baseline row in chunk 0)
                batch = torch.cat([clean] + ([corrupted] if start == 0 else []) + [corrupted] * len(chunk))
                handles = []
                for layer in range(n_layers):
                    rows = [first + i for i, (ll, _) in enumerate(chunk) if ll == layer]
                    if not rows:
                        continue
                    r = torch.tensor(rows)
                    p = torch.tensor([chunk[i - first][1] for i in rows])

                    def hook(module, args, output, r=r, p=p):
                        output[0][r, p] = output[0][0, p]

                    handles.append(blocks[layer].register_forward_hook(hook))
                try:
                    last = net(batch).logits[:, -1]
                finally:
                    for h in handles:
                        h.remove()
                d = last[:, good] - last[:, bad]
                diffs.append(d if start == 0 else d[1:])
        return table(torch.cat(diffs))

    return {"sweep API": api, "loop of traces": loop, "hand-packed invokes": hand_packed, "raw hooks": raw_hooks}


def timed(fns, reps, warmup=True):
    if warmup:
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def bench(shape, reps, skip=()):
    net = build(shape)
    gen = torch.Generator().manual_seed(1)
    vocab = net.config.vocab_size
    clean = torch.randint(0, vocab, (1, SEQ), generator=gen)
    corrupted = clean.clone()
    corrupted[0, 3] = (clean[0, 3] + 1) % vocab
    good, bad = 11, 22
    # The first sweep probes the model (the memory one row costs; cached from then on) and
    # chooses the packing; the hand-packed invokes and the raw hooks use the same rows.
    probe = sweep.run(net, clean=clean, corrupted=corrupted, sites=sweep.Sites("transformer.h.*", positions="each"),
                      metric=sweep.logit_diff(good, bad), progress=False)
    rows = probe.stats["max_rows"]
    fns = {k: v for k, v in approaches(net, clean, corrupted, good, bad, rows).items() if k not in skip}
    ref = fns["raw hooks"]()
    for name, fn in fns.items():  # every approach gives the same table (and is warmed up)
        got = fn()
        for g, r in zip(got, ref):
            torch.testing.assert_close(torch.as_tensor(g).reshape(r.shape), r, atol=2e-4, rtol=1e-4,
                                       msg=lambda m, name=name: f"{shape} {name}: {m}")
    times = timed(fns, reps, warmup=False)
    base = times["raw hooks"]
    n = net.config.n_layer * SEQ
    print(f"\n{shape}: {net.config.n_layer} layers x {SEQ} positions = {n} patches, "
          f"{probe.stats['forwards']} forward pass(es) of up to {rows} rows; median of {reps}")
    print(f"{'approach':<22}{'ms':>10}{'x raw hooks':>13}{'patches/s':>12}")
    for name, t in times.items():
        print(f"{name:<22}{t * 1e3:>10.1f}{t / base:>13.3f}{n / t:>12.0f}")
    for name in skip:
        print(f"{name:<22}{'(skipped with --quick)':>35}")
    return times


def main():
    quick = "--quick" in sys.argv
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    results = {
        # gpt2-tiny: ~0.15 s per sweep; gpt2-small: ~20 s per batched forward of 194 rows
        # on one thread (the loop of 192 traces ~60 s), so fewer repetitions there.
        "gpt2-tiny": bench("gpt2-tiny", 5 if quick else 15),
        "gpt2-small": bench("gpt2-small", 1 if quick else 3, skip=("loop of traces",) if quick else ()),
    }
    worst = max(r["sweep API"] / r["raw hooks"] for r in results.values())
    print(f"\ntarget sweep API <= 1.05x raw hooks: {'met' if worst <= 1.05 else 'NOT met'} (worst {worst:.3f}x)")


if __name__ == "__main__":
    main()
