"""While a trace or session is recorded, torch's tensor factories (and
DataLoader) accept proxies — ``torch.zeros(proxy.shape)`` — by recording a node."""

import torch

from .graph import CALL, OPEN
from .proxy import Proxy

_FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange", "eye", "tensor")
_ORIGINALS = {name: getattr(torch, name) for name in _FACTORIES}
_ORIGINALS["DataLoader"] = torch.utils.data.DataLoader
_depth = 0


def _has_proxy(values):
    for v in values:
        if isinstance(v, Proxy):
            return True
        if type(v) in (tuple, list) and any(isinstance(x, Proxy) for x in v):
            return True
    return False


def _recording(name, original):
    def factory(*args, **kwargs):
        if OPEN and (_has_proxy(args) or _has_proxy(kwargs.values())):
            aten = "" if name == "DataLoader" else name
            return OPEN[-1]._graph.add(CALL, aten, args, kwargs or None, fn=original)
        return original(*args, **kwargs)

    factory.__name__ = getattr(original, "__name__", name)
    factory.__doc__ = getattr(original, "__doc__", None)
    return factory


_PATCHED = {name: _recording(name, fn) for name, fn in _ORIGINALS.items()}
# Installed with one dict update per namespace (cheaper than a setattr each, per trace).
_TORCH, _DATA = vars(torch), vars(torch.utils.data)
_ON = {name: _PATCHED[name] for name in _FACTORIES}
_OFF = {name: _ORIGINALS[name] for name in _FACTORIES}


def patch():
    """Installs the recording factories (nested recordings share one install)."""
    global _depth
    _depth += 1
    if _depth == 1:
        _TORCH.update(_ON)
        _DATA["DataLoader"] = _PATCHED["DataLoader"]


def unpatch():
    global _depth
    _depth -= 1
    if _depth == 0:
        _TORCH.update(_OFF)
        _DATA["DataLoader"] = _ORIGINALS["DataLoader"]
