"""Runs every benchmark and writes RESULTS.md and the plots.

    python benchmarks/run.py            # full suite -> benchmarks/RESULTS.md, benchmarks/*.png
    python benchmarks/run.py --quick    # a few repetitions (CI) -> benchmarks/out/quick/
    options: --no-anchors  --no-callgrind  --only tiny,invokes,gpt2,sweep,generate,memory
             --out DIR (where RESULTS.md and the PNGs go)

One process per venv (nnsight 0.8.1 and 0.4.11 cannot share one): the main venv (this
interpreter: fastinterleave, plain, raw hooks) and, when present, .venv-nnsight08 and
.venv-nnsight04 (created by benchmarks/setup_anchors.sh), which also time fastinterleave
and raw hooks, so every nnsight ratio is measured inside one process. Raw JSON goes to
benchmarks/out/.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ANCHORS = [("nnsight 0.8.1", ".venv-nnsight08"), ("nnsight 0.4.11", ".venv-nnsight04")]
US = 1e6


# The package's Python files and the extension's names (an editable build and the
# anchors' wheel differ byte for byte, so the extension itself is not hashed).
_FINGERPRINT = (
    "import hashlib, os, fastinterleave as f\n"
    "d = os.path.dirname(f.__file__); h = hashlib.sha256()\n"
    "for n in sorted(os.listdir(d)):\n"
    "    if n.endswith('.py'):\n"
    "        h.update(n.encode()); h.update(open(os.path.join(d, n), 'rb').read())\n"
    "for n in sorted(k for k in dir(f._C) if not k.startswith('__')):\n"
    "    h.update(n.encode()); h.update(' '.join(sorted(dir(getattr(f._C, n)))).encode())\n"
    "print(h.hexdigest())"
)


def _build_fingerprint(python):
    """A hash of the fastinterleave package `python` imports."""
    out = subprocess.run([python, "-c", _FINGERPRINT], capture_output=True, text=True, cwd=HERE)
    return out.stdout.strip() if out.returncode == 0 else f"error: {out.stderr[-300:]}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few repetitions, small sizes (seconds; CI)")
    ap.add_argument("--no-anchors", action="store_true", help="skip the nnsight venvs")
    ap.add_argument("--no-callgrind", action="store_true", help="skip the instruction counts")
    ap.add_argument("--only", default=None, help="comma-separated workloads")
    ap.add_argument("--out", default=None, help="where RESULTS.md and the plots go")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite RESULTS.md and the plots from the JSON of the last run (benchmarks/out/)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    git = _git_state()
    out_dir = args.out or (os.path.join(HERE, "out", "quick") if args.quick else HERE)
    raw_dir = os.path.join(HERE, "out", "quick" if args.quick else "full")
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(raw_dir, exist_ok=True)

    if args.render_only:
        return render_only(args, out_dir, raw_dir)

    envs = [("main", sys.executable)]
    skipped = []
    stale = []
    for label, venv in ANCHORS:
        py = os.path.join(ROOT, venv, "bin", "python")
        if args.no_anchors:
            skipped.append(f"{label}: skipped (--no-anchors)")
        elif not os.path.exists(py):
            skipped.append(f"{label}: skipped ({venv} not found: run `bash benchmarks/setup_anchors.sh`)")
        elif _build_fingerprint(py) != _build_fingerprint(sys.executable):
            # The anchors install fastinterleave from a wheel: after a change it is stale.
            failed_early = f"{label}: its fastinterleave differs from this one: run `bash benchmarks/setup_anchors.sh --wheel-only`"
            skipped.append(failed_early)
            print(failed_early, file=sys.stderr)
            stale.append(label)
        else:
            envs.append((label, py))

    data = {}
    failed = [f"{label}: stale fastinterleave build" for label in stale]
    for label, py in envs:
        path = os.path.join(raw_dir, _slug(label) + ".json")
        if os.path.exists(path):
            os.remove(path)
        cmd = [py, os.path.join(HERE, "worker.py"), "--json", path] + (["--quick"] if args.quick else [])
        if args.only:
            cmd += ["--only", args.only]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if label == "main":
            env["FI_BENCH_NO_ANCHOR"] = "1"
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        if rc != 0:
            failed.append(f"{label}: worker exited with {rc}")
        if os.path.exists(path):
            with open(path) as f:
                data[label] = json.load(f)

    callgrind = {}
    if args.quick or args.no_callgrind:
        callgrind = {"skipped": "skipped (--quick)" if args.quick else "skipped (--no-callgrind)"}
    else:
        # Instruction counts do not depend on the load: the venvs run in parallel.
        procs = []
        for label, py in envs:
            path = os.path.join(raw_dir, "callgrind-" + _slug(label) + ".json")
            if os.path.exists(path):
                os.remove(path)
            print(f"== callgrind: {label}", flush=True)
            procs.append((label, path, subprocess.Popen(
                [py, os.path.join(HERE, "bench_callgrind.py"), "--gpt2", "--json", path]
                + (["--long"] if label == "main" else []), cwd=HERE,
                env=dict(os.environ, OMP_NUM_THREADS="1", FI_BENCH_NO_ANCHOR="1" if label == "main" else "0"))))
        for label, path, p in procs:
            p.wait()
            if os.path.exists(path):
                with open(path) as f:
                    callgrind[label] = json.load(f)
            else:
                callgrind[label] = {"error": f"no output (exit {p.returncode})"}

    elapsed = time.perf_counter() - t_start
    global QUICK
    QUICK = args.quick
    report = Report(data, callgrind, skipped, failed, args.quick, elapsed)
    md = report.markdown()
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write(md)
    plots = report.plots(out_dir)
    print(f"\nwrote {os.path.relpath(os.path.join(out_dir, 'RESULTS.md'), ROOT)}"
          + "".join(f", {os.path.relpath(p, ROOT)}" for p in plots) + f" in {elapsed:.0f} s")
    for s in skipped:
        print("  " + s)
    errors = [f"{lab}/{w}: {e}" for lab, d in data.items() for w, e in d.get("errors", {}).items()]
    for e in failed + errors:
        print("FAILED " + e)
    sys.exit(1 if (failed or errors) else 0)


def render_only(args, out_dir, raw_dir):
    global QUICK
    QUICK = args.quick
    meta_path = os.path.join(raw_dir, "run.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    else:  # a run from before run.json existed: rebuild what it would hold
        meta = {"skipped": [], "failed": [], "elapsed": None, "callgrind": {}}
        for label in ["main"] + [lab for lab, _ in ANCHORS]:
            path = os.path.join(raw_dir, "callgrind-" + _slug(label) + ".json")
            if os.path.exists(path):
                with open(path) as f:
                    meta["callgrind"][label] = json.load(f)
        if not meta["callgrind"]:
            meta["callgrind"] = {"skipped": "no callgrind results found"}
    data = {}
    for label in ["main"] + [lab for lab, _ in ANCHORS]:
        path = os.path.join(raw_dir, _slug(label) + ".json")
        if os.path.exists(path):
            with open(path) as f:
                data[label] = json.load(f)
    report = Report(data, meta["callgrind"], meta["skipped"], meta["failed"], args.quick, meta["elapsed"], meta.get("git"))
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write(report.markdown())
    made = report.plots(out_dir)
    print(f"rewrote {os.path.join(out_dir, 'RESULTS.md')} and {len(made)} plots")


def _git_state():
    """The commit the run started from, and whether python/ or csrc/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "python", "csrc"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" + uncommitted changes in python/ or csrc/" if dirty else "") if head else None
    except OSError:
        return None


def _slug(label):
    return label.replace("nnsight ", "nnsight-").replace(" ", "_")


# -- the report ---------------------------------------------------------------------------------


def _get(d, *keys):
    for k in keys:
        if d is None:
            return None
        if isinstance(d, dict):
            d = d.get(k) if k in d else d.get(str(k))
        else:
            return None
    return d


def _us(s, digits=1):
    return "—" if s is None else f"{s * US:.{digits}f} µs"


def _ms(s):
    return "—" if s is None else f"{s * 1e3:.2f} ms"


def _x(r, digits=2):
    return "—" if r is None else f"{r:.{digits}f}×"


def _div(a, b):
    return None if a is None or b in (None, 0) else a / b


QUICK = False


def _ok(cond):
    if cond is None:
        return "—"
    if QUICK:
        return "(quick run: not judged)"
    return "**met**" if cond else "**missed**"


class Report:
    def __init__(self, data, callgrind, skipped, failed, quick, elapsed, git=None):
        self.git = git
        self.data = data
        self.cg = callgrind
        self.skipped = skipped
        self.failed = failed
        self.quick = quick
        self.elapsed = elapsed
        self.main = _get(data, "main", "results") or {}
        self.anchors = {lab: _get(data, lab, "results") or {} for lab, _ in ANCHORS if lab in data}

    # -- headline ------------------------------------------------------------------------

    def headline(self):
        m = self.main
        a8 = self.anchors.get("nnsight 0.8.1", {})
        a4 = self.anchors.get("nnsight 0.4.11", {})
        rows = []

        def tiny(res, case, who):
            return _get(res, "tiny", "tiny", case, who, "median")

        def cgi(label, case, who):
            return _get(self.cg, label, "instructions", f"tiny: {case}", who)

        plain_i = cgi("main", "empty trace", "plain")

        def scaled(case):
            """fi's time scaled to the baseline's 10 µs plain forward by instruction counts."""
            fi_i = cgi("main", case, "fi")
            return None if fi_i is None or not plain_i else fi_i / plain_i * 10e-6

        def cg_speedup(label, case):
            r = _div(cgi(label, case, "nnsight"), cgi(label, case, "fi"))
            return "" if r is None else f"; callgrind {_x(r, 1)}"

        # 1. tiny save 1
        fi = tiny(m, "save 1 output", "fi")
        raw = tiny(m, "save 1 output", "raw")
        r_raw = _div(fi, raw)
        s8 = _div(tiny(a8, "save 1 output", "nnsight"), tiny(a8, "save 1 output", "fi"))
        s4 = _div(tiny(a4, "save 1 output", "nnsight"), tiny(a4, "save 1 output", "fi"))
        conds = [fi is not None and fi <= 25e-6, r_raw is not None and r_raw <= 1.7]
        if s8 is not None:
            conds.append(s8 >= 2)
        if s4 is not None:
            conds.append(s4 >= 10)
        cg_raw = _div(cgi("main", "save 1 output", "fi"), cgi("main", "save 1 output", "raw"))
        extra = "" if cg_raw is None else (f"; callgrind {_x(cg_raw)} raw, ≈ {_us(scaled('save 1 output'), 0)} "
                                           "at the baseline's 10 µs plain forward")
        rows.append(("tiny MLP, save 1 output (whole trace)",
                     "≤ 25 µs; ≤ 1.7× raw; ≥ 2× faster than 0.8.1; ≥ 10× than 0.4.11",
                     f"{_us(fi)} ({_x(r_raw)} raw {_us(raw)}{extra})",
                     f"{_x(s8, 1)} faster{cg_speedup('nnsight 0.8.1', 'save 1 output')}" if s8 else "—",
                     f"{_x(s4, 1)} faster{cg_speedup('nnsight 0.4.11', 'save 1 output')}" if s4 else "—",
                     _ok(all(conds) if fi is not None else None)))
        # 2. tiny empty
        fi = tiny(m, "empty trace", "fi")
        plain = tiny(m, "empty trace", "plain")
        e8 = _div(tiny(a8, "empty trace", "nnsight"), tiny(a8, "empty trace", "fi"))
        e4 = _div(tiny(a4, "empty trace", "nnsight"), tiny(a4, "empty trace", "fi"))
        sc = scaled("empty trace")
        extra = "" if sc is None else f"; callgrind {_x(_div(cgi('main', 'empty trace', 'fi'), plain_i))} plain, ≈ {_us(sc, 0)} scaled"
        rows.append(("tiny MLP, empty trace", "≤ 15 µs", f"{_us(fi)} (plain {_us(plain)}{extra})",
                     f"{_x(e8, 1)} faster{cg_speedup('nnsight 0.8.1', 'empty trace')}" if e8 else "—",
                     f"{_x(e4, 1)} faster{cg_speedup('nnsight 0.4.11', 'empty trace')}" if e4 else "—",
                     _ok(None if fi is None else fi <= 15e-6)))
        # 3. gpt2 empty / save 1 over plain: paired wall-clock differences, and callgrind on gpt2-tiny
        #    (a difference of tens of µs on a forward of ms is below the wall-clock noise here).
        cg_g = _get(self.cg, "main", "instructions") or {}
        cg_plain = _get(cg_g, "gpt2-tiny: empty trace", "plain")
        for case, target, lim in (("empty trace", "≤ 20 µs on both", 20e-6), ("save 1 block", "≤ 30 µs on both", 30e-6)):
            vals, n8, n4, ok, noisy = [], [], [], [], []
            for shape in ("gpt2-tiny", "gpt2-small"):
                d = _get(m, "gpt2", shape, "paired", case, "fi")
                if d is None:
                    continue
                vals.append(f"{shape.split('-')[1]} {_us(d['median'], 0)} [{d['q1']*US:.0f}, {d['q3']*US:.0f}]")
                if d["q1"] < 0 < d["q3"]:
                    noisy.append(shape)
                ok.append(d["median"] <= lim)
                for res, acc in ((a8, n8), (a4, n4)):
                    nv = _get(res, "gpt2", shape, "paired", case, "nnsight", "median")
                    fv = _get(res, "gpt2", shape, "paired", case, "fi", "median")
                    if nv is not None:
                        acc.append(f"{shape.split('-')[1]} {_us(nv, 0)} (fi {_us(fv, 0)})")
            fi_i = _get(cg_g, f"gpt2-tiny: {case}", "fi")
            cg_txt = ""
            if fi_i is not None and cg_plain and plain_i:
                extra_i = fi_i - cg_plain
                cg_txt = f"; callgrind, tiny: +{extra_i / 1e3:.0f}k instr over plain ≈ {_us(extra_i / plain_i * 10e-6, 0)} scaled"
            # Judged on wall time where the paired IQR excludes 0; a shape whose IQR spans 0 is unresolved.
            judged = [o for o, shape in zip(ok, ("gpt2-tiny", "gpt2-small")) if shape not in noisy]
            verdict = _ok(all(judged) if judged else None)
            if noisy and not QUICK:
                verdict += f" (wall time below the noise on {', '.join(noisy)})"
            rows.append((f"gpt2 {case} over plain (tiny / small), paired median [IQR]", target,
                         "; ".join(vals) + cg_txt or "—", "; ".join(n8) or "—", "; ".join(n4) or "—", verdict))
        # 4. per extra invoke
        pi = _get(m, "invokes", "per_invoke") or {}
        fs, fp = _get(pi, "save", "fi"), _get(pi, "patch", "fi")

        def per(res):
            s, p = _get(res, "invokes", "per_invoke", "save"), _get(res, "invokes", "per_invoke", "patch")
            if not s or "nnsight" not in s:
                return "—"
            return f"{_us(s['nnsight'])} / {_us(p['nnsight'])} (fi {_us(s['fi'])} / {_us(p['fi'])})"

        cg_pi = _get(self.cg, "main", "per_invoke") or {}
        cs, cp = _get(cg_pi, "save", "fi"), _get(cg_pi, "patch", "fi")
        cg_txt = ""
        if cs is not None and cp is not None and plain_i:
            cg_txt = (f"; callgrind {cs / 1e3:.0f}k / {cp / 1e3:.0f}k instr per extra invoke ≈ "
                      f"{_us(cs / plain_i * 10e-6)} / {_us(cp / plain_i * 10e-6)} scaled")
        rows.append(("cost per extra invoke, save / patch", "≤ 5 µs / ≤ 8 µs",
                     f"{_us(fs)} / {_us(fp)} (raw {_us(_get(pi, 'save', 'raw'))} / {_us(_get(pi, 'patch', 'raw'))}{cg_txt})",
                     per(a8), per(a4), _ok(None if fs is None else (fs <= 5e-6 and fp <= 8e-6))))
        # 5. sweep
        sw = _get(m, "sweep", "fi 1x64", "ratio")

        def swn(res):
            r, f = _get(res, "sweep", "nnsight 1x64", "ratio"), _get(res, "sweep", "fi 1x64", "ratio")
            return "—" if r is None else f"{_x(r)} (fi {_x(f)})"

        cg_sw = _get(self.cg, "main", "instructions", "gpt2-tiny sweep: 1 trace x 64 invokes") or {}
        r_sw = _div(cg_sw.get("fi"), cg_sw.get("raw"))
        rows.append(("gpt2-tiny 64-patch sweep, 1 trace × 64 invokes", "≤ 1.05× raw hooks, one batch",
                     f"{_x(sw)} raw" + ("" if r_sw is None else f" (callgrind {_x(r_sw, 3)} raw)"),
                     swn(a8), swn(a4), _ok(None if sw is None else sw <= 1.05)))
        # 6. gpt2-small save all
        c = _get(m, "gpt2", "gpt2-small", "cases", "save all blocks")
        r = _div(_get(c, "fi", "median"), _get(c, "plain", "median"))
        po = _get(m, "gpt2", "gpt2-small", "paired", "save all blocks", "fi", "median")
        plain_small = _get(c, "plain", "median")
        r2 = None if po is None or not plain_small else 1 + po / plain_small

        def sa(res):
            c = _get(res, "gpt2", "gpt2-small", "cases", "save all blocks")
            n, f, p = _get(c, "nnsight", "median"), _get(c, "fi", "median"), _get(c, "plain", "median")
            return "—" if n is None else f"{_x(_div(n, p), 3)} (fi {_x(_div(f, p), 3)})"

        rows.append(("gpt2-small, save all 12 blocks", "≤ 1.02× plain",
                     "—" if r is None else f"{_x(r, 3)} plain (paired: {_x(r2, 3)})", sa(a8), sa(a4),
                     _ok(None if r is None else r <= 1.02)))
        # 7. memory
        mr = _get(m, "memory", "approaches", "fi", "ratio")

        def mem(res):
            n, f = _get(res, "memory", "approaches", "nnsight", "ratio"), _get(res, "memory", "approaches", "fi", "ratio")
            return "—" if n is None else f"{_x(n, 3)} (fi {_x(f, 3)})"

        act = _get(m, "memory", "activation_mib")
        rows.append((f"{_get(m, 'memory', 'invokes') or 128} invokes, peak memory (RSS rise)", "≤ 1.05× plain batched",
                     "—" if mr is None else f"{_x(mr, 3)} plain ({_get(m, 'memory', 'approaches', 'fi', 'rise_mib'):.0f} MiB; "
                     f"{act:.0f} MiB per activation)", mem(a8), mem(a4), _ok(None if mr is None else mr <= 1.05)))
        # 8. generation
        g = _get(m, "generate", "times", "fi", "ratio_raw")
        status = _get(m, "generate", "status", "fi")

        def gen(res):
            n, f = _get(res, "generate", "times", "nnsight", "ratio_raw"), _get(res, "generate", "times", "fi", "ratio_raw")
            return "—" if n is None else f"{_x(n, 3)} (fi {_x(f, 3)})"

        per_step = _get(m, "generate", "times", "fi", "per_step_over_raw")
        cg_gen = _get(self.cg, "main", "instructions", "gpt2-tiny generation: 16 tokens, edit every step") or {}
        r_gen = _div(cg_gen.get("fi"), cg_gen.get("raw"))
        cg_txt = "" if r_gen is None else f"; callgrind {_x(r_gen, 3)} raw"
        rows.append(("generation, 16 tokens, edit every step (gpt2-tiny)", "≤ 1.03× HF generate + raw hook",
                     status or ("—" if g is None else f"{_x(g, 3)} raw ({_us(per_step)} per step{cg_txt})"), gen(a8), gen(a4),
                     _ok(None if g is None else g <= 1.03)))
        return rows

    # -- markdown --------------------------------------------------------------------------------

    def markdown(self):
        L = []
        env = _get(self.data, "main", "env") or {}
        mode = "quick mode (a few repetitions: numbers are rough)" if self.quick else "full run"
        L.append("# fastinterleave benchmarks — results\n")
        L.append(f"Generated by `python benchmarks/run.py{' --quick' if self.quick else ''}` ({mode}; "
                 f"{'?' if self.elapsed is None else f'{self.elapsed:.0f}'} s). CPU: {env.get('cpu', '?')}, {env.get('cores', '?')} cores, one intra-op "
                 f"thread; torch {env.get('torch', '?')}, Python {env.get('python', '?')}"
                 + (f"; fastinterleave at {self.git}" if self.git else "") + ". "
                 f"Medians of interleaved repetitions; ratios are taken inside one process. "
                 f"See benchmarks/README.md for what each workload measures.\n")
        if self.skipped:
            L.append("**Anchors skipped:** " + "; ".join(self.skipped) + ". Their columns show —.\n")
        for f in self.failed:
            L.append(f"**FAILED:** {f}\n")
        for lab, d in self.data.items():
            for w, e in (d.get("errors") or {}).items():
                L.append(f"**FAILED ({lab}, {w}):** `{e[:500]}`\n")
        self._stale_note(L)

        L.append("## Headline (targets from BENCHMARKS.md)\n")
        L.append("fastinterleave's column comes from the main process; each nnsight column from that release's own "
                 "process, with fastinterleave timed beside it (its value in parentheses).\n")
        L.append("| measure | target | fastinterleave | nnsight 0.8.1 | nnsight 0.4.11 | target |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for row in self.headline():
            L.append("| " + " | ".join(row) + " |")
        L.append("")
        loads = {lab: d.get("env", {}).get("load") for lab, d in self.data.items()}
        L.append("Load average (1, 5, 15 min) when each process started: " + "; ".join(
            f"{lab}: {', '.join(f'{x:.1f}' for x in v)}" for lab, v in loads.items() if v) + ". "
                 "This 2-core machine is shared: absolute times drift with the load (the baseline in BENCHMARKS.md "
                 "had a 10 µs plain forward for the tiny MLP), while ratios measured side by side and instruction "
                 "counts hold.\n")

        self._tiny(L)
        self._deep(L)
        self._invokes(L)
        self._gpt2(L)
        self._sweep(L)
        self._generate(L)
        self._memory(L)
        self._callgrind(L)
        self._envs(L)
        return "\n".join(L) + "\n"

    def _stale_note(self, L):
        main_fp = _get(self.data, "main", "env", "fastinterleave", "py_sha1")
        for lab in self.anchors:
            fp = _get(self.data, lab, "env", "fastinterleave", "py_sha1")
            if main_fp and fp and fp != main_fp:
                L.append(f"**Note:** the fastinterleave in the {lab} venv differs from the main venv's (Python sources "
                         f"{fp} vs {main_fp}): its wheel is older than the working tree. "
                         f"Refresh it with `bash benchmarks/setup_anchors.sh --wheel-only`.\n")

    def _procs(self):
        return [("main", self.main)] + list(self.anchors.items())

    def _tiny(self, L):
        L.append("## 1. Tiny MLP, batch 1 (whole trace, µs)\n")
        L.append("| process | case | plain | raw hooks | fastinterleave | nnsight | fi / raw | nnsight / fi |")
        L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for lab, res in self._procs():
            for case, d in (_get(res, "tiny", "tiny") or {}).items():
                g = lambda k: _get(d, k, "median")  # noqa: E731
                L.append(f"| {lab} | {case} | {_us(g('plain'))} | {_us(g('raw'))} | {_us(g('fi'))} | {_us(g('nnsight'))} "
                         f"| {_x(_div(g('fi'), g('raw')))} | {_x(_div(g('nnsight'), g('fi')))} |")
        L.append("")

    def _deep(self, L):
        L.append("## 1b. Overhead vs number of interventions (32-layer MLP, save the first k outputs; µs over plain)\n")
        L.append("![overhead vs interventions](plot_interventions.png)\n")
        L.append("| process | k | plain | raw hooks | fastinterleave | nnsight |")
        L.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for lab, res in self._procs():
            for k, d in (_get(res, "tiny", "deep") or {}).items():
                p = _get(d, "plain", "median")
                o = lambda a: None if _get(d, a, "median") is None else _get(d, a, "median") - p  # noqa: E731
                sg = lambda v: "—" if v is None else f"{v * US:+.1f} µs"  # noqa: E731
                L.append(f"| {lab} | {k} | {_us(p)} | {sg(o('raw'))} | {sg(o('fi'))} | {sg(o('nnsight'))} |")
        L.append("")

    def _invokes(self, L):
        L.append("## 2. N invokes in one trace (tiny MLP, batch-1 inputs; µs per trace)\n")
        L.append("![time vs invokes](plot_invokes.png)\n")
        L.append("| process | case | N | plain (batched) | raw hooks (batched) | fastinterleave | nnsight |")
        L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for lab, res in self._procs():
            for case in ("save", "patch"):
                for n, d in (_get(res, "invokes", case) or {}).items():
                    g = lambda k: _get(d, k, "median")  # noqa: E731
                    L.append(f"| {lab} | {case} | {n} | {_us(g('plain'))} | {_us(g('raw'))} | {_us(g('fi'))} | {_us(g('nnsight'))} |")
        L.append("")
        L.append("Cost per extra invoke (least-squares slope over N):\n")
        L.append("| process | case | raw hooks | fastinterleave | nnsight |")
        L.append("| --- | --- | ---: | ---: | ---: |")
        for lab, res in self._procs():
            for case, d in (_get(res, "invokes", "per_invoke") or {}).items():
                L.append(f"| {lab} | {case} | {_us(d.get('raw'), 2)} | {_us(d.get('fi'), 2)} | {_us(d.get('nnsight'), 2)} |")
        L.append("")

    def _gpt2(self, L):
        L.append("## 3. GPT-2 shapes (random weights, ids (1, 16); ms per call)\n")
        L.append("| process | model | case | plain | raw hooks | fastinterleave | nnsight |")
        L.append("| --- | --- | --- | ---: | ---: | ---: | ---: |")
        for lab, res in self._procs():
            for shape, sd in (_get(res, "gpt2") or {}).items():
                for case, d in (sd.get("cases") or {}).items():
                    g = lambda k: _get(d, k, "median")  # noqa: E731
                    L.append(f"| {lab} | {shape} ({sd.get('modules')} modules) | {case} | {_ms(g('plain'))} | {_ms(g('raw'))} "
                             f"| {_ms(g('fi'))} | {_ms(g('nnsight'))} |")
        L.append("")
        L.append("Overhead over the plain forward, median of paired (back-to-back) differences, with the interquartile "
                 "range [q1, q3] — a range that spans 0 means the overhead is below this machine's noise:\n")
        L.append("| process | model | case | raw hooks | fastinterleave | nnsight |")
        L.append("| --- | --- | --- | ---: | ---: | ---: |")
        for lab, res in self._procs():
            for shape, sd in (_get(res, "gpt2") or {}).items():
                for case, d in (sd.get("paired") or {}).items():
                    def f(k):
                        v = d.get(k)
                        return "—" if not v else f"{v['median']*US:.0f} µs [{v['q1']*US:.0f}, {v['q3']*US:.0f}]"
                    L.append(f"| {lab} | {shape} | {case} | {f('raw')} | {f('fi')} | {f('nnsight')} |")
        L.append("")

    def _sweep(self, L):
        L.append("## 4. Activation-patching sweep, gpt2-tiny, 4 layers × 16 positions = 64 patched runs\n")
        L.append("![sweep](plot_sweep.png)\n")
        L.append("Ratio to raw hooks in one batch of 64, in the same process (ms in parentheses):\n")
        L.append("| process | approach | 64 single traces | 4 traces × 16 invokes | 1 trace × 64 invokes |")
        L.append("| --- | --- | ---: | ---: | ---: |")
        for lab, res in self._procs():
            sw = _get(res, "sweep") or {}
            for who in ("raw", "fi", "nnsight"):
                cells = []
                for way in ("single", "4x16", "1x64"):
                    d = sw.get(f"{who} {way}")
                    cells.append("—" if not d else f"{d['ratio']:.2f}× ({d['median']*1e3:.1f})")
                if any(c != "—" for c in cells):
                    L.append(f"| {lab} | {who} | " + " | ".join(cells) + " |")
            p = sw.get("plain 1x64")
            if p:
                L.append(f"| {lab} | plain forward, batch 64 (no patch) | | | {p['ratio']:.2f}× ({p['median']*1e3:.1f}) |")
        L.append("")

    def _generate(self, L):
        L.append("## 5. Generation: 16 new tokens, gpt2-tiny with KV cache, an edit at every step\n")
        L.append("| process | plain generate | + raw hook | fastinterleave | nnsight | fi / raw | nnsight / raw |")
        L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for lab, res in self._procs():
            g = _get(res, "generate")
            if not g:
                continue
            t = g.get("times", {})
            m = lambda k: _get(t, k, "median")  # noqa: E731
            fi_cell = _ms(m("fi")) if m("fi") is not None else (g.get("status", {}).get("fi") or "—")
            L.append(f"| {lab} | {_ms(m('plain'))} | {_ms(m('raw'))} | {fi_cell} | {_ms(m('nnsight'))} | "
                     f"{_x(_get(t, 'fi', 'ratio_raw'), 3)} | {_x(_get(t, 'nnsight', 'ratio_raw'), 3)} |")
        L.append("")

    def _memory(self, L):
        L.append("## 6. Memory: 128 invokes vs the plain batched forward (fresh process each; RSS rise over the RSS after imports)\n")
        mm = _get(self.main, "memory") or {}
        if mm:
            L.append(f"Model: 4 × Linear({mm['dim']}, {mm['dim']}); 128 inputs of (1, {mm['seq']}, {mm['dim']}); "
                     f"one activation of the batch = {mm['activation_mib']:.0f} MiB; under torch.no_grad().\n")
        L.append("| process | plain | raw hooks | fastinterleave | nnsight |")
        L.append("| --- | ---: | ---: | ---: | ---: |")
        for lab, res in self._procs():
            a = _get(res, "memory", "approaches") or {}
            if not a:
                continue
            c = lambda k: "—" if k not in a else f"{a[k]['rise_mib']:.0f} MiB ({a[k]['ratio']:.3f}×)"  # noqa: E731
            L.append(f"| {lab} | {c('plain')} | {c('raw')} | {c('fi')} | {c('nnsight')} |")
        L.append("")

    def _callgrind(self, L):
        L.append("## 7. Instructions per call (valgrind --tool=callgrind)\n")
        if "skipped" in self.cg:
            L.append(f"Callgrind: {self.cg['skipped']}.\n")
            return
        L.append("Repeatable whatever the load. Thousands of instructions per call (the empty loop's own count "
                 "subtracted); gc off inside each counted loop.\n")
        L.append("| process | case | plain | raw hooks | fastinterleave | nnsight | fi / raw | nnsight / fi |")
        L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for lab, r in self.cg.items():
            if "error" in r:
                L.append(f"| {lab} | {r['error'][:300]} | | | | | | |")
                continue
            for case, d in r.get("instructions", {}).items():
                k = lambda a: "—" if a not in d else f"{d[a]/1e3:,.0f}k"  # noqa: E731
                L.append(f"| {lab} | {case} | {k('plain')} | {k('raw')} | {k('fi')} | {k('nnsight')} | "
                         f"{_x(_div(d.get('fi'), d.get('raw')))} | {_x(_div(d.get('nnsight'), d.get('fi')))} |")
            for case, d in r.get("per_invoke", {}).items():
                k = lambda a: "—" if a not in d else f"{d[a]/1e3:,.1f}k"  # noqa: E731
                L.append(f"| {lab} | per extra invoke: {case} | — | {k('raw')} | {k('fi')} | {k('nnsight')} | "
                         f"{_x(_div(d.get('fi'), d.get('raw')))} | {_x(_div(d.get('nnsight'), d.get('fi')))} |")
        L.append("")

    def _envs(self, L):
        L.append("## Processes\n")
        L.append("| process | venv | torch | transformers | nnsight | fastinterleave (py sha1) | seconds per workload |")
        L.append("| --- | --- | --- | --- | --- | --- | --- |")
        for lab, d in self.data.items():
            e = d.get("env", {})
            secs = ", ".join(f"{k} {v:.0f}" for k, v in (d.get("seconds") or {}).items())
            L.append(f"| {lab} | {os.path.relpath(e.get('prefix', '?'), ROOT)} | {e.get('torch')} | {e.get('transformers')} | "
                     f"{e.get('nnsight') or '—'} | {_get(e, 'fastinterleave', 'py_sha1')} | {secs} |")
        L.append("")

    # -- plots -----------------------------------------------------------------------------------

    def plots(self, out_dir):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is missing: no plots (pip install matplotlib)")
            return []
        made = []
        colors = {"fi": "C0", "raw": "C2", "plain": "C7", "nnsight 0.8.1": "C1", "nnsight 0.4.11": "C3"}

        # 1. overhead vs number of interventions
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        any_line = False
        for lab, res in self._procs():
            deep = _get(res, "tiny", "deep") or {}
            if not deep:
                continue
            ks = sorted(deep, key=int)
            over = lambda who: [(_get(deep[k], who, "median") - _get(deep[k], "plain", "median")) * US for k in ks]  # noqa: E731
            x = [int(k) for k in ks]
            if lab == "main":
                ax.plot(x, over("fi"), "o-", color=colors["fi"], label="fastinterleave")
                ax.plot(x, over("raw"), "s-", color=colors["raw"], label="raw hooks")
                any_line = True
            elif _get(deep[ks[0]], "nnsight", "median") is not None:
                ax.plot(x, over("nnsight"), "^-", color=colors.get(lab), label=lab)
                ax.plot(x, over("fi"), ":", color=colors["fi"], alpha=0.5, label=f"fastinterleave (in {lab}'s process)")
        if any_line:
            ax.set_xlabel("interventions (outputs saved) in one trace")
            ax.set_ylabel("time over the plain forward (µs, symlog)")
            ax.set_yscale("symlog", linthresh=10)
            ax.set_title("Overhead vs number of interventions\n32 × Linear(16, 16), batch 1, 1 thread")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = os.path.join(out_dir, "plot_interventions.png")
            fig.savefig(path, dpi=110)
            made.append(path)
        plt.close(fig)

        # 2. time vs number of invokes
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
        any_line = False
        for ax, case in zip(axes, ("save", "patch")):
            for lab, res in self._procs():
                d = _get(res, "invokes", case) or {}
                if not d:
                    continue
                ns = sorted(d, key=int)
                x = [int(n) for n in ns]
                t = lambda who: [_get(d[n], who, "median") * US for n in ns]  # noqa: E731
                if lab == "main":
                    ax.plot(x, t("fi"), "o-", color=colors["fi"], label="fastinterleave")
                    ax.plot(x, t("raw"), "s-", color=colors["raw"], label="raw hooks, one batch")
                    ax.plot(x, t("plain"), "--", color=colors["plain"], label="plain batched forward")
                    any_line = True
                elif _get(d[ns[0]], "nnsight", "median") is not None:
                    ax.plot(x, t("nnsight"), "^-", color=colors.get(lab), label=lab)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("invokes in one trace (batch-1 inputs)")
            ax.set_title(f"{case}: " + ("each invoke saves its row" if case == "save" else "each invoke patches its row"))
            ax.grid(alpha=0.3, which="both")
        if any_line:
            axes[0].set_ylabel("time per trace (µs)")
            axes[0].legend(fontsize=8)
            fig.suptitle("Time vs number of invokes (tiny MLP, 1 thread)")
            fig.tight_layout()
            path = os.path.join(out_dir, "plot_invokes.png")
            fig.savefig(path, dpi=110)
            made.append(path)
        plt.close(fig)

        # 3. sweep time per approach
        bars = []
        for lab, res in self._procs():
            sw = _get(res, "sweep") or {}
            for who in ("raw", "fi", "nnsight"):
                if lab != "main" and who != "nnsight":
                    continue
                vals = [_get(sw, f"{who} {w}", "ratio") for w in ("single", "4x16", "1x64")]
                if all(v is not None for v in vals):
                    name = {"raw": "raw hooks", "fi": "fastinterleave"}.get(who, lab)
                    bars.append((name, vals, colors.get(lab if who == "nnsight" else who)))
        if bars:
            import numpy as np

            fig, ax = plt.subplots(figsize=(7.5, 4.2))
            ways = ["64 single traces", "4 traces × 16 invokes", "1 trace × 64 invokes"]
            w = 0.8 / len(bars)
            for i, (name, vals, c) in enumerate(bars):
                xs = np.arange(3) + (i - (len(bars) - 1) / 2) * w
                ax.bar(xs, vals, w, label=name, color=c)
                for xx, v in zip(xs, vals):
                    ax.text(xx, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks(range(3))
            ax.set_xticklabels(ways)
            ax.set_ylabel("time / raw hooks in one batch of 64 (same process)")
            ax.set_title("gpt2-tiny patching sweep: 4 layers × 16 positions")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, axis="y")
            fig.tight_layout()
            path = os.path.join(out_dir, "plot_sweep.png")
            fig.savefig(path, dpi=110)
            made.append(path)
            plt.close(fig)
        return made


if __name__ == "__main__":
    main()
