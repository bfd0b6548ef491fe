"""Workload 1: the tiny MLP ``Sequential(Linear(5,10), Linear(10,2))``, input (1, 5).

Cases (each a whole trace, batch 1): empty trace; save one output; save all (both
layers); set one (``layer1.output[:, -1] = 0``); set + save (and layer2's output saved).
Plus "interventions": a 32-layer MLP of Linear(16, 16) with the outputs of its first k
layers saved, k = 0..32 (overhead vs number of interventions).

Run alone: python benchmarks/bench_tiny.py [--quick]
"""

import sys

import torch

from common import NNSIGHT, bench, check_close, deep_mlp, fi_wrap, nn_wrap, observed, tiny_mlp


def tiny_cases(net, x, wrapped):
    """{case: {approach: fn}}; each fn returns what it saved (checked before timing)."""
    l1, l2 = net.layer1, net.layer2
    cases = {
        "empty trace": {"plain": lambda: net(x)},
        "save 1 output": {},
        "save all": {},
        "set one": {},
        "set one + save": {},
    }

    def raw_save1():
        store = []
        h = l1.register_forward_hook(lambda m, a, o: store.append(o))
        try:
            net(x)
        finally:
            h.remove()
        return store[0]

    def raw_save_all():
        store = []
        hs = [m.register_forward_hook(lambda m, a, o: store.append(o)) for m in (l1, l2)]
        try:
            net(x)
        finally:
            for h in hs:
                h.remove()
        return store

    def zero_last(m, a, o):
        o[:, -1] = 0

    def raw_set():
        h = l1.register_forward_hook(zero_last)
        try:
            net(x)
        finally:
            h.remove()

    def raw_set_save():
        store = []
        hs = [l1.register_forward_hook(zero_last), l2.register_forward_hook(lambda m, a, o: store.append(o))]
        try:
            net(x)
        finally:
            for h in hs:
                h.remove()
        return store[0]

    cases["save 1 output"]["raw"] = raw_save1
    cases["save all"]["raw"] = raw_save_all
    cases["set one"]["raw"] = raw_set
    cases["set one + save"]["raw"] = raw_set_save

    for name, m in wrapped.items():
        # The same code for fastinterleave and nnsight (`import fastinterleave as nnsight`).

        def empty(m=m):
            with m.trace(x):
                pass

        def save1(m=m):
            with m.trace(x):
                out = m.layer1.output.save()
            return out

        def save_all(m=m):
            with m.trace(x):
                a = m.layer1.output.save()
                b = m.layer2.output.save()
            return [a, b]

        def set_one(m=m):
            with m.trace(x):
                m.layer1.output[:, -1] = 0

        def set_save(m=m):
            with m.trace(x):
                m.layer1.output[:, -1] = 0
                out = m.layer2.output.save()
            return out

        cases["empty trace"][name] = empty
        cases["save 1 output"][name] = save1
        cases["save all"][name] = save_all
        cases["set one"][name] = set_one
        cases["set one + save"][name] = set_save
    return cases


def check_cases(net, cases):
    """Every approach of a case returns the same saved values and leaves the same final output."""
    for case, fns in cases.items():
        ref_name = "raw" if "raw" in fns else "plain"
        ref_ret, ref_out = observed(net, fns[ref_name])
        for name, fn in fns.items():
            ret, out = observed(net, fn)
            check_close(f"{case}/{name}: final output", out, ref_out)
            if ref_name == "raw" and ref_ret is not None:
                check_close(f"{case}/{name}: saved", ret, ref_ret)


def deep_cases(net, x, wrapped, ks):
    """{k: {approach: fn}}: save the outputs of the first k layers."""
    layers = list(net.children())
    names = [n for n, _ in net.named_children()]
    cases = {}
    for k in ks:
        fns = {"plain": lambda: net(x)}

        def raw(k=k):
            store = []
            hs = [layers[i].register_forward_hook(lambda m, a, o: store.append(o)) for i in range(k)]
            try:
                net(x)
            finally:
                for h in hs:
                    h.remove()
            return store

        fns["raw"] = raw
        for name, m in wrapped.items():

            def traced(m=m, k=k):
                saved = []
                with m.trace(x):
                    for i in range(k):
                        saved.append(getattr(m, names[i]).output.save())
                return saved

            fns[name] = traced
        cases[k] = fns
    return cases


def run(quick=False):
    reps = 3 if quick else 25
    target = 0.004 if quick else 0.02
    out = {"tiny": {}, "deep": {}}

    net = tiny_mlp()
    torch.manual_seed(1)
    x = torch.rand(1, 5)
    wrapped = {"fi": fi_wrap(net)}
    if NNSIGHT is not None:
        wrapped["nnsight"] = nn_wrap(net)
    cases = tiny_cases(net, x, wrapped)
    check_cases(net, cases)
    for case, fns in cases.items():
        out["tiny"][case] = bench(fns, reps=reps, target_s=target)
        print(f"  tiny {case}: " + ", ".join(f"{k} {v['median']*1e6:.1f}us" for k, v in out["tiny"][case].items()), flush=True)

    depth = 32
    net = deep_mlp(depth)
    torch.manual_seed(1)
    x = torch.rand(1, 16)
    wrapped = {"fi": fi_wrap(net)}
    if NNSIGHT is not None:
        wrapped["nnsight"] = nn_wrap(net)
    ks = [0, 1, 32] if quick else [0, 1, 2, 4, 8, 16, 32]
    cases = deep_cases(net, x, wrapped, ks)
    for k, fns in cases.items():
        ref = fns["raw"]()
        for name in wrapped:
            check_close(f"deep k={k}/{name}", list(fns[name]()), ref)
        out["deep"][k] = bench(fns, reps=max(3, reps // 2), target_s=target)
        print(f"  deep k={k}: " + ", ".join(f"{n} {v['median']*1e6:.1f}us" for n, v in out["deep"][k].items()), flush=True)
    return out


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
