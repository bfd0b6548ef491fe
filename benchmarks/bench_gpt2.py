"""Workload 3: GPT-2 shapes (transformers.GPT2Config, random weights), input ids (1, 16):
gpt2-tiny (4 layers x 128 wide, 60 modules) and gpt2-small (12 x 768, 164 modules).

  empty trace     nothing recorded
  save 1 block    block 0's hidden states
  save all blocks every block's hidden states
  zero one pos    block 0's hidden states at position 3 set to 0 (in place)

The overheads over plain on gpt2-small (tens of µs on a forward of tens of ms) are below
the noise of a single call: they are also measured as the median of paired differences
(trace - plain, back to back), with their interquartile range.

Run alone: python benchmarks/bench_gpt2.py [--quick]
"""

import sys

import torch

from common import NNSIGHT, bench, check_close, fi_wrap, gpt2, hidden, nn_wrap, observed, paired_overhead

SEQ = 16
POS = 3


def cases_for(net, ids, wrapped):
    tup = net.block_tuple
    blocks = list(net.transformer.h)
    n = len(blocks)
    cases = {
        "empty trace": {"plain": lambda: net(ids)},
        "save 1 block": {},
        "save all blocks": {},
        "zero one pos": {},
    }

    def raw_save1():
        store = []
        h = blocks[0].register_forward_hook(lambda m, a, o: store.append(hidden(o, tup)))
        try:
            net(ids)
        finally:
            h.remove()
        return store[0]

    def raw_save_all():
        store = []
        hs = [b.register_forward_hook(lambda m, a, o: store.append(hidden(o, tup))) for b in blocks]
        try:
            net(ids)
        finally:
            for h in hs:
                h.remove()
        return store

    def zero(m, a, o):
        hidden(o, tup)[:, POS] = 0

    def raw_zero():
        h = blocks[0].register_forward_hook(zero)
        try:
            net(ids)
        finally:
            h.remove()

    cases["save 1 block"]["raw"] = raw_save1
    cases["save all blocks"]["raw"] = raw_save_all
    cases["zero one pos"]["raw"] = raw_zero

    for name, m in wrapped.items():

        def empty(m=m):
            with m.trace(ids):
                pass

        def save1(m=m):
            with m.trace(ids):
                out = hidden(m.transformer.h[0].output, tup).save()
            return out

        def save_all(m=m):
            saved = []
            with m.trace(ids):
                for i in range(n):
                    saved.append(hidden(m.transformer.h[i].output, tup).save())
            return saved

        def zero_pos(m=m):
            with m.trace(ids):
                hidden(m.transformer.h[0].output, tup)[:, POS] = 0

        cases["empty trace"][name] = empty
        cases["save 1 block"][name] = save1
        cases["save all blocks"][name] = save_all
        cases["zero one pos"][name] = zero_pos
    return cases


def run(quick=False, shapes=None):
    shapes = shapes or (["gpt2-tiny"] if quick else ["gpt2-tiny", "gpt2-small"])
    out = {}
    for shape in shapes:
        net = gpt2(shape)
        torch.manual_seed(3)
        ids = torch.randint(0, net.config.vocab_size, (1, SEQ))
        wrapped = {"fi": fi_wrap(net)}
        if NNSIGHT is not None:
            wrapped["nnsight"] = nn_wrap(net)
        cases = cases_for(net, ids, wrapped)
        for case, fns in cases.items():
            ref_name = "raw" if "raw" in fns else "plain"
            ref_ret, ref_out = observed(net, fns[ref_name])
            for name, fn in fns.items():
                ret, final = observed(net, fn)
                check_close(f"{shape} {case}/{name}: logits", final, ref_out)
                if ref_name == "raw" and ref_ret is not None:
                    check_close(f"{shape} {case}/{name}: saved", ret, ref_ret)
        small = shape == "gpt2-small"
        reps = 3 if quick else (7 if small else 15)
        res = {"modules": len(list(net.modules())), "cases": {}, "paired": {}}
        for case, fns in cases.items():
            if small:
                fns = dict(fns)
                if case != "empty trace":
                    fns["plain"] = cases["empty trace"]["plain"]
            res["cases"][case] = bench(fns, reps=reps, warmup=1, target_s=0.0)
            print(f"  {shape} {case}: " + ", ".join(f"{k} {v['median']*1e3:.3f}ms" for k, v in res["cases"][case].items()), flush=True)
        # Overheads over plain, paired (back to back): empty trace and save 1, per approach.
        plain = cases["empty trace"]["plain"]
        preps = 6 if quick else (20 if small else 60)
        for case in ("empty trace", "save 1 block", "save all blocks"):
            res["paired"][case] = {}
            for name, fn in cases[case].items():
                if name == "plain":
                    continue
                res["paired"][case][name] = paired_overhead(fn, plain, reps=preps)
            print(f"  {shape} {case} over plain (paired): " + ", ".join(
                f"{k} {v['median']*1e6:.0f}us [{v['q1']*1e6:.0f}, {v['q3']*1e6:.0f}]" for k, v in res["paired"][case].items()), flush=True)
        out[shape] = res
    return out


if __name__ == "__main__":
    shapes = [a for a in sys.argv[1:] if a.startswith("gpt2")]
    run(quick="--quick" in sys.argv, shapes=shapes or None)
