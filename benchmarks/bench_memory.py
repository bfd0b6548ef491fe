"""Workload 6: memory of 128 invokes against the plain batched forward.

Model: ``Sequential(l1..l4 = Linear(1024, 1024))``; 128 inputs of (1, 512, 1024) floats
(2 MiB each). The batched forward's four activations are 256 MiB each (1 GiB), so torch's
own footprint does not hide a difference. Under ``torch.no_grad()``.

  plain    ``net(torch.cat(xs))``
  raw      the same with hooks: row i's position i % 512 of l1's output set to 0, and
           row i's last position of l3's output saved (cloned)
  fi / nnsight  the same as 128 invokes of one trace

Each measurement runs in a fresh process (``--one APPROACH``): the peak RSS (VmHWM, reset
right after the imports) minus the RSS right after the imports (torch, fastinterleave and
nnsight imported). On CUDA one would read ``torch.cuda.max_memory_allocated`` instead.

Run alone: python benchmarks/bench_memory.py [--quick]
"""

import json
import os
import subprocess
import sys

N = 128


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def one(approach, seq, dim):
    import torch  # noqa: F401

    from common import NNSIGHT, fi_wrap, nn_wrap  # imports fastinterleave (and nnsight)

    from collections import OrderedDict

    try:  # reset the peak so that it counts from here
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _rss_kib("VmRSS")

    torch.manual_seed(0)
    net = torch.nn.Sequential(OrderedDict((f"l{i}", torch.nn.Linear(dim, dim)) for i in range(1, 5))).eval()
    xs = [torch.randn(1, seq, dim) for _ in range(N)]
    saved = []
    with torch.no_grad():
        if approach == "plain":
            out = net(torch.cat(xs))
        elif approach == "raw":
            rows = torch.arange(N)
            cols = rows % seq

            def patch(m, a, o):
                o[rows, cols] = 0

            def save(m, a, o):
                saved.extend(o[:, -1].clone().split(1))

            hs = [net.l1.register_forward_hook(patch), net.l3.register_forward_hook(save)]
            try:
                out = net(torch.cat(xs))
            finally:
                for h in hs:
                    h.remove()
        else:
            if approach == "fi":
                m = fi_wrap(net, own_copy=False)  # alone in its process
            elif approach == "nnsight" and NNSIGHT is not None:
                m = nn_wrap(net, batched=True, own_copy=False)
            else:
                raise SystemExit(f"unknown approach {approach}")
            with m.trace() as tracer:
                for i, x in enumerate(xs):
                    with tracer.invoke(x):
                        m.l1.output[:, i % seq] = 0
                        saved.append(m.l3.output[:, -1].clone().save())
    peak = _rss_kib("VmHWM")
    assert len(saved) == (0 if approach == "plain" else N)
    print(json.dumps({"approach": approach, "base_kib": base, "peak_kib": peak, "rise_mib": (peak - base) / 1024,
                      "saved_sum": float(sum(float(getattr(v, "value", v).double().sum()) for v in saved))}))


def run(quick=False, python=None):
    """Each approach in a fresh process of ``python`` (default: this interpreter)."""
    from common import NNSIGHT

    seq, dim = (32, 256) if quick else (512, 1024)
    approaches = ["plain", "raw", "fi"] + (["nnsight"] if NNSIGHT is not None else [])
    here = os.path.dirname(os.path.abspath(__file__))
    res = {"seq": seq, "dim": dim, "invokes": N, "activation_mib": N * seq * dim * 4 / 2**20, "approaches": {}}
    # One fresh process per approach; they run side by side (RSS is per process).
    # glibc's mmap threshold fixed: by default it grows after large frees, and the
    # peak then jitters by 8 MB steps with when blocks go back to the OS.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    procs = {a: subprocess.Popen([python or sys.executable, os.path.join(here, "bench_memory.py"), "--one", a, str(seq), str(dim)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=here, env=env)
             for a in approaches}
    for a, p in procs.items():
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"memory {a} failed:\n{stderr[-3000:]}")
        res["approaches"][a] = json.loads(stdout.strip().splitlines()[-1])
    plain = res["approaches"]["plain"]
    ref = res["approaches"]["raw"]["saved_sum"]
    for a, r in res["approaches"].items():
        r["ratio"] = r["rise_mib"] / plain["rise_mib"]
        # Same values saved as raw hooks (a checksum: the processes are separate).
        if a != "plain" and abs(r["saved_sum"] - ref) > 1e-4 * max(1.0, abs(ref)):
            raise AssertionError(f"memory {a}: saved values differ from raw hooks ({r['saved_sum']} vs {ref})")
    print("  memory (rise over RSS after imports): " + ", ".join(
        f"{a} {r['rise_mib']:.0f} MiB ({r['ratio']:.3f}x)" for a, r in res["approaches"].items()), flush=True)
    return res


if __name__ == "__main__":
    if "--one" in sys.argv:
        i = sys.argv.index("--one")
        one(sys.argv[i + 1], int(sys.argv[i + 2]), int(sys.argv[i + 3]))
    else:
        run(quick="--quick" in sys.argv)
