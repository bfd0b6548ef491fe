"""Workload 2: N invokes in one trace (N = 1, 8, 32, 128), each a batch-1 input of the
tiny MLP, against one batched forward doing the same rows.

  save   each invoke saves its row of layer1's output
  patch  invoke i sets position i % 10 of its row of layer1's output to 0

raw hooks: ``net(torch.cat(xs))`` with one hook (save: the output split into rows; patch:
one indexed assignment for all rows). plain: ``net(torch.cat(xs))``. The batching (the
``torch.cat``) is inside every timed call. The cost per extra invoke is the
least-squares slope of time over N.

Run alone: python benchmarks/bench_invokes.py [--quick]
"""

import sys

import torch

from common import NNSIGHT, bench, check_close, fi_wrap, nn_wrap, observed, slope, tiny_mlp


def cases_for(net, xs, wrapped):
    n = len(xs)
    l1 = net.layer1
    rows = torch.arange(n)
    cols = rows % 10
    save = {"plain": lambda: net(torch.cat(xs))}
    patch = {"plain": lambda: net(torch.cat(xs))}

    def raw_save():
        store = []
        h = l1.register_forward_hook(lambda m, a, o: store.append(o))
        try:
            net(torch.cat(xs))
        finally:
            h.remove()
        return list(store[0].split(1))

    def raw_patch():
        def hook(m, a, o):
            o[rows, cols] = 0

        h = l1.register_forward_hook(hook)
        try:
            net(torch.cat(xs))
        finally:
            h.remove()

    save["raw"] = raw_save
    patch["raw"] = raw_patch

    for name, m in wrapped.items():

        def traced_save(m=m):
            saved = []
            with m.trace() as tracer:
                for x in xs:
                    with tracer.invoke(x):
                        saved.append(m.layer1.output.save())
            return saved

        def traced_patch(m=m):
            with m.trace() as tracer:
                for i, x in enumerate(xs):
                    with tracer.invoke(x):
                        m.layer1.output[:, i % 10] = 0

        save[name] = traced_save
        patch[name] = traced_patch
    return {"save": save, "patch": patch}


def run(quick=False):
    ns = [1, 8, 32] if quick else [1, 8, 32, 128]
    reps = 3 if quick else 21
    net = tiny_mlp()
    wrapped = {"fi": fi_wrap(net)}
    if NNSIGHT is not None:
        wrapped["nnsight"] = nn_wrap(net, batched=True)
    torch.manual_seed(2)
    all_xs = [torch.rand(1, 5) for _ in range(max(ns))]
    out = {"save": {}, "patch": {}}
    for n in ns:
        xs = all_xs[:n]
        cases = cases_for(net, xs, wrapped)
        # Check values: every approach saves the same rows and leaves the same output.
        for case, fns in cases.items():
            ref_ret, ref_out = observed(net, fns["raw"])
            for name, fn in fns.items():
                if name == "plain":
                    continue  # the floor: no intervention
                ret, final = observed(net, fn)
                check_close(f"invokes N={n} {case}/{name}: final output", final, ref_out)
                if case == "save":
                    check_close(f"invokes N={n} {case}/{name}: saved", list(ret), ref_ret)
        for case, fns in cases.items():
            out[case][n] = bench(fns, reps=reps, target_s=0.004 if quick else 0.02)
            print(f"  invokes N={n} {case}: " + ", ".join(f"{k} {v['median']*1e6:.1f}us" for k, v in out[case][n].items()), flush=True)
    per_invoke = {}
    for case in out:
        per_invoke[case] = {
            name: slope(ns, [out[case][n][name]["median"] for n in ns]) for name in out[case][ns[0]]
        }
    out["per_invoke"] = per_invoke
    print("  per extra invoke: " + "; ".join(
        f"{case}: " + ", ".join(f"{k} {v*1e6:.2f}us" for k, v in d.items()) for case, d in per_invoke.items()))
    return out


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
