"""Workload 4: an activation-patching sweep over gpt2-tiny: every layer x every position
(4 x 16 = 64 patched runs). Run (l, p) runs the corrupted prompt with block l's hidden
states at position p replaced by the clean prompt's, and keeps the last position's logits.

Each approach does it three ways: one trace (forward) per patch; 4 traces (forwards) of
16 invokes (rows); one trace (forward) of 64 invokes (rows). raw hooks batch the rows by
hand: one hook per layer writes all of that layer's rows with one indexed assignment.
Every time is reported as a ratio to raw hooks in one batch of 64, measured in the same
process.

Run alone: python benchmarks/bench_sweep.py [--quick]
"""

import sys

import torch

from common import NNSIGHT, bench, check_close, fi_wrap, gpt2, hidden, nn_wrap

SEQ = 16


def sweep_fns(net, corrupt, clean, wrapped):
    tup = net.block_tuple
    blocks = list(net.transformer.h)
    L = len(blocks)
    runs = [(l, p) for l in range(L) for p in range(SEQ)]  # 64, layer-major
    chunks = [runs[i:i + 16] for i in range(0, len(runs), 16)]
    head = net.lm_head

    def raw_batch(batch):
        """One forward of len(batch) rows; hooks patch every row of their layer at once."""
        n = len(batch)
        handles = []
        store = []
        for l in range(L):
            rows = [i for i, (ll, _) in enumerate(batch) if ll == l]
            if not rows:
                continue
            r = torch.tensor(rows)
            p = torch.tensor([batch[i][1] for i in rows])
            src = clean[l][0, p]

            def hook(m, a, o, r=r, p=p, src=src):
                hidden(o, tup)[r, p] = src

            handles.append(blocks[l].register_forward_hook(hook))
        handles.append(head.register_forward_hook(lambda m, a, o: store.append(o[:, -1])))
        try:
            net(corrupt.expand(n, -1))
        finally:
            for h in handles:
                h.remove()
        return list(store[0].split(1))

    def raw_one(l, p):
        """One forward of the single run (l, p), with basic indexing as a user would write it."""
        store = []

        def patch(m, a, o):
            hidden(o, tup)[:, p] = clean[l][:, p]

        hs = [blocks[l].register_forward_hook(patch), head.register_forward_hook(lambda m, a, o: store.append(o[:, -1]))]
        try:
            net(corrupt)
        finally:
            for h in hs:
                h.remove()
        return store[0]

    fns = {
        "raw single": lambda: [raw_one(l, p) for l, p in runs],
        "raw 4x16": lambda: [x for c in chunks for x in raw_batch(c)],
        "raw 1x64": lambda: raw_batch(runs),
        "plain 1x64": lambda: net(corrupt.expand(len(runs), -1)),
    }

    for name, m in wrapped.items():

        def one_patch(l, p, m=m):
            with m.trace(corrupt):
                hidden(m.transformer.h[l].output, tup)[:, p] = clean[l][:, p]
                out = m.lm_head.output[:, -1].save()
            return out

        def batch(batch, m=m):
            saved = []
            with m.trace() as tracer:
                for l, p in batch:
                    with tracer.invoke(corrupt):
                        hidden(m.transformer.h[l].output, tup)[:, p] = clean[l][:, p]
                        saved.append(m.lm_head.output[:, -1].save())
            return saved

        fns[f"{name} single"] = lambda one_patch=one_patch: [one_patch(l, p) for l, p in runs]
        fns[f"{name} 4x16"] = lambda batch=batch: [x for c in chunks for x in batch(c)]
        fns[f"{name} 1x64"] = lambda batch=batch: batch(runs)
    return fns


def sweep_inputs():
    """gpt2-tiny, the corrupted prompt, and the clean run's block outputs (computed once,
    outside the timings)."""
    net = gpt2("gpt2-tiny")
    torch.manual_seed(4)
    clean_ids = torch.randint(0, net.config.vocab_size, (1, SEQ))
    corrupt = torch.randint(0, net.config.vocab_size, (1, SEQ))
    clean = []
    hs = [b.register_forward_hook(lambda m, a, o: clean.append(hidden(o, net.block_tuple).detach().clone()))
          for b in net.transformer.h]
    with torch.no_grad():
        net(clean_ids)
    for h in hs:
        h.remove()
    return net, corrupt, clean


def run(quick=False):
    net, corrupt, clean = sweep_inputs()
    wrapped = {"fi": fi_wrap(net)}
    if NNSIGHT is not None:
        wrapped["nnsight"] = nn_wrap(net, batched=True)
    fns = sweep_fns(net, corrupt, clean, wrapped)

    # Check values: every way of every approach gives the same 64 logit rows.
    ref = fns["raw single"]()
    assert len(ref) == 64
    for name, fn in fns.items():
        if name.startswith("plain"):
            continue
        check_close(f"sweep {name}", [x.reshape(1, -1) for x in map(_val, fn())], ref, atol=1e-4, rtol=1e-4)
    res = bench(fns, reps=1 if quick else 9, warmup=1, target_s=0.0)
    base = res["raw 1x64"]["median"]
    for name, r in res.items():
        r["ratio"] = r["median"] / base
    print("  sweep: " + ", ".join(f"{k} {v['median']*1e3:.1f}ms ({v['ratio']:.2f}x)" for k, v in res.items()), flush=True)
    return res


def _val(x):
    from common import val

    return val(x)


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
