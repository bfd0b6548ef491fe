"""Shared pieces of the benchmarks: the timing harness, the models, the anchors.

Every benchmark process times the approaches side by side in one process:
  plain    the model's forward alone (the floor)
  raw      the same work with plain ``register_forward_hook`` hooks registered and removed
           by hand (the practical floor)
  fi       fastinterleave (``import fastinterleave as nnsight``)
  nnsight  the nnsight release installed in this venv, if any (0.8.1 or 0.4.11: they cannot
           share a process, so ``run.py`` runs one process per version)
"""

import copy
import gc
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict

import torch

torch.set_num_threads(1)

import fastinterleave  # noqa: E402

try:  # the anchor, when this venv has one (see benchmarks/setup_anchors.sh)
    import nnsight as _nnsight  # noqa: E402
except ImportError:
    _nnsight = None

if os.environ.get("FI_BENCH_NO_ANCHOR") == "1":
    _nnsight = None

NNSIGHT = _nnsight
NNSIGHT_VERSION = getattr(_nnsight, "__version__", None)
NN04 = bool(NNSIGHT_VERSION and NNSIGHT_VERSION.startswith("0.4"))


# -- timing ------------------------------------------------------------------------------


def bench(fns, reps=15, warmup=3, target_s=0.02, max_inner=2000):
    """Median seconds per call of each callable in ``fns`` (name -> fn).

    Interleaved: every repetition runs each approach once (a block of ``inner`` calls,
    sized so a block lasts about ``target_s``), rotating the order, so slow drifts of a
    shared machine hit all approaches alike. Returns {name: {"median", "q1", "q3", "n"}}."""
    names = list(fns)
    inner = {}
    for name in names:
        fn = fns[name]
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        inner[name] = max(1, min(max_inner, int(target_s / one)))
    samples = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = fns[name]
            k = inner[name]
            gc.collect(0)  # the young generation only: a full collection here costs more than the calls
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        out[name] = {"median": statistics.median(s), "q1": q[0], "q3": q[2], "n": len(s) * inner[name]}
    return out


def paired_overhead(fn, base, reps=30, warmup=2):
    """Median over repetitions of (fn - base) timed back to back, in seconds, with the
    interquartile range: for overheads far below the noise of one call (gpt2-small)."""
    for _ in range(warmup):
        fn()
        base()
    diffs = []
    for r in range(reps):
        pair = [(fn, 1), (base, -1)] if r % 2 == 0 else [(base, -1), (fn, 1)]
        d = 0.0
        for f, sign in pair:
            gc.collect(0)
            t0 = time.perf_counter()
            f()
            d += sign * (time.perf_counter() - t0)
        diffs.append(d)
    q = statistics.quantiles(diffs, n=4)
    return {"median": statistics.median(diffs), "q1": q[0], "q3": q[2], "n": reps}


def slope(xs, ys):
    """Least-squares slope of ys over xs."""
    mx = sum(xs) / len(xs)
    my = sum(ys) / len(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    den = sum((x - mx) ** 2 for x in xs)
    return num / den if den else float("nan")


# -- values ------------------------------------------------------------------------------


def val(x):
    """The real value of a saved proxy (fastinterleave / nnsight 0.4 keep proxies inside
    lists; top-level locals are injected), or x itself."""
    if isinstance(x, torch.Tensor):
        return x
    v = getattr(x, "value", x)
    return v


def check_close(name, got, ref, atol=1e-5, rtol=1e-4):
    """Raises if ``got`` and ``ref`` (tensors, or lists/tuples of them) differ."""
    if isinstance(ref, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(ref):
            raise AssertionError(f"{name}: expected {len(ref)} values, got {type(got).__name__} {got!r:.200}")
        for i, (g, r) in enumerate(zip(got, ref)):
            check_close(f"{name}[{i}]", g, r, atol, rtol)
        return
    got = val(got)
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{name}: expected a tensor, got {type(got).__name__}")
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
    torch.testing.assert_close(got.detach(), ref.detach(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


class Observe:
    """Records the model's final output while active (a forward hook appended last, so it
    sees what every intervention left): lets each approach's timed function be checked as is."""

    def __init__(self, module):
        self.module = module
        self.outputs = []

    def __enter__(self):
        # The module and the copies the tracing libraries run.
        modules = [self.module, *_COPIES.get(id(self.module), [])]
        self.handles = [m.register_forward_hook(self._hook) for m in modules]
        return self

    def _hook(self, module, args, output):
        if hasattr(output, "logits"):
            output = output.logits
        self.outputs.append(output.detach().clone())

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    @property
    def last(self):
        return self.outputs[-1]


def observed(module, fn):
    """(fn's return value, the model's final output during that call)."""
    with Observe(module) as obs:
        ret = fn()
    return ret, obs.last


# -- models ------------------------------------------------------------------------------


def tiny_mlp(seed=0):
    """nnsight's tiny test model: ``Sequential(layer1=Linear(5, 10), layer2=Linear(10, 2))``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(OrderedDict(layer1=torch.nn.Linear(5, 10), layer2=torch.nn.Linear(10, 2))).eval()


def deep_mlp(depth=32, width=16, seed=0):
    """``Sequential(l0..l{depth-1} = Linear(width, width))``: many cheap sites."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        OrderedDict((f"l{i}", torch.nn.Linear(width, width)) for i in range(depth))
    ).eval()


GPT2_SHAPES = {
    # 4 layers x 128 wide; a 1000-token vocabulary so the LM head does not hide the rest.
    "gpt2-tiny": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0, eos_token_id=0),
    # gpt2-small's shape: 12 x 768, GPT2Config's defaults (vocab 50257).
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12),
}


def gpt2(shape, seed=0, use_cache=False):
    """A GPT2LMHeadModel of the named shape with random weights (nothing is downloaded)."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    cfg = GPT2Config(**GPT2_SHAPES[shape], use_cache=use_cache)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    # Blocks return (hidden, ...) in transformers 4.x and the hidden tensor in 5.x.
    seen = []
    h = model.transformer.h[0].register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long))
    h.remove()
    model.block_tuple = isinstance(seen[0], tuple)
    return model


def hidden(out, is_tuple):
    """A block's hidden states from its output (proxy or tensor)."""
    return out[0] if is_tuple else out


# -- the wrappers --------------------------------------------------------------------------


# Each tracing library wraps its own copy of the model (same weights): fastinterleave
# keeps its hooks installed between traces, and nnsight 0.8 wraps module forwards, so on a
# shared module they would slow down the plain and raw-hook approaches timed beside them.
_COPIES = {}  # id(original) -> the copies wrapped


def _own_copy(module):
    clone = copy.deepcopy(module)
    _COPIES.setdefault(id(module), []).append(clone)
    return clone


def fi_wrap(module, own_copy=True):
    return fastinterleave.NNsight(_own_copy(module) if own_copy else module)


def nn_wrap(module, batched=False, own_copy=True):
    """nnsight's NNsight over ``module``; ``batched=True`` gives a subclass whose ``_batch``
    concatenates positional tensor inputs (neither release batches several invokes on a
    plain NNsight: 0.4.11's default is broken, 0.8.1 raises NotImplementedError)."""
    if NNSIGHT is None:
        return None
    if own_copy:
        module = _own_copy(module)
    if not batched:
        return NNSIGHT.NNsight(module)
    return _batched_class()(module)


_BATCHED = None


def _batched_class():
    global _BATCHED
    if _BATCHED is not None:
        return _BATCHED
    if NN04:

        class Batched(NNSIGHT.NNsight):
            def _prepare_input(self, *args, **kwargs):
                return (args, kwargs), len(args[0])

            def _batch(self, batched, *args, **kwargs):
                if batched is None:
                    return args, kwargs
                return tuple(torch.cat([a, b]) for a, b in zip(batched[0], args)), kwargs

    else:

        class Batched(NNSIGHT.NNsight):
            def _batch_size(self, *inputs, **kwargs):
                return len(inputs[0]) if inputs else 0

            def _batch(self, invokes, fn):
                if len(invokes) == 1:
                    return invokes[0]
                n = len(invokes[0][0])
                args = tuple(torch.cat([inv[0][i] for inv in invokes]) for i in range(n))
                return args, dict(invokes[0][1])

    _BATCHED = Batched
    return Batched


# -- the environment -----------------------------------------------------------------------


def fi_fingerprint():
    """What fastinterleave this process runs: version and a hash of its files (the anchor
    venvs hold a wheel built by setup_anchors.sh, which can fall behind the working tree)."""
    import hashlib

    pkg = os.path.dirname(fastinterleave.__file__)
    h = hashlib.sha1()
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            with open(os.path.join(pkg, name), "rb") as f:
                h.update(name.encode() + f.read())
    return {"version": fastinterleave.__version__, "py_sha1": h.hexdigest()[:10], "path": pkg}


def environment():
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "prefix": sys.prefix,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "nnsight": NNSIGHT_VERSION,
        "fastinterleave": fi_fingerprint(),
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load": os.getloadavg(),
    }
