"""Instruction counts per trace (valgrind --tool=callgrind): repeatable whatever the load,
so a regression shows when wall time is noise.

The tiny-MLP cases of workload 1, workload 2's save / patch with 1 and 33 invokes (the
cost per extra invoke is their difference / 32), and, with --gpt2, gpt2-tiny's empty trace and save 1
block with the plain forward, so its overhead over plain is counted, not timed). With --long,
workload 4's one trace x 64 invokes against raw hooks in one batch, and workload 5's
generation against HF generate with a raw hook (one call each: seconds under valgrind). Each
case runs N times between two marker calls: ``os.getppid()`` (callgrind
``--zero-before=os_getppid*``) and ``os.getsid(0)`` (``--dump-before=os_getsid*``), so each
dump holds one case's N calls; instructions per call = total / N, less the empty
loop's count. The garbage collector is off inside each counted loop (collected between).

Run alone: python benchmarks/bench_callgrind.py [--gpt2] [--long] [--json OUT]   (needs valgrind)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
N_TINY = 50
N_GPT2 = 3
N_INVOKES = 5
INVOKES = (1, 33)


def inner(order_path, with_gpt2, with_long=False):
    import torch

    from bench_tiny import check_cases, tiny_cases
    from common import NNSIGHT, fi_wrap, nn_wrap, tiny_mlp

    plan = []  # (case, approach, fn, n)
    net = tiny_mlp()
    torch.manual_seed(1)
    x = torch.rand(1, 5)
    wrapped = {"fi": fi_wrap(net)}
    if NNSIGHT is not None:
        wrapped["nnsight"] = nn_wrap(net)
    cases = tiny_cases(net, x, wrapped)
    check_cases(net, cases)
    plan.append(("(empty loop)", "-", lambda: None, N_TINY))
    for case, fns in cases.items():
        for name, fn in fns.items():
            plan.append((f"tiny: {case}", name, fn, N_TINY))
    from bench_invokes import cases_for as invoke_cases

    torch.manual_seed(2)
    xs = [torch.rand(1, 5) for _ in range(max(INVOKES))]
    inv_wrapped = {"fi": wrapped["fi"]}
    if NNSIGHT is not None:
        inv_wrapped["nnsight"] = nn_wrap(net, batched=True)
    for n in INVOKES:
        for case, fns in invoke_cases(net, xs[:n], inv_wrapped).items():
            for name, fn in fns.items():
                if name != "plain":
                    plan.append((f"invokes: {case} N={n}", name, fn, N_INVOKES))
    if with_gpt2:
        from bench_gpt2 import SEQ, cases_for
        from common import gpt2

        g = gpt2("gpt2-tiny")
        torch.manual_seed(3)
        ids = torch.randint(0, g.config.vocab_size, (1, SEQ))
        gw = {"fi": fi_wrap(g)}
        if NNSIGHT is not None:
            gw["nnsight"] = nn_wrap(g)
        gc = cases_for(g, ids, gw)
        for case in ("empty trace", "save 1 block"):
            for name, fn in gc[case].items():
                plan.append((f"gpt2-tiny: {case}", name, fn, N_GPT2))
    if with_long:
        from bench_generate import generate_fns
        from bench_sweep import sweep_fns, sweep_inputs

        net4, corrupt, clean = sweep_inputs()
        fns = sweep_fns(net4, corrupt, clean, {"fi": fi_wrap(net4)})
        for name in ("raw", "fi"):
            plan.append(("gpt2-tiny sweep: 1 trace x 64 invokes", name, fns[f"{name} 1x64"], 1))
        fns, _ = generate_fns()
        for name in ("raw", "fi"):
            if name in fns:
                plan.append(("gpt2-tiny generation: 16 tokens, edit every step", name, fns[name], 1))
    for _, _, fn, n in plan:  # warm up
        for _ in range(5 if n > 1 else 1):
            fn()
    import gc

    order = []
    for case, name, fn, n in plan:
        gc.collect()
        gc.disable()  # a collection inside one part would add noise to it
        os.getppid()  # callgrind: zero
        for _ in range(n):
            fn()
        os.getsid(0)  # callgrind: dump
        gc.enable()
        order.append([case, name, n])
    with open(order_path, "w") as f:
        json.dump(order, f)


def run(python=None, with_gpt2=True, keep=None, with_long=False):
    """Runs the cases under callgrind with ``python``; {case: {approach: instructions/call}}
    or {"error": why} when valgrind is missing."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return {"error": "valgrind not found (apt-get install -y valgrind)"}
    tmp = keep or tempfile.mkdtemp(prefix="fi-callgrind-")
    order_path = os.path.join(tmp, "order.json")
    cmd = [valgrind, "--tool=callgrind", "--zero-before=os_getppid*", "--dump-before=os_getsid*",
           f"--callgrind-out-file={tmp}/cg.%p", python or sys.executable,
           os.path.join(HERE, "bench_callgrind.py"), "--inner", order_path] + (["--gpt2"] if with_gpt2 else []) + (["--long"] if with_long else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env=env)
    if p.returncode != 0 or not os.path.exists(order_path):
        return {"error": f"callgrind run failed (rc {p.returncode}): {p.stderr[-2000:]}"}
    with open(order_path) as f:
        order = json.load(f)
    parts = {}
    for name in os.listdir(tmp):
        if name.startswith("cg.") and name.count(".") == 2:
            part = int(name.rsplit(".", 1)[1])
            with open(os.path.join(tmp, name)) as f:
                for line in f:
                    if line.startswith("summary:"):
                        parts[part] = int(line.split()[1])
                        break
    if len(parts) != len(order):
        return {"error": f"expected {len(order)} callgrind dumps, found {len(parts)} in {tmp}"}
    res = {}
    loop = None
    for i, (case, name, n) in enumerate(order, start=1):
        per = parts[i] / n
        if case == "(empty loop)":
            loop = per
            continue
        res.setdefault(case, {})[name] = per - (loop or 0)
    per_invoke = {}
    lo, hi = INVOKES
    for case in ("save", "patch"):
        a, b = res.get(f"invokes: {case} N={lo}", {}), res.get(f"invokes: {case} N={hi}", {})
        per_invoke[case] = {name: (b[name] - a[name]) / (hi - lo) for name in a if name in b}
    if keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"instructions": res, "per_invoke": per_invoke, "loop": loop}


if __name__ == "__main__":
    if "--inner" in sys.argv:
        inner(sys.argv[sys.argv.index("--inner") + 1], "--gpt2" in sys.argv, "--long" in sys.argv)
    else:
        r = run(with_gpt2="--gpt2" in sys.argv, with_long="--long" in sys.argv)
        if "--json" in sys.argv:
            from common import NNSIGHT_VERSION

            r["label"] = f"nnsight {NNSIGHT_VERSION}" if NNSIGHT_VERSION else "main"
            with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
                json.dump(r, f, indent=1)
        for case, d in r.get("instructions", {}).items():
            print(f"  {case}: " + ", ".join(f"{k} {v/1e3:.0f}k" for k, v in d.items()))
        for case, d in r.get("per_invoke", {}).items():
            print(f"  per extra invoke, {case}: " + ", ".join(f"{k} {v/1e3:.1f}k" for k, v in d.items()))
        if "error" in r:
            print(r["error"])
