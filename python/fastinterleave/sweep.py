"""Intervention sweeps: activation patching, ablation scans and steering grids.

One call runs an intervention at every site of a grid (module x position x head x
scale), measures a metric for each, and returns a labelled tensor::

    from fastinterleave import sweep

    result = sweep.run(
        model,                                              # NNsight, LanguageModel or nn.Module
        clean=clean_ids, corrupted=corrupted_ids,           # [N, T] token ids (N example pairs)
        sites=sweep.Sites("transformer.h.*", positions="each"),
        intervention=sweep.Patch(),                         # clean -> corrupted
        metric=sweep.logit_diff(good_token, bad_token),
    )
    result.values       # tensor [layer, position]; result.dims, result.coords label it
    result.heatmap("patching.png", value="normalized")

How it runs. Interventions are packed into as few forward passes as fit a memory
budget: each forward pass is one trace whose invokes are (1) the clean input, read at
every site of the chunk (the patch source), (2) on the first chunk, the unchanged input
(the baseline), and (3) one invoke per module of the chunk, holding every intervention
on that module as rows of the batch, edited with one indexed assignment. The metric
runs once per forward pass on the whole batch's output. Everything goes through the
public trace / invoke API.

- ``batch_size`` (interventions per forward pass) or ``memory_budget`` (bytes, or a
  string like ``"2GB"``) sets the packing; by default the budget is half the available
  RAM (80 % of free GPU memory on CUDA) and the memory one row costs is measured on a
  probe run (cached per model and input shape).
- ``results="sweep.fisweep"``: finished chunks are appended to that file as they
  complete (flushed and fsync'ed); running again with the same arguments loads them
  and computes only what is missing.
- ``backend="ray"``: chunks run on Ray actors that each build the model once from
  ``model_factory``; a chunk whose worker dies is retried on another (or the restarted)
  worker; results are assembled in grid order.
- :func:`attribute`: attribution patching, the first-order estimate for every site from
  one forward and one backward pass; ``result.confirm(k)`` runs the exact sweep on the
  top ``k`` sites.
"""

import builtins
import collections
import collections.abc
import functools
import hashlib
import inspect
import io
import json
import math
import os
import re
import struct
import sys
import time
import weakref

import torch

from .model import NNsight

__all__ = [
    "Add",
    "Mean",
    "Patch",
    "RayPool",
    "Sites",
    "SweepError",
    "SweepResult",
    "Zero",
    "attribute",
    "load_results",
    "logit",
    "logit_diff",
    "logprob",
    "measure_peak",
    "run",
]

# Python's builtins under the names fastinterleave shadows (fastinterleave.list, ...).
_list, _dict, _tuple, _int, _float, _str, _set = (
    builtins.list, builtins.dict, builtins.tuple, builtins.int, builtins.float, builtins.str, builtins.set
)

# Rows per forward pass at most, whatever the budget (bigger batches stop paying off,
# and smaller chunks keep the progress bar and the results file fine-grained).
MAX_ROWS = {"cpu": 512, "cuda": 4096}
# Fraction of the measured budget actually planned for (allocator slack, the metric).
_SAFETY = 0.85


class SweepError(RuntimeError):
    """A sweep could not be planned or run (bad arguments, a results file of another
    sweep, a chunk that failed on every retry)."""


# -- what to intervene on ---------------------------------------------------------------


class Sites:
    """The grid of places an intervention goes: modules x positions x heads.

    ``modules``: a module path with one ``*`` (``"transformer.h.*"`` expands to every
    block, axis ``"layer"`` labelled 0, 1, ...), or a list of paths (axis ``"module"``).
    ``positions``: ``None`` (the whole sequence at once, no axis), ``"each"`` (every
    position of the input, axis ``"position"``), or a list / range of positions
    (negative ones count from the end). ``heads``: ``None``, an int ``H`` (every head:
    the last dimension is split into ``H`` equal slices), or a list of heads (with
    ``n_heads``, default: the model config's ``n_head`` / ``num_attention_heads``).
    ``on``: ``"output"`` (default) or ``"input"`` (the first positional argument: use
    it for heads, e.g. ``"transformer.h.*.attn.c_proj"``, whose input is the
    concatenated head outputs). ``select``: which element of a tuple value to edit
    (``"auto"``: element 0 of a tuple, e.g. a GPT-2 block's hidden states).
    ``axis``: overrides the module axis name."""

    def __init__(self, modules, positions=None, heads=None, *, n_heads=None, on="output", select="auto", axis=None):
        if on not in ("output", "input"):
            raise ValueError(f"Sites(on=...) is 'output' or 'input', not {on!r}")
        if isinstance(modules, _str):
            if modules.count("*") > 1:
                raise ValueError("Sites: use at most one '*' in a module pattern (or pass a list of paths)")
        else:
            modules = _list(modules)
            if not modules or not all(isinstance(m, _str) for m in modules):
                raise ValueError("Sites(modules=...) is a path pattern with '*' or a non-empty list of module paths")
        if isinstance(positions, _str) and positions != "each":
            raise ValueError(f"Sites(positions=...) is None, 'each' or a list of ints, not {positions!r}")
        if positions is not None and not isinstance(positions, _str):
            positions = [_int(p) for p in positions]
            if not positions:
                raise ValueError("Sites(positions=[]) names no position")
        if heads is not None:
            if isinstance(heads, _int):
                n_heads = n_heads or heads
                heads = _list(range(heads))
            else:
                heads = [_int(h) for h in heads]
                if not heads:
                    raise ValueError("Sites(heads=[]) names no head")
        self.modules = modules
        self.positions = positions
        self.heads = heads
        self.n_heads = n_heads
        self.on = on
        self.select = select
        self.axis = axis

    def _key(self):
        return ("Sites", self.modules, self.positions, self.heads, self.n_heads, self.on, self.select, self.axis)

    def __repr__(self):
        return (f"Sites({self.modules!r}, positions={self.positions!r}, heads={self.heads!r}, "
                f"on={self.on!r})")


class Intervention:
    """What is done at each site. Subclasses: :class:`Patch`, :class:`Zero`,
    :class:`Mean`, :class:`Add`."""

    kind = None
    needs_source = False

    def _key(self):
        return (type(self).__name__,)

    def __repr__(self):
        return f"{type(self).__name__}()"


class Patch(Intervention):
    """Copies the ``clean`` run's value at the site into the ``corrupted`` run
    (denoising; swap the two inputs for noising)."""

    kind = "patch"
    needs_source = True


class Zero(Intervention):
    """Sets the value at the site to zero (zero ablation)."""

    kind = "zero"


class Mean(Intervention):
    """Replaces the value at the site by its mean over ``reference`` inputs (default:
    the swept inputs): over examples and positions, or over examples only with
    ``per_position=True`` (then ``reference`` must have the swept inputs' length)."""

    kind = "mean"

    def __init__(self, reference=None, per_position=False):
        self.reference = reference
        self.per_position = per_position

    def _key(self):
        return ("Mean", _input_key(self.reference), self.per_position)

    def __repr__(self):
        return f"Mean(per_position={self.per_position})"


class Add(Intervention):
    """Adds ``scale * vector`` at the site (steering). ``vector``: a tensor of the site's
    width (or of one head's width with ``Sites(heads=...)``), or a dict from module
    path or axis label to tensor. ``scales=[...]`` sweeps the scale too (axis
    ``"scale"``)."""

    kind = "add"

    def __init__(self, vector, scale=1.0, scales=None):
        self.vector = vector
        self.scales = None if scales is None else [_float(s) for s in scales]
        self.scale = _float(scale)
        if self.scales is not None and not self.scales:
            raise ValueError("Add(scales=[]) names no scale")

    def _key(self):
        vec = self.vector
        if isinstance(vec, collections.abc.Mapping):
            vec = sorted((_str(k), _tensor_key(torch.as_tensor(v))) for k, v in vec.items())
        else:
            vec = _tensor_key(torch.as_tensor(vec))
        return ("Add", vec, self.scale, self.scales)

    def vector_for(self, path, label):
        vec = self.vector
        if isinstance(vec, collections.abc.Mapping):
            for key in (path, label, _str(label)):
                if key in vec:
                    return torch.as_tensor(vec[key])
            raise SweepError(f"Add: no vector for module '{path}' (label {label!r}) in the vector dict")
        return torch.as_tensor(vec)

    def __repr__(self):
        return f"Add(scale={self.scale}, scales={self.scales})"


# -- metrics ------------------------------------------------------------------------------


class _TokenMetric:
    """Base of the built-in metrics: ``metric(logits) -> one value per row``.

    ``logits``: the model's output (``.logits`` of a Hugging Face output), rows first.
    Rows are intervention-major and example-minor (row ``r`` is example ``r % N``), so a
    per-example token list of length ``N`` applies to every intervention. The same
    metric runs on tensors (exact sweeps) and on proxies (:func:`attribute`)."""

    def __init__(self, position=-1):
        self.position = position

    def _pick(self, x, token):
        """x: [R, V]; token: int or a length-N list/tensor of per-example tokens."""
        if isinstance(token, (_int,)) and not isinstance(token, bool):
            return x[:, token]
        token = torch.as_tensor(token, dtype=torch.long).reshape(-1)
        n = token.numel()
        if n == 1:
            return x[:, _int(token)]
        return x.unflatten(0, (-1, n))[:, torch.arange(n), token].reshape(-1)

    def _key(self):
        return (type(self).__name__, repr(sorted(vars(self).items(), key=lambda kv: kv[0])))


def _token_repr(token):
    return token if isinstance(token, _int) else torch.as_tensor(token).tolist()


class logit_diff(_TokenMetric):
    """``logit[good] - logit[bad]`` at ``position`` (default the last). ``good`` / ``bad``:
    a token id, or one per example."""

    def __init__(self, good, bad, position=-1):
        super().__init__(position)
        self.good = _token_repr(good)
        self.bad = _token_repr(bad)

    def __call__(self, logits):
        x = logits[:, self.position]
        return self._pick(x, self.good) - self._pick(x, self.bad)

    def __repr__(self):
        return f"logit_diff({self.good}, {self.bad}, position={self.position})"


class logit(_TokenMetric):
    """``logit[token]`` at ``position``."""

    def __init__(self, token, position=-1):
        super().__init__(position)
        self.token = _token_repr(token)

    def __call__(self, logits):
        return self._pick(logits[:, self.position], self.token)

    def __repr__(self):
        return f"logit({self.token}, position={self.position})"


class logprob(_TokenMetric):
    """``log_softmax(logits)[token]`` at ``position``."""

    def __init__(self, token, position=-1):
        super().__init__(position)
        self.token = _token_repr(token)

    def __call__(self, logits):
        return self._pick(logits[:, self.position].log_softmax(-1), self.token)

    def __repr__(self):
        return f"logprob({self.token}, position={self.position})"


# -- the result -----------------------------------------------------------------------------


class SweepResult:
    """A labelled sweep result.

    ``values``: a tensor with one axis per entry of ``dims`` (e.g. ``("layer",
    "position")``); ``coords[dim]``: the labels along that axis. Cells a sweep did not
    run (``subset=``) are NaN. ``baseline``: the metric on the unchanged input (the
    corrupted one for patching); ``reference``: on the clean input (or None).
    ``effect`` = values - baseline; ``normalized`` = effect / (reference - baseline).
    ``method``: ``"exact"`` or ``"attribution"`` (values = baseline + the linear estimate).
    ``stats``: forward passes, rows per pass, runs computed / loaded from a results file,
    retries, seconds."""

    def __init__(self, values, dims, coords, baseline, reference, method="exact", stats=None, rerun=None):
        self.values = values
        self.dims = _tuple(dims)
        self.coords = _dict(coords)
        self.baseline = baseline
        self.reference = reference
        self.method = method
        self.stats = _dict(stats or {})
        self._rerun = rerun

    # -- derived values --------------------------------------------------------------

    @property
    def effect(self):
        """values - baseline: how much the intervention moved the metric."""
        return self.values - self.baseline

    @property
    def normalized(self):
        """(values - baseline) / (reference - baseline): 0 = unchanged, 1 = the clean run."""
        if self.reference is None:
            raise ValueError("normalized needs a reference: pass clean= to the sweep")
        return (self.values - self.baseline) / (self.reference - self.baseline)

    def _get(self, value):
        if isinstance(value, torch.Tensor):
            return value
        if value in ("values", "effect", "normalized"):
            return getattr(self, value)
        raise ValueError(f"value is 'values', 'effect', 'normalized' or a tensor, not {value!r}")

    # -- access ---------------------------------------------------------------------------

    def sel(self, **coords):
        """The values at the given labels: ``result.sel(layer=3, position=5)``."""
        index = []
        for dim in self.dims:
            if dim in coords:
                labels = self.coords[dim]
                label = coords.pop(dim)
                try:
                    index.append(labels.index(label))
                except ValueError:
                    raise KeyError(f"{dim} has no label {label!r}; labels: {labels}") from None
            else:
                index.append(slice(None))
        if coords:
            raise KeyError(f"no dimension {sorted(coords)}; dims: {self.dims}")
        return self.values[_tuple(index)]

    def top(self, k=10, by="effect", largest="abs"):
        """The ``k`` cells with the largest ``by`` ("effect", "values" or "normalized"):
        ``largest="abs"`` (default), ``"max"`` or ``"min"``. A list of dicts of labels plus
        ``"value"``: pass it as ``subset=`` to run those cells exactly."""
        x = self._get(by)
        if "example" in self.dims:
            x = x.mean(-1)
        dims = [d for d in self.dims if d != "example"]
        flat = x.reshape(-1).double()
        valid = ~torch.isnan(flat)
        key = {"abs": flat.abs(), "max": flat, "min": -flat}[largest]
        key = torch.where(valid, key, torch.full_like(key, -math.inf))
        k = builtins.min(k, _int(valid.sum()))
        order = torch.topk(key, k).indices.tolist() if k else []
        shape = [len(self.coords[d]) for d in dims]
        out = []
        for flat_i in order:
            cell = {}
            rest = flat_i
            for d, n in zip(reversed(dims), reversed(shape)):
                cell[d] = self.coords[d][rest % n]
                rest //= n
            cell = {d: cell[d] for d in dims}
            cell["value"] = flat[flat_i].item()
            out.append(cell)
        return out

    def confirm(self, k=10, by="effect", **overrides):
        """Runs the exact sweep on the top ``k`` cells of this (attribution) result;
        returns its :class:`SweepResult` (NaN elsewhere). Keywords override the
        original arguments (``batch_size=``, ``backend=``...)."""
        if self._rerun is None:
            raise SweepError("this result does not know how it was made: call sweep.run(..., subset=result.top(k))")
        kwargs = _dict(self._rerun)
        kwargs.update(overrides)
        kwargs["subset"] = self.top(k, by=by)
        return run(**kwargs)

    def to_dict(self):
        """Plain Python data: values (nested lists), dims, coords, baseline, reference."""
        def plain(x):
            return x.tolist() if isinstance(x, torch.Tensor) else x
        return {"values": plain(self.values), "dims": _list(self.dims), "coords": self.coords,
                "baseline": plain(self.baseline), "reference": plain(self.reference), "method": self.method}

    def __repr__(self):
        shape = " x ".join(f"{d}={len(self.coords[d])}" for d in self.dims)
        return f"SweepResult({self.method}, {shape}, stats={self.stats})"

    # -- pictures -------------------------------------------------------------------------

    def heatmap(self, path=None, value="effect", title=None, labels=None, cmap="RdBu_r", dpi=120):
        """Draws ``value`` ("effect", "values", "normalized", or a tensor of the same
        shape) as a heatmap: rows = the first axis, columns = the second; a third axis
        (heads, scales, examples) gives one panel per label. ``labels={"position":
        ["The", " cat", ...]}`` replaces tick labels. Writes a PNG when ``path`` is given;
        returns the matplotlib ``Figure``."""
        from matplotlib.figure import Figure

        data = self._get(value).detach().double().cpu()
        coords = {d: _list(self.coords[d]) for d in self.dims}
        for d, names in (labels or {}).items():
            if d not in coords or len(names) != len(coords[d]):
                raise ValueError(f"labels[{d!r}] must give {len(coords.get(d, []))} names")
            coords[d] = _list(names)
        dims = _list(self.dims)
        if data.dim() == 1:
            data = data[None, :]
            dims = ["", dims[0]]
            coords[""] = [""]
        if data.dim() > 3:
            raise ValueError(f"heatmap draws up to 3 axes; select some first (dims {self.dims})")
        panels = [(None, data)] if data.dim() == 2 else [
            (coords[dims[2]][i], data[..., i]) for i in range(data.shape[-1])
        ]
        finite = data[~torch.isnan(data)]
        vmax = builtins.max(finite.abs().max().item(), 1e-12) if finite.numel() else 1.0
        n = len(panels)
        ncols = builtins.min(n, 4)
        nrows = math.ceil(n / ncols)
        height, width = data.shape[0], data.shape[1]
        fig = Figure(figsize=(builtins.max(4.0, 0.45 * width + 2) * ncols, builtins.max(2.5, 0.4 * height + 1.5) * nrows))
        what = value if isinstance(value, _str) else "value"
        for i, (label, panel) in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            im = ax.imshow(panel.numpy(), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
            ax.set_xticks(range(width), [_str(c) for c in coords[dims[1]]], rotation=90 if width > 12 else 0,
                          fontsize=8)
            ax.set_yticks(range(height), [_str(c) for c in coords[dims[0]]], fontsize=8)
            ax.set_xlabel(dims[1])
            ax.set_ylabel(dims[0])
            if label is not None:
                ax.set_title(f"{dims[2]} {label}", fontsize=9)
            fig.colorbar(im, ax=ax, label=what)
        fig.suptitle(title or f"{self.method} sweep: {what}")
        fig.tight_layout()
        if path is not None:
            fig.savefig(os.fspath(path), dpi=dpi)
        return fig


# -- fingerprints -----------------------------------------------------------------------------


def _tensor_key(t):
    t = t.detach()
    h = hashlib.sha256()
    h.update(f"{_str(t.dtype)}{_tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "t:" + h.hexdigest()[:32]


def _input_key(x):
    if x is None or isinstance(x, (_str, _int, _float, bool)):
        return x
    if isinstance(x, torch.Tensor):
        return _tensor_key(x)
    if isinstance(x, collections.abc.Mapping):
        return ("dict", sorted((_str(k), _input_key(v)) for k, v in x.items()))
    if isinstance(x, (_list, _tuple)):
        return (type(x).__name__, [_input_key(v) for v in x])
    return repr(x)


def _code_key(code):
    parts = [code.co_code.hex(), repr(code.co_names)]
    for c in code.co_consts:
        parts.append(_code_key(c) if hasattr(c, "co_code") else repr(c))
    return "|".join(parts)


def _callable_key(fn):
    if hasattr(fn, "_key"):
        return fn._key()
    if isinstance(fn, functools.partial):
        return ("partial", _callable_key(fn.func), _input_key(fn.args), _input_key(fn.keywords))
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        # A callable object: its class's __call__ and its attributes.
        call = getattr(type(fn), "__call__", None)
        state = _input_key(vars(fn)) if hasattr(fn, "__dict__") else repr(fn)
        return (type(fn).__qualname__, _code_key(call.__code__) if hasattr(call, "__code__") else None, state)
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)
    cells = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            cells.append(_input_key(cell.cell_contents))
        except ValueError:
            cells.append(None)
    return (name, _code_key(code) if code is not None else None, cells)


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, default=repr, sort_keys=True).encode()).hexdigest()


def _model_key(model):
    """Class, parameter names / shapes / dtypes and two checksums per tensor."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}{_tuple(p.shape)}{p.dtype}".encode())
            if p.is_floating_point() and p.device.type != "meta":
                q = p.float()
                h.update(struct.pack("<dd", q.sum().item(), q.abs().sum().item()))
    return h.hexdigest()


# -- helpers on inputs ----------------------------------------------------------------------------


def _as_invoke_args(x):
    """(args, kwargs) for ``tracer.invoke``."""
    if isinstance(x, collections.abc.Mapping):
        return (), _dict(x)
    if isinstance(x, _tuple):
        return x, {}
    return (x,), {}


def _tile(x, k):
    """``k`` copies of an input's rows, copy-major (row i*N + n is example n)."""
    if k == 1:
        return x
    if isinstance(x, torch.Tensor):
        return x.repeat(k, *([1] * (x.dim() - 1))) if x.dim() else x
    if isinstance(x, _str):
        return [x] * k
    if isinstance(x, collections.abc.Mapping):
        return {key: _tile(v, k) for key, v in x.items()}
    if isinstance(x, _tuple):
        return _tuple(_tile(v, k) for v in x)
    if isinstance(x, _list):
        if x and all(isinstance(v, _int) for v in x):  # one sequence of token ids
            return [_list(x) for _ in range(k)]
        return _list(x) * k
    return x


def _to_device(x, device):
    if device is None or device.type == "meta":
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, collections.abc.Mapping):
        return {key: _to_device(v, device) for key, v in x.items()}
    if isinstance(x, _tuple):
        return _tuple(_to_device(v, device) for v in x)
    return x


def _parse_bytes(budget):
    if budget is None or isinstance(budget, (_int, _float)):
        return budget
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?i?b?)\s*", _str(budget).lower())
    if not m:
        raise ValueError(f"memory_budget: cannot read {budget!r} (bytes, or e.g. '512MB', '2GiB')")
    unit = m.group(2).rstrip("b").rstrip("i")
    factor = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}[unit]
    return _int(_float(m.group(1)) * factor)


_AVAILABLE = {}  # device -> (time, bytes): /proc/meminfo is read at most every 2 s


def _available_bytes(device):
    now = time.monotonic()
    key = _str(device)
    hit = _AVAILABLE.get(key)
    if hit is not None and now - hit[0] < 2.0:
        return hit[1]
    value = _available_now(device)
    _AVAILABLE[key] = (now, value)
    return value


def _available_now(device):
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return _int(free * 0.8)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return _int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 4 * 2 ** 30


class _quiet_stderr:
    """Silences file descriptor 2 (the profiler's start/stop banner) for a moment."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        return False


def measure_peak(fn, device=None):
    """(fn's result, the peak bytes of tensor memory allocated while it ran, above what
    was allocated before). CUDA: the caching allocator's statistics. CPU: the
    allocation events of ``torch.profiler`` (``profile_memory=True``)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.nbytes() != 0]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = builtins.max(peak, current)
    return out, peak


# -- the runner: one process's model, the plan, and chunk execution --------------------------------


class _Spec:
    """Everything a sweep needs except the model (pickled to Ray workers)."""

    def __init__(self, target, source, sites, intervention, metric, per_example, has_clean):
        self.target = target
        self.source = source
        self.sites = sites
        self.intervention = intervention
        self.metric = metric
        self.per_example = per_example
        self.has_clean = has_clean

    def key(self):
        return _digest([
            _input_key(self.target), _input_key(self.source), self.sites._key(), self.intervention._key(),
            _callable_key(self.metric), self.per_example,
        ])


_WRAPPERS = weakref.WeakKeyDictionary()  # nn.Module -> its NNsight wrapper
_PROBES = weakref.WeakKeyDictionary()  # NNsight -> {spec key: (structure, bytes per row)}


def _wrap(model):
    if isinstance(model, NNsight):
        return model
    if isinstance(model, torch.nn.Module):
        wrapper = _WRAPPERS.get(model)
        if wrapper is None:
            wrapper = _WRAPPERS[model] = NNsight(model)
        return wrapper
    raise TypeError(f"sweep: model must be an NNsight / LanguageModel or a torch.nn.Module, not {type(model).__name__}")


def _model_device(model):
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class _Runner:
    """Runs chunks of a sweep on one model (in this process or as a Ray actor)."""

    def __init__(self, model, spec=None):
        if callable(model) and not isinstance(model, (NNsight, torch.nn.Module)):
            model = model()  # a factory (Ray workers build their model here)
        self.model = _wrap(model)
        self.spec = spec
        self.device = None
        self.plan = None
        self._consts = {}
        self._means = None

    # -- entry points of a Ray worker (one model, many sweeps) ---------------------------

    def prepare(self, sweep_id, bundle, want_model_key=False):
        """Takes a sweep's spec (``bundle``: [a reference to (spec, budget, batch_size)])
        and plans it."""
        spec, budget, batch_size = _fetch(bundle)
        self.use(spec)
        self._sweep_id = sweep_id
        return self.describe(budget, batch_size, want_model_key)

    def chunk(self, sweep_id, bundle, run_ids, refs):
        """Runs one chunk; a worker restarted by Ray prepares the sweep again first."""
        if getattr(self, "_sweep_id", None) != sweep_id:
            self.prepare(sweep_id, bundle)
        return self.run_chunk(run_ids, refs)

    def use(self, spec):
        self.spec = spec
        self.plan = None
        self._consts = {}
        self._means = None

    # -- planning ----------------------------------------------------------------------------

    def envoy(self, path):
        env = self.model
        for part in path.split(".") if path else ():
            env = getattr(env, part)
        return env

    def site_value(self, path):
        """The proxy of a site's tensor, inside a trace."""
        info = self.plan["site_info"][path]
        env = self.envoy(path)
        value = env.output if self.spec.sites.on == "output" else env.input
        if info["select"] is not None:
            value = value[info["select"]]
        return value

    def _expand_modules(self):
        sites = self.spec.sites
        names = [name for name, _ in self.model.named_modules()]
        if isinstance(sites.modules, _list):
            missing = [p for p in sites.modules if p not in names]
            if missing:
                raise SweepError(f"Sites: no module {missing[0]!r} in the model")
            return sites.axis or "module", _list(sites.modules), _list(sites.modules)
        pattern = sites.modules
        if "*" not in pattern:
            if pattern not in names:
                raise SweepError(f"Sites: no module {pattern!r} in the model")
            return sites.axis or "module", [pattern], [pattern]
        regex = re.compile(re.escape(pattern).replace(r"\*", r"([^.]+)") + r"\Z")
        paths, labels = [], []
        for name in names:
            m = regex.match(name)
            if m:
                paths.append(name)
                g = m.group(1)
                labels.append(_int(g) if g.isdigit() else g)
        if not paths:
            raise SweepError(f"Sites: the pattern {pattern!r} matches no module of the model")
        axis = sites.axis or ("layer" if all(isinstance(x, _int) for x in labels) else "module")
        return axis, paths, labels

    def describe(self, budget=None, batch_size=None, want_model_key=False):
        """Resolves the grid (probing the model once), and sizes the chunks."""
        spec = self.spec
        key = spec.key()
        cache = _PROBES.setdefault(self.model, {})
        cached = cache.get(key)
        if cached is None:
            self.device = _model_device(self.model)
            plan = self._probe()
            # (a meta-device LanguageModel has loaded its weights now)
            cached = cache[key] = {"plan": plan, "row_bytes": None, "device": _model_device(self.model)}
        self.plan = cached["plan"]
        self.device = cached["device"]
        plan = _dict(self.plan)
        n = plan["n"]
        if batch_size is not None:
            plan["runs_per_chunk"] = _int(batch_size)
            plan["row_bytes"] = cached["row_bytes"]
            plan["budget"] = None
        else:
            if cached["row_bytes"] is None:
                cached["row_bytes"] = self._measure_row_bytes()
            row_bytes = cached["row_bytes"]
            budget = _parse_bytes(budget) if budget is not None else _available_bytes(self.device)
            rows = _int(budget * _SAFETY // builtins.max(row_bytes, 1))
            rows = builtins.min(rows, MAX_ROWS.get(self.device.type, MAX_ROWS["cpu"]))
            fixed = 2 if spec.intervention.needs_source else 1  # source + baseline rows of chunk 0
            if spec.has_clean and not spec.intervention.needs_source:
                fixed += 1
            runs = rows // n - fixed
            if runs < 1:
                need = (fixed + 1) * n * row_bytes / _SAFETY
                raise SweepError(
                    f"memory_budget {budget} bytes is below what one forward pass with one intervention needs "
                    f"(about {_int(need)} bytes: {(fixed + 1) * n} rows x {row_bytes} bytes)")
            plan["runs_per_chunk"] = runs
            plan["row_bytes"] = row_bytes
            plan["budget"] = budget
        plan["pid"] = os.getpid()
        if want_model_key:
            plan["model_key"] = _model_key(self.model)
        return plan

    def _probe(self):
        """One trace on the target input: rows per input, the sites' structure, the
        model output's structure."""
        spec = self.spec
        axis, paths, labels = self._expand_modules()
        args, kwargs = _as_invoke_args(_to_device(spec.target, self.device))
        model = self.model
        with torch.no_grad():
            with model.trace() as tracer:
                with tracer.invoke(*args, **kwargs) as invoker:
                    saved = []
                    for path in paths:
                        env = self.envoy(path)
                        saved.append((env.output if spec.sites.on == "output" else env.input).save())
            n = invoker.batch_size
            out = tracer.output
        site_info = {}
        for path, proxy in zip(paths, saved):
            value = proxy.value if hasattr(proxy, "_graph") else proxy
            select = spec.sites.select
            if select == "auto":
                select = 0 if isinstance(value, (_tuple, _list)) else None
            if select is not None:
                value = value[select]
            if not isinstance(value, torch.Tensor):
                raise SweepError(
                    f"Sites: the {spec.sites.on} of '{path}' is a {type(value).__name__}, not a tensor "
                    "(pass select= to pick one element)")
            if value.dim() < 1 or value.shape[0] != n:
                raise SweepError(f"Sites: the {spec.sites.on} of '{path}' does not have the batch ({n} rows) first: "
                                 f"shape {_tuple(value.shape)}")
            site_info[path] = {"select": select, "shape": _tuple(value.shape[1:]), "dtype": _str(value.dtype)}
        shapes = {info["shape"] for info in site_info.values()}
        sites = spec.sites
        # positions
        first = next(iter(site_info.values()))["shape"]
        if sites.positions is None:
            positions = [None]
        else:
            if len(first) < 2:
                raise SweepError(f"Sites(positions=...): the site values have no position axis (shape {first})")
            if any(len(s) < 2 or s[0] != first[0] for s in shapes):
                raise SweepError("Sites(positions=...): the sites' sequence lengths differ")
            seq = first[0]
            positions = _list(range(seq)) if sites.positions == "each" else _list(sites.positions)
            bad = [p for p in positions if not -seq <= p < seq]
            if bad:
                raise SweepError(f"Sites: position {bad[0]} is outside the sequence (length {seq})")
        # heads
        n_heads = head_dim = None
        if sites.heads is None:
            heads = [None]
        else:
            n_heads = sites.n_heads
            if n_heads is None:
                config = getattr(model, "config", None)
                n_heads = getattr(config, "n_head", None) or getattr(config, "num_attention_heads", None)
            if not n_heads:
                raise SweepError("Sites(heads=[...]) needs n_heads= (the model has no config.n_head)")
            widths = {s[-1] for s in shapes}
            if len(widths) != 1 or _list(widths)[0] % n_heads:
                raise SweepError(f"Sites(heads=...): the last dimension ({sorted(widths)}) does not split into "
                                 f"{n_heads} heads")
            head_dim = _list(widths)[0] // n_heads
            heads = _list(sites.heads)
            if any(not 0 <= h < n_heads for h in heads):
                raise SweepError(f"Sites: heads must be in [0, {n_heads})")
        scales = [None]
        if spec.intervention.kind == "add" and spec.intervention.scales is not None:
            scales = _list(spec.intervention.scales)
        # the model output
        if hasattr(out, "logits"):
            accessor = "logits"
        elif isinstance(out, (_tuple, _list)):
            accessor = 0
        else:
            accessor = None
        dims, coords = [axis], {axis: labels}
        for name, values in (("position", positions), ("head", heads), ("scale", scales)):
            if values != [None]:
                dims.append(name)
                coords[name] = values
        return {
            "n": n, "paths": paths, "labels": labels, "site_info": site_info, "positions": positions,
            "heads": heads, "scales": scales, "n_heads": n_heads, "head_dim": head_dim, "accessor": accessor,
            "dims": dims, "coords": coords, "grid": [len(paths), len(positions), len(heads), len(scales)],
        }

    def _measure_row_bytes(self):
        """Peak memory of a real chunk (the baseline and one intervention), per row."""
        def go():
            return self.run_chunk([0], refs=True)
        out, peak = measure_peak(go, self.device)
        return builtins.max(1, -(-peak // out["rows"]))

    # -- constants -------------------------------------------------------------------------------

    def _unwrap(self, out):
        accessor = self.plan["accessor"]
        if accessor == "logits":
            return out.logits
        if accessor == 0:
            return out[0]
        return out

    def _mean_values(self):
        """Mean of each site over the reference inputs: [D] or [T, D] per path."""
        if self._means is None:
            spec = self.spec
            ref = spec.intervention.reference
            ref = spec.target if ref is None else ref
            args, kwargs = _as_invoke_args(_to_device(ref, self.device))
            with torch.no_grad():
                with self.model.trace() as tracer:
                    with tracer.invoke(*args, **kwargs):
                        saved = [self.site_value(p).save() for p in self.plan["paths"]]
            means = {}
            for path, proxy in zip(self.plan["paths"], saved):
                v = proxy.value.detach()
                v = v.float().mean(0) if v.dim() >= 2 else v.float()
                if not spec.intervention.per_position and v.dim() >= 2:
                    v = v.reshape(-1, v.shape[-1]).mean(0)
                means[path] = v.to(proxy.value.dtype)
            self._means = means
        return self._means

    def _vector(self, path, label):
        key = ("vec", path)
        vec = self._consts.get(key)
        if vec is None:
            info = self.plan["site_info"][path]
            vec = self.spec.intervention.vector_for(path, label).to(self.device, getattr(torch, info["dtype"][6:]))
            width = info["shape"][-1]
            hd = self.plan["head_dim"]
            if vec.shape[-1] not in (width, hd):
                raise SweepError(f"Add: the vector for '{path}' has width {vec.shape[-1]}, the site {width}"
                                 + (f" (a head {hd})" if hd else ""))
            self._consts[key] = vec
        return vec

    # -- one chunk --------------------------------------------------------------------------------

    def _decode(self, run_id):
        _, n_pos, n_head, n_scale = self.plan["grid"]
        s = run_id % n_scale
        rest = run_id // n_scale
        h = rest % n_head
        rest //= n_head
        p = rest % n_pos
        return rest // n_pos, p, h, s

    def _groups(self, run_ids):
        """Consecutive runs on the same module."""
        groups = []
        for rid in run_ids:
            m, p, h, s = self._decode(rid)
            if groups and groups[-1][0] == m:
                groups[-1][1].append((p, h, s))
            else:
                groups.append((m, [(p, h, s)]))
        return groups

    def _edit(self, target, source, path, label, entries):
        """One invoke's edit: every run of the group at once, with one indexed assignment.
        target / source: the site's proxies (this invoke's rows / the clean rows)."""
        plan = self.plan
        kind = self.spec.intervention.kind
        n = plan["n"]
        k = len(entries)
        rows = k * n
        dev = self.device
        has_pos = plan["positions"] != [None]
        has_head = plan["heads"] != [None]
        site_ndim = len(plan["site_info"][path]["shape"]) + 1
        pos = [plan["positions"][p] for p, _, _ in entries]
        heads = [plan["heads"][h] for _, h, _ in entries]
        if has_head:
            target = target.unflatten(-1, (plan["n_heads"], plan["head_dim"]))
            if source is not None:
                source = source.unflatten(-1, (plan["n_heads"], plan["head_dim"]))
        whole = not has_pos and not has_head

        def index(first):
            if whole:
                return (slice(None),)
            idx = [first]
            if has_pos:
                idx.append(torch.tensor(pos, device=dev).repeat_interleave(n))
            if has_head:
                idx.extend([slice(None)] * (site_ndim - 1 - len(idx)))
                idx.append(torch.tensor(heads, device=dev).repeat_interleave(n))
            return _tuple(idx)

        row_index = torch.arange(rows, device=dev)
        idx = index(row_index)
        if kind == "zero":
            target[idx] = 0
        elif kind == "patch":
            examples = torch.arange(n, device=dev).repeat(k)
            target[idx] = source[index(examples)]
        elif kind == "mean":
            mean = self._mean_values()[path]
            full = mean.expand(rows, *plan["site_info"][path]["shape"])
            if has_head:
                full = full.unflatten(-1, (plan["n_heads"], plan["head_dim"]))
            target[idx] = mean if whole else full[idx].contiguous()
        elif kind == "add":
            vec = self._vector(path, label)
            scales = [self._scale(s) for _, _, s in entries]
            scale_rows = torch.tensor(scales, device=dev, dtype=vec.dtype).repeat_interleave(n)
            if has_head and vec.shape[-1] != plan["head_dim"]:
                vec = vec.unflatten(-1, (plan["n_heads"], plan["head_dim"]))
            if whole:
                delta = scale_rows.reshape(rows, *([1] * (site_ndim - 1))) * vec
            else:
                shape = _list(plan["site_info"][path]["shape"])
                if has_head:
                    shape = shape[:-1] + [plan["n_heads"], plan["head_dim"]]
                    if vec.dim() == 1 and vec.shape[-1] == plan["head_dim"]:
                        vec = vec.expand(plan["n_heads"], plan["head_dim"])
                full = vec.expand(rows, *shape)
                sel = full[idx]
                delta = scale_rows.reshape(rows, *([1] * (sel.dim() - 1))) * sel
            target[idx] = target[idx] + delta
        else:
            raise SweepError(f"unknown intervention {kind!r}")

    def _scale(self, s):
        scales = self.plan["scales"]
        return self.spec.intervention.scale if scales == [None] else scales[s]

    def run_chunk(self, run_ids, refs=False):
        """Runs the given runs (and, with refs, the baseline / clean rows) in one forward
        pass. Returns {"runs", "values" [k, N], "baseline" [N], "reference" [N] | None,
        "rows", "pid", "seconds"}."""
        t0 = time.perf_counter()
        spec = self.spec
        plan = self.plan
        n = plan["n"]
        groups = self._groups(run_ids)
        patch = spec.intervention.needs_source
        need_clean = (patch and groups) or (refs and spec.has_clean)
        device = self.device
        target = _to_device(spec.target, device)
        if spec.intervention.kind == "mean":
            self._mean_values()  # its own trace, before this one opens
        layout = []  # (what, rows)
        with torch.no_grad():
            with self.model.trace() as tracer:
                sources = {}
                if need_clean:
                    args, kwargs = _as_invoke_args(_to_device(spec.source, device))
                    with tracer.invoke(*args, **kwargs):
                        if patch:
                            for m, _ in groups:
                                path = plan["paths"][m]
                                if path not in sources:
                                    sources[path] = self.site_value(path)
                    layout.append(("reference", n))
                if refs:
                    args, kwargs = _as_invoke_args(target)
                    with tracer.invoke(*args, **kwargs):
                        pass
                    layout.append(("baseline", n))
                for m, entries in groups:
                    path = plan["paths"][m]
                    args, kwargs = _as_invoke_args(_tile(target, len(entries)))
                    with tracer.invoke(*args, **kwargs):
                        self._edit(self.site_value(path), sources.get(path), path, plan["labels"][m], entries)
                    layout.append(("runs", len(entries) * n))
            out = self._unwrap(tracer.output)
            values = spec.metric(out)
            rows = builtins.sum(r for _, r in layout)
            if not isinstance(values, torch.Tensor) or values.reshape(-1).shape[0] != rows:
                raise SweepError(
                    f"the metric must return one value per row ({rows} rows), got "
                    f"{_tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
            values = values.detach().reshape(-1)
            values = (values if values.dtype == torch.float64 else values.float()).cpu()
        result = {"runs": _list(run_ids), "baseline": None, "reference": None, "rows": rows, "pid": os.getpid()}
        start = 0
        chunks = []
        for what, r in layout:
            part = values[start:start + r]
            start += r
            if what == "runs":
                chunks.append(part.reshape(-1, n))
            elif refs:
                result[what] = part.clone()
        result["values"] = torch.cat(chunks) if chunks else torch.empty(0, n)
        result["seconds"] = time.perf_counter() - t0
        return result

    # -- attribution ------------------------------------------------------------------------------

    def attribute(self):
        """One forward and one backward: the site values, their gradients, the metric."""
        spec = self.spec
        plan = self.plan
        paths = plan["paths"]
        device = self.device
        params = [p for p in self.model.parameters()]
        if not any(p.requires_grad for p in params):
            raise SweepError("attribute needs gradients: no parameter of the model requires grad")
        kind = spec.intervention.kind
        old_grads = [p.grad for p in params]
        try:
            with torch.enable_grad():
                with self.model.trace() as tracer:
                    clean_acts = reference = None
                    if spec.has_clean:
                        args, kwargs = _as_invoke_args(_to_device(spec.source, device))
                        with tracer.invoke(*args, **kwargs):
                            if kind == "patch":
                                clean_acts = [self.site_value(p).detach().save() for p in paths]
                            reference = spec.metric(self._unwrap(self.model.output)).detach().save()
                    args, kwargs = _as_invoke_args(_to_device(spec.target, device))
                    with tracer.invoke(*args, **kwargs):
                        acts = [self.site_value(p) for p in paths]
                        grads = [a.grad.save() for a in acts]
                        acts = [a.detach().save() for a in acts]
                        metric = spec.metric(self._unwrap(self.model.output))
                        baseline = metric.detach().save()
                        metric.sum().backward()
        finally:
            for p, g in zip(params, old_grads):
                p.grad = g
        value = _value
        return {
            "acts": [value(a) for a in acts], "grads": [value(g) for g in grads],
            "clean": None if clean_acts is None else [value(a) for a in clean_acts],
            "baseline": value(baseline).reshape(-1).float().cpu(),
            "reference": None if reference is None else value(reference).reshape(-1).float().cpu(),
        }


def _value(x):
    return x.value if hasattr(x, "_graph") else x


def _fetch(bundle):
    """The value behind [an object reference] (Ray), or the bundle itself (local)."""
    if isinstance(bundle, _list):
        import ray

        return ray.get(bundle[0])
    return bundle


# -- the results file -----------------------------------------------------------------------------

_MAGIC = b"FISWEEP1\n"


def _read_records(path):
    """(header dict, [payload dict], the byte length of the valid prefix)."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(_MAGIC):
        raise SweepError(f"{path} is not a fastinterleave sweep results file")
    end = data.find(b"\n", len(_MAGIC))
    if end < 0:
        return None, [], 0
    header = json.loads(data[len(_MAGIC):end])
    records = []
    pos = good = end + 1
    while pos + 41 <= len(data):
        if data[pos:pos + 1] != b"R":
            break
        (length,) = struct.unpack("<Q", data[pos + 1:pos + 9])
        digest = data[pos + 9:pos + 41]
        payload = data[pos + 41:pos + 41 + length]
        if len(payload) != length or hashlib.sha256(payload).digest() != digest:
            break
        records.append(torch.load(io.BytesIO(payload), weights_only=True))
        pos = good = pos + 41 + length
    return header, records, good


def load_results(path):
    """What a results file holds: {"fingerprint", "dims", "coords", "runs_done",
    "chunks", "refs_done"} (a truncated last record, from a killed run, is ignored)."""
    header, records, _ = _read_records(path)
    if header is None:
        return {"fingerprint": None, "runs_done": 0, "chunks": 0, "refs_done": False}
    runs = _set()
    for r in records:
        runs.update(r["runs"].tolist())
    return {**header, "runs_done": len(runs), "chunks": len(records),
            "refs_done": any(r.get("baseline") is not None for r in records)}


class _ResultsFile:
    def __init__(self, path, fingerprint, meta):
        self.path = os.fspath(path)
        self.records = []
        header = None
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            header, self.records, good = _read_records(self.path)
            if header is not None and header.get("fingerprint") != fingerprint:
                raise SweepError(
                    f"{self.path} holds results of a different sweep (other inputs, sites, intervention, metric "
                    "or model): delete it or pass another results= path")
            if header is not None:
                with open(self.path, "r+b") as f:
                    f.truncate(good)  # drop a record cut short by a crash
        if header is None:
            with open(self.path, "wb") as f:
                f.write(_MAGIC + json.dumps({"fingerprint": fingerprint, **meta}, default=repr).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
        self._f = open(self.path, "ab")

    def append(self, chunk):
        record = {"runs": torch.tensor(chunk["runs"], dtype=torch.long), "values": chunk["values"]}
        for key in ("baseline", "reference"):
            if chunk.get(key) is not None:
                record[key] = chunk[key]
        buf = io.BytesIO()
        torch.save(record, buf)
        payload = buf.getvalue()
        self._f.write(b"R" + struct.pack("<Q", len(payload)) + hashlib.sha256(payload).digest() + payload)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self):
        self._f.close()


# -- the driver -------------------------------------------------------------------------------------


def _resolve_inputs(inputs, clean, corrupted, intervention):
    if intervention.needs_source:
        if clean is None or corrupted is None:
            raise SweepError("Patch needs clean= (the source) and corrupted= (the run that is patched)")
        if inputs is not None:
            raise SweepError("pass clean= and corrupted=, not inputs=, for patching")
        return corrupted, clean, True
    target = corrupted if corrupted is not None else inputs
    if target is None:
        target = clean
        clean = None
    if target is None:
        raise SweepError("no inputs: pass inputs= (or clean= / corrupted=)")
    return target, clean, clean is not None


def _subset_ids(subset, plan):
    """Run ids of the cells in ``subset`` (dicts of labels, or a boolean mask)."""
    grid = plan["grid"]
    dims = plan["dims"]
    coords = plan["coords"]
    if isinstance(subset, torch.Tensor):
        mask = subset.bool().reshape(-1)
        total = math.prod(grid)
        if mask.numel() != total:
            raise SweepError(f"subset mask has {mask.numel()} cells, the grid {total}")
        return mask.nonzero().reshape(-1).tolist()
    ids = []
    full_axes = [plan["dims"][0], "position", "head", "scale"]
    for cell in subset:
        if not isinstance(cell, collections.abc.Mapping):
            cell = _dict(zip(dims, cell))
        index = []
        for axis, size in zip(full_axes, grid):
            if axis in coords:
                try:
                    index.append(coords[axis].index(cell[axis]))
                except (KeyError, ValueError):
                    raise SweepError(f"subset: cell {cell!r} has no valid {axis!r} label") from None
            else:
                index.append(0)
        rid = 0
        for i, size in zip(index, grid):
            rid = rid * size + i
        ids.append(rid)
    return sorted(_set(ids))


def _chunks(run_ids, per_chunk, refs_done):
    """Consecutive runs, ``per_chunk`` per forward pass; chunk 0 carries the baseline."""
    chunks = []
    i = 0
    refs = not refs_done
    while i < len(run_ids) or refs:
        size = per_chunk
        chunks.append((run_ids[i:i + size], refs))
        i += size
        refs = False
    return chunks


def run(model=None, inputs=None, *, clean=None, corrupted=None, sites, intervention=None, metric,
        per_example=False, batch_size=None, memory_budget=None, subset=None, results=None,
        progress=True, backend="local", model_factory=None, num_workers=None, ray_options=None,
        pool=None, retries=3, on_chunk=None):
    """Runs ``intervention`` at every cell of ``sites`` and measures ``metric``.

    model: an NNsight / LanguageModel, or a ``torch.nn.Module`` (wrapped). With
    ``backend="ray"`` it may be None when ``model_factory`` is given.
    inputs: for ablation / steering, what the model runs (a tensor, a dict of keyword
    inputs, a tuple of positional inputs, or text for a LanguageModel). For
    :class:`Patch`, ``clean=`` (the source) and ``corrupted=`` (the patched run).
    ``clean=`` with another intervention gives ``result.reference``.
    sites: a :class:`Sites`. intervention: :class:`Patch` (default), :class:`Zero`,
    :class:`Mean`, :class:`Add`. metric: ``fn(logits) -> one value per row``
    (:func:`logit_diff`, :func:`logit`, :func:`logprob`, or your own; ``logits`` is the
    model output's ``.logits``, rows intervention-major, example-minor).
    per_example: keep one value per example (a last axis ``"example"``) instead of their mean.
    batch_size: interventions per forward pass (else sized from ``memory_budget``).
    memory_budget: bytes (or ``"4GB"``) one forward pass may allocate; default: half the
    available RAM, or 80 % of the free GPU memory.
    subset: only these cells (``result.top(k)`` of an attribution, or a boolean mask).
    results: a file path; finished chunks are appended there and a rerun with the same
    arguments skips them.
    progress: a tqdm bar (done / total runs and runs per second).
    backend: ``"local"`` or ``"ray"``; with Ray: ``model_factory`` (a function returning
    the model, run once in each worker), ``num_workers`` (default: one per GPU of the
    cluster, else one per CPU), ``ray_options`` (actor options, e.g. ``{"num_gpus": 1}``),
    or ``pool=`` a :class:`RayPool` whose workers serve many sweeps (implies Ray);
    ``retries``: attempts per chunk when a worker dies or raises.
    on_chunk: called after each finished chunk with a dict (chunk, runs, rows, seconds,
    pid, attempt).
    Returns a :class:`SweepResult`.
    """
    rerun = _dict(locals())
    intervention = Patch() if intervention is None else intervention
    if not isinstance(sites, Sites):
        raise TypeError("sites= takes a sweep.Sites(...)")
    if not isinstance(intervention, Intervention):
        raise TypeError("intervention= takes sweep.Patch(), Zero(), Mean(...) or Add(...)")
    if backend not in ("local", "ray"):
        raise ValueError(f"backend is 'local' or 'ray', not {backend!r}")
    if batch_size is not None and _int(batch_size) < 1:
        raise ValueError("batch_size must be at least 1")
    target, source, has_clean = _resolve_inputs(inputs, clean, corrupted, intervention)
    spec = _Spec(target, source, sites, intervention, metric, per_example, has_clean)
    t0 = time.perf_counter()
    if pool is not None or backend == "ray":
        backend = "ray"
        own = pool is None
        if own:
            factory = model_factory if model_factory is not None else model  # a module is shipped whole
            if factory is None or isinstance(factory, NNsight):
                raise SweepError("backend='ray' needs model_factory= (a function that builds the model in a worker), "
                                 "or model= a torch.nn.Module to ship to the workers")
            pool = RayPool(factory, num_workers, ray_options, max_restarts=retries)
        executor = _RayExecutor(pool, spec, retries, own)
    else:
        if model is None:
            if model_factory is None:
                raise SweepError("pass model= (or model_factory=)")
            model = model_factory()
        executor = _LocalExecutor(model, spec)
    try:
        plan = executor.describe(memory_budget, batch_size, want_model_key=results is not None)
        n = plan["n"]
        total = math.prod(plan["grid"])
        run_ids = _list(range(total)) if subset is None else _subset_ids(subset, plan)
        store = None
        parts = []  # (run ids, values [k, N]) of every finished chunk
        done = _set()
        refs = {"baseline": None, "reference": None}
        if results is not None:
            fingerprint = _digest([spec.key(), plan["model_key"], run_ids])
            store = _ResultsFile(results, fingerprint, {"dims": plan["dims"], "coords": plan["coords"]})
            for record in store.records:
                parts.append((record["runs"].tolist(), record["values"]))
                done.update(parts[-1][0])
                for key in refs:
                    if record.get(key) is not None:
                        refs[key] = record[key]
        todo = [r for r in run_ids if r not in done]
        loaded = len(run_ids) - len(todo)
        per_chunk = plan["runs_per_chunk"]
        if backend == "ray" and batch_size is None:
            per_chunk = builtins.max(1, builtins.min(per_chunk, math.ceil(len(todo) / (2 * executor.n_workers))))
        chunks = _chunks(todo, per_chunk, refs["baseline"] is not None)
        stats = {"runs": len(run_ids), "computed": len(todo), "loaded": loaded, "forwards": 0, "rows": 0,
                 "max_rows": 0, "retries": 0, "runs_per_forward": per_chunk, "row_bytes": plan.get("row_bytes"),
                 "budget": plan.get("budget"), "workers": getattr(executor, "n_workers", 1)}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(run_ids), initial=loaded, unit="run", desc="sweep", dynamic_ncols=True)
        try:
            for index, chunk, attempt in executor.execute(chunks, stats):
                if store is not None:
                    store.append(chunk)
                parts.append((chunk["runs"], chunk["values"]))
                for key in refs:
                    if chunk.get(key) is not None:
                        refs[key] = chunk[key]
                stats["forwards"] += 1
                stats["rows"] += chunk["rows"]
                stats["max_rows"] = builtins.max(stats["max_rows"], chunk["rows"])
                if bar is not None:
                    bar.update(len(chunk["runs"]))
                    bar.set_postfix(forwards=stats["forwards"], rows=chunk["rows"], refresh=False)
                if on_chunk is not None:
                    on_chunk({"chunk": index, "runs": len(chunk["runs"]), "rows": chunk["rows"],
                              "seconds": chunk["seconds"], "pid": chunk["pid"], "attempt": attempt})
        finally:
            if bar is not None:
                bar.close()
            if store is not None:
                store.close()
    finally:
        executor.close()
    stats["seconds"] = time.perf_counter() - t0
    values = _assemble(plan, parts, per_example)
    baseline, reference = (_reduce(refs[k], per_example) for k in ("baseline", "reference"))
    rerun.pop("subset", None)
    return SweepResult(values, _result_dims(plan, per_example), _result_coords(plan, per_example), baseline,
                       reference, "exact", stats, rerun=rerun)


def _reduce(x, per_example):
    if x is None:
        return None
    return x if per_example else x.mean()


def _result_dims(plan, per_example):
    return _list(plan["dims"]) + (["example"] if per_example else [])


def _result_coords(plan, per_example):
    coords = {d: _list(v) for d, v in plan["coords"].items()}
    if per_example:
        coords["example"] = _list(range(plan["n"]))
    return coords


def _assemble(plan, parts, per_example):
    n = plan["n"]
    total = math.prod(plan["grid"])
    parts = [(ids, v) for ids, v in parts if len(ids)]
    dtype = parts[0][1].dtype if parts else torch.float32
    values = torch.full((total, n), math.nan, dtype=dtype)
    if parts:
        ids = torch.tensor([i for p, _ in parts for i in p], dtype=torch.long)
        values[ids] = torch.cat([v.to(dtype) for _, v in parts])
    if not per_example:
        values = values.mean(-1)
        shape = [len(plan["coords"][d]) for d in plan["dims"]]
    else:
        shape = [len(plan["coords"][d]) for d in plan["dims"]] + [n]
    return values.reshape(shape)


class _LocalExecutor:
    n_workers = 1

    def __init__(self, model, spec):
        self.runner = _Runner(model, spec)

    def describe(self, budget, batch_size, want_model_key=False):
        return self.runner.describe(budget, batch_size, want_model_key)

    def execute(self, chunks, stats):
        pending = collections.deque(enumerate(chunks))
        while pending:
            index, (runs, refs) = pending.popleft()
            try:
                out = self.runner.run_chunk(runs, refs)
            except torch.OutOfMemoryError:
                if len(runs) <= 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                half = len(runs) // 2
                stats["retries"] += 1
                pending.appendleft((index, (runs[half:], False)))
                pending.appendleft((index, (runs[:half], refs)))
                continue
            yield index, out, 1

    def close(self):
        pass


class RayPool:
    """Ray actors that each build the model once (``model_factory()``) and then serve any
    number of sweeps: ``sweep.run(..., pool=pool)``. Without a pool, ``backend="ray"``
    makes a pool for one sweep.

    ``num_workers``: default one per GPU of the cluster (each actor then gets
    ``num_gpus=1``), else one per CPU. ``ray_options``: Ray actor options (``num_gpus``,
    ``num_cpus``, ``resources``, ``runtime_env``...). A worker process that dies is
    restarted by Ray (up to ``max_restarts``, default 3) and builds its model again.
    Starts a local Ray instance (``ray.init()``) unless one is connected: to use a
    cluster, call ``ray.init(address=...)`` first."""

    def __init__(self, model_factory, num_workers=None, ray_options=None, max_restarts=3):
        try:
            import ray
        except ImportError:
            raise SweepError("backend='ray' needs Ray: pip install ray") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init()
        options = _dict(ray_options or {})
        resources = ray.available_resources()
        if num_workers is None:
            if options.get("num_gpus"):
                num_workers = _int(resources.get("GPU", 1) // options["num_gpus"])
            elif resources.get("GPU", 0) >= 1 and "num_cpus" not in options:
                options["num_gpus"] = 1
                num_workers = _int(resources["GPU"])
            else:
                num_workers = _int(resources.get("CPU", 1) // options.get("num_cpus", 1))
        self.n_workers = builtins.max(1, _int(num_workers))
        options.setdefault("num_cpus", 1)
        options.setdefault("max_restarts", max_restarts)
        options.setdefault("max_task_retries", 0)
        actor_class = ray.remote(_Runner)
        self.actors = [actor_class.options(**options).remote(model_factory) for _ in range(self.n_workers)]

    def close(self):
        """Ends the worker processes (their models are freed)."""
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001  (an actor already gone is fine)
                pass
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _RayExecutor:
    """Chunks on the actors of a :class:`RayPool`. A chunk whose worker dies (or raises)
    is retried, preferably on a worker that has not failed in this sweep; results are
    yielded as they come and assembled in grid order by the caller."""

    IN_FLIGHT = 2

    def __init__(self, pool, spec, retries, own_pool):
        self.pool = pool
        self.ray = pool.ray
        self.n_workers = pool.n_workers
        self.retries = retries
        self.own_pool = own_pool
        self.sweep_id = f"{os.getpid()}-{time.time_ns()}"
        self.spec = spec
        self.bundle = None

    def describe(self, budget, batch_size, want_model_key=False):
        ray = self.ray
        self.bundle = [ray.put((self.spec, budget, batch_size))]  # in a list: passed as a reference
        actors = self.pool.actors
        plans = ray.get([a.prepare.remote(self.sweep_id, self.bundle, want_model_key) for a in actors])
        first = plans[0]
        for other in plans[1:]:
            if other["dims"] != first["dims"] or other["coords"] != first["coords"] or other["n"] != first["n"]:
                raise SweepError("Ray workers built different models: their sweep grids differ")
            if want_model_key and other["model_key"] != first["model_key"]:
                raise SweepError("Ray workers built different models (their weights differ)")
        plan = _dict(first)
        plan["runs_per_chunk"] = builtins.min(p["runs_per_chunk"] for p in plans)
        return plan

    def execute(self, chunks, stats):
        ray = self.ray
        from ray.exceptions import RayError, RayTaskError

        actors = self.pool.actors
        pending = collections.deque(enumerate(chunks))
        attempts = collections.Counter()
        failures = collections.Counter()
        load = collections.Counter()
        inflight = {}
        while pending or inflight:
            healthy = [a for a in range(len(actors)) if not failures[a]]
            usable = healthy or [a for a in range(len(actors)) if failures[a] <= self.retries]
            for a in usable:
                while pending and load[a] < self.IN_FLIGHT:
                    index, (runs, refs) = pending.popleft()
                    ref = actors[a].chunk.remote(self.sweep_id, self.bundle, runs, refs)
                    inflight[ref] = (a, index, runs, refs)
                    load[a] += 1
            if not inflight:
                raise SweepError("every Ray worker failed; no chunk can run")
            ready, _ = ray.wait(_list(inflight), num_returns=1)
            for ref in ready:
                a, index, runs, refs = inflight.pop(ref)
                load[a] -= 1
                try:
                    out = ray.get(ref)
                except RayError as e:
                    attempts[index] += 1
                    failures[a] += 1
                    stats["retries"] += 1
                    if attempts[index] > self.retries:
                        cause = e.as_instanceof_cause() if isinstance(e, RayTaskError) else e
                        raise SweepError(f"chunk {index} failed {attempts[index]} times") from cause
                    pending.appendleft((index, (runs, refs)))
                    continue
                yield index, out, attempts[index] + 1

    def close(self):
        if self.own_pool:
            self.pool.close()


# -- attribution patching -----------------------------------------------------------------------------


def attribute(model, inputs=None, *, clean=None, corrupted=None, sites, intervention=None, metric,
              per_example=False):
    """Attribution patching: the first-order estimate of ``run(...)`` for every cell, from
    one forward and one backward pass (in one trace: the clean invoke, then the
    corrupted one whose metric is back-propagated).

    For a cell, the estimate of the metric change is ``(new - old) . grad`` summed over the
    site's width (over the head's slice for heads, over all positions when positions is
    None): new = the clean value (Patch), 0 (Zero), the mean (Mean), old + scale * vector
    (Add). ``values`` = baseline + that estimate; ``result.confirm(k)`` runs the exact
    sweep on the top ``k`` cells. Same arguments as :func:`run` (local only)."""
    rerun = {"model": model, "inputs": inputs, "clean": clean, "corrupted": corrupted, "sites": sites,
             "intervention": intervention, "metric": metric, "per_example": per_example}
    intervention = Patch() if intervention is None else intervention
    target, source, has_clean = _resolve_inputs(inputs, clean, corrupted, intervention)
    spec = _Spec(target, source, sites, intervention, metric, per_example, has_clean)
    t0 = time.perf_counter()
    runner = _Runner(model, spec)
    plan = runner.describe(batch_size=1)
    got = runner.attribute()
    n = plan["n"]
    kind = intervention.kind
    has_pos = plan["positions"] != [None]
    has_head = plan["heads"] != [None]
    per_site = []
    for i, path in enumerate(plan["paths"]):
        a = got["acts"][i].detach()
        g = got["grads"][i]
        if g is None:
            raise SweepError(f"attribute: no gradient reached '{path}' (does the metric depend on it?)")
        g = g.detach()
        if kind == "patch":
            delta = got["clean"][i].detach() - a
        elif kind == "zero":
            delta = -a
        elif kind == "mean":
            delta = runner._mean_values()[path].to(a.dtype) - a
        else:
            vec = runner._vector(path, plan["labels"][i])
            delta = vec.expand_as(a) if vec.shape[-1] == a.shape[-1] else \
                vec.expand(*a.shape[:-1], plan["n_heads"], plan["head_dim"]).flatten(-2)
        prod = (delta.double() * g.double())
        if has_head:
            prod = prod.unflatten(-1, (plan["n_heads"], plan["head_dim"])).sum(-1)  # [N, (T), H]
            prod = prod[..., torch.tensor(plan["heads"])]
        else:
            prod = prod.sum(-1, keepdim=True)  # [N, (T), 1]
        if has_pos:
            prod = prod[:, torch.tensor(plan["positions"])]  # [N, P, H]
        elif prod.dim() == 3:
            prod = prod.sum(1)  # [N, H]
        if not has_pos:
            prod = prod.unsqueeze(1)
        per_site.append(prod)  # [N, P, H]
    est = torch.stack(per_site)  # [M, N, P, H]
    est = est.permute(0, 2, 3, 1)  # [M, P, H, N]
    if kind == "add":
        scales = plan["scales"] if plan["scales"] != [None] else [intervention.scale]
        est = est.unsqueeze(3) * torch.tensor(scales, dtype=est.dtype)[:, None]  # [M, P, H, S, N]
    else:
        est = est.unsqueeze(3)
    baseline = got["baseline"]
    values = (est + baseline.double()).float().reshape(math.prod(plan["grid"]), n)
    if not per_example:
        values = values.mean(-1)
        shape = [len(plan["coords"][d]) for d in plan["dims"]]
    else:
        shape = [len(plan["coords"][d]) for d in plan["dims"]] + [n]
    stats = {"runs": math.prod(plan["grid"]), "forwards": 1, "backwards": 1, "seconds": time.perf_counter() - t0}
    return SweepResult(values.reshape(shape), _result_dims(plan, per_example), _result_coords(plan, per_example),
                       _reduce(baseline, per_example), _reduce(got["reference"], per_example), "attribution", stats,
                       rerun=rerun)
