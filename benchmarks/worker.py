"""One benchmark process: runs the workloads in this interpreter's venv and writes JSON.

    python benchmarks/worker.py --json OUT.json [--quick] [--only tiny,invokes,...]

``run.py`` starts one per venv (main, nnsight 0.8.1, nnsight 0.4.11). Every workload
checks values before timing; a failure is recorded (and fails run.py) without stopping
the other workloads.
"""

import argparse
import json
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

warnings.filterwarnings("ignore", category=FutureWarning)  # nnsight 0.8.1's deprecation notes

import common  # noqa: E402  (sets one intra-op thread, imports fastinterleave and nnsight)

WORKLOADS = ["tiny", "invokes", "gpt2", "sweep", "generate", "memory"]  # callgrind: bench_callgrind.py


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(WORKLOADS))
    args = ap.parse_args()
    only = [w for w in args.only.split(",") if w]
    env = common.environment()
    label = f"nnsight {common.NNSIGHT_VERSION}" if common.NNSIGHT else "main"
    print(f"== {label} ({sys.prefix}): torch {env['torch']}, transformers {env['transformers']}", flush=True)
    out = {"env": env, "label": label, "quick": args.quick, "results": {}, "errors": {}, "seconds": {}}
    for name in only:
        t0 = time.perf_counter()
        try:
            if name == "tiny":
                import bench_tiny as mod
            elif name == "invokes":
                import bench_invokes as mod
            elif name == "gpt2":
                import bench_gpt2 as mod
            elif name == "sweep":
                import bench_sweep as mod
            elif name == "generate":
                import bench_generate as mod
            elif name == "memory":
                import bench_memory as mod
            else:
                raise ValueError(f"unknown workload {name}")
            out["results"][name] = mod.run(quick=args.quick)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
        out["seconds"][name] = time.perf_counter() - t0
        with open(args.json, "w") as f:  # after each workload: partial results survive a crash
            json.dump(out, f, indent=1, default=str)
    sys.exit(1 if out["errors"] else 0)


if __name__ == "__main__":
    main()
