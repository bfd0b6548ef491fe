"""Scanning: shapes, dtypes and devices known while a trace is recorded.

``scan=True`` runs the model once on fake tensors (no data, no compute) per
invoke, recording every module's inputs and outputs per call; site proxies
then carry a fake value, and so does everything computed from them.
``validate=True`` makes an operation that fails on the fake values raise at
the user's line, while recording."""

from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

import torch

from . import _C


def scan_model(model, args, kwargs):
    """Runs `model` on fake copies of the inputs: {(path, kind): [value per call]}, mode."""
    from .graph import INPUT, OUTPUT

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    seen = {}
    handles = []

    def record(path, kind):
        def hook(module, *values):
            value = values[-1] if kind == OUTPUT else (values[0], values[1])
            seen.setdefault((path, kind), []).append(value)

        return hook

    for path, module in model._model.named_modules():
        handles.append(module.register_forward_pre_hook(record(path, INPUT), with_kwargs=True))
        handles.append(module.register_forward_hook(record(path, OUTPUT)))
    try:
        with mode:
            fake_args, fake_kwargs = tree_map(
                lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v, (args, kwargs)
            )
            model._execute(*fake_args, **fake_kwargs)
    except Exception as e:
        raise _C.InterventionError(
            f"scan=True could not run the model on fake tensors ({type(e).__name__}: {e}); "
            "trace without scan/validate"
        ) from e
    finally:
        for h in handles:
            h.remove()
    return seen, mode


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

    fargs = fake(args)
    fkwargs = fake(kwargs) if kwargs else {}
    if missing:
        return None
    try:
        with graph.fake_mode:
            if op == GETITEM:
                return fargs[0][fargs[1]]
            if op == SETITEM:
                fargs[0][fargs[1]] = fargs[2]
                return None
            if op == GETATTR:
                return getattr(fargs[0], name)
            if op == CALL and fn is not None:
                return fn(*fargs, **fkwargs)
    except Exception:
        if validate:
            raise
    return None
