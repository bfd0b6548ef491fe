"""Scanning: shapes, dtypes and devices known while a trace is recorded.

``scan=True`` runs the model once on fake tensors (no data, no compute) per
invoke, recording every module's inputs and outputs per call; site proxies
then carry a fake value, and so does everything computed from them.
``validate=True`` makes an operation that fails on the fake values raise at
the user's line, while recording.

As in nnsight 0.4.11, the fake run has a shape environment (so data-dependent
operations such as ``nonzero`` give sizes that are unknown while recording
instead of failing), and a fake tensor's truth value is ``True`` (model code
such as transformers' ``if torch.all(mask == 1):`` cannot be decided without
data; each branch gives the same shapes). A value whose size depends on data
is unknown while recording: its ``.shape`` is a proxy, known when the model runs.
"""

import collections

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, ShapeEnv
from torch.utils._pytree import tree_flatten

from . import _C

# Not the user's error: an operation whose result depends on data fake tensors do not have.
_UNKNOWABLE = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    GuardOnDataDependentSymNode,
    UnsupportedOperatorException,
)
_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)
# Attributes that `proxy.<name>` reads from the fake value, mapped over tuples, lists and
# dicts as nnsight 0.4.11 does (`block.output.shape` is a tuple of shapes).
_MAPPED_ATTRS = ("shape", "dtype", "device")
UNKNOWN = object()

_running = 0  # fake runs in progress (LanguageModel does not load weights for one)


def running():
    """Whether a scan's fake run of the model is in progress."""
    return _running > 0


def _fake_bool(self):
    return True


def scan_model(model, args, kwargs):
    """Runs `model` on fake copies of the inputs: {(path, kind): [value per call]}, mode.

    The model runs as its trace will: the trace's method (``generate``...) and its keyword
    arguments for the model call."""
    from .graph import INPUT, OUTPUT

    global _running
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(assume_static_by_default=True))
    seen = {}
    handles = []

    def record(path, kind):
        def hook(module, *values):
            value = values[-1] if kind == OUTPUT else (values[0], values[1])
            seen.setdefault((path, kind), []).append(value)

        return hook

    execute = model._execute
    tracer = model._envoy._tracer
    if tracer is not None:
        if tracer._model_kwargs:
            kwargs = {**kwargs, **tracer._model_kwargs}
        method = getattr(tracer, "_method", None)
        if method is not None:
            execute = getattr(model, method)

    for envoy in _envoys(model._envoy):
        module, path = envoy._module, envoy._path
        handles.append(module.register_forward_pre_hook(record(path, INPUT), with_kwargs=True))
        handles.append(module.register_forward_hook(record(path, OUTPUT)))
    truth = FakeTensor.__bool__
    _running += 1
    try:
        FakeTensor.__bool__ = _fake_bool
        with mode:
            execute(*_fakeify(mode, args), **_fakeify(mode, kwargs))
    except Exception as e:
        raise _C.InterventionError(
            f"scan=True could not run the model on fake tensors ({type(e).__name__}: {e}); "
            "trace without scan/validate"
        ) from e
    finally:
        _running -= 1
        FakeTensor.__bool__ = truth
        for h in handles:
            h.remove()
    return seen, mode


def _envoys(envoy):
    """`envoy` and every envoy below it (the model's modules and any beside it, such as a
    LanguageModel's generator), each once."""
    stack, seen = [envoy], set()
    while stack:
        e = stack.pop()
        if id(e._module) in seen:
            continue
        seen.add(id(e._module))
        yield e
        stack.extend(reversed(list(e._children.values())))


def _fakeify(mode, value):
    """`value` with its tensors replaced by fake ones (inside tuples, lists, dicts and
    dict-like containers such as a BatchEncoding)."""
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value, static_shapes=True)
    kind = type(value)
    if kind is tuple or kind is list:
        return kind(_fakeify(mode, v) for v in value)
    if kind is dict:
        return {k: _fakeify(mode, v) for k, v in value.items()}
    if isinstance(value, collections.UserDict):  # transformers' BatchEncoding
        copy = value.__class__.__new__(value.__class__)
        copy.__dict__.update(value.__dict__)
        copy.data = {k: _fakeify(mode, v) for k, v in value.data.items()}
        return copy
    return value


def fake_attr(value, name):
    """``proxy.<name>`` of a scanned value: the fake tensor's attribute; for ``shape`` /
    ``dtype`` / ``device`` of a tuple, list or dict (a ModelOutput too), the same container
    of each tensor's attribute, other items as they are (what nnsight 0.4.11 gives). UNKNOWN
    when the value has no such attribute or its sizes depend on data."""
    if isinstance(value, torch.Tensor):
        if name == "shape" and _is_symbolic(value):
            return UNKNOWN
        return getattr(value, name)
    if name not in _MAPPED_ATTRS or not isinstance(value, (tuple, list, dict)):
        return UNKNOWN
    if _is_symbolic(value):
        return UNKNOWN
    return _map_attr(value, name)


def _map_attr(value, name):
    if isinstance(value, torch.Tensor):
        return getattr(value, name)
    kind = type(value)
    if kind is tuple or kind is list:
        return kind(_map_attr(v, name) for v in value)
    if isinstance(value, dict):
        return {k: _map_attr(v, name) for k, v in value.items()}
    return value


def _is_symbolic(value):
    """Whether a size in `value` depends on data (an unbacked symbol of the fake run)."""
    leaves, _ = tree_flatten(value)
    for leaf in leaves:
        if isinstance(leaf, _SYMBOLIC):
            return True
        if isinstance(leaf, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in leaf.shape):
            return True
    return False


def fake_eval(graph, op, name, args, kwargs, fn, validate):
    """The fake value of a node from its arguments' fake values (None if unknown)."""
    from .graph import CALL, GETATTR, GETITEM, SETITEM, map_proxies

    missing = []

    def fake_of(proxy):
        if proxy._graph is graph and proxy._node in graph.fake:
            return graph.fake[proxy._node]
        missing.append(proxy)
        return None

    def fake(obj):
        return map_proxies(obj, fake_of)

    if graph.fake_mode is None:  # no invoke scanned yet
        return None
    fargs = fake(args)
    fkwargs = fake(kwargs) if kwargs else {}
    if missing:
        return None
    try:
        with graph.fake_mode:
            if op == GETITEM:
                value = fargs[0][fargs[1]]
            elif op == SETITEM:
                fargs[0][fargs[1]] = fargs[2]
                return None
            elif op == GETATTR:
                value = getattr(fargs[0], name)
                if callable(value):
                    # `x.nonzero` of `x.nonzero()`: the call replaces this node, and is
                    # evaluated from `x` (a method kept here would stand for the call's value).
                    return None
            elif op == CALL and fn is not None:
                value = fn(*fargs, **fkwargs)
            else:
                return None
    except _UNKNOWABLE:
        return None  # depends on data: known when the model runs
    except Exception:
        if validate:
            raise
        return None
    if value is not None and _is_symbolic(value):
        return None  # a size that depends on data: unknown while recording
    return value
