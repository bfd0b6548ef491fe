"""While a trace or session is recorded, torch's tensor factories (and
DataLoader) accept proxies — ``torch.zeros(proxy.shape)`` — by recording a node.

torch's argument parser refuses a proxy where it wants ints before any override
could see it, so the factories themselves are replaced while a block is open
(``_C.Context`` installs them with the first open block and restores the
originals with the last, in C). A replaced factory records only for the thread /
task that has a block open; every other call, from any thread, is the original's.
"""

import torch

from . import _C
from .graph import CALL, OPEN
from .proxy import Proxy

_FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange", "eye", "tensor")
_ORIGINALS = {name: getattr(torch, name) for name in _FACTORIES}
_ORIGINALS["DataLoader"] = torch.utils.data.DataLoader
_open_blocks = OPEN.get


def _has_proxy(values):
    for v in values:
        if isinstance(v, Proxy):
            return True
        if type(v) in (tuple, list) and any(isinstance(x, Proxy) for x in v):
            return True
    return False


def _recording(name, original):
    def factory(*args, **kwargs):
        blocks = _open_blocks()
        if blocks and (_has_proxy(args) or _has_proxy(kwargs.values())):
            aten = "" if name == "DataLoader" else name
            return blocks[-1]._graph.add(CALL, aten, args, kwargs or None, fn=original)
        return original(*args, **kwargs)

    factory.__name__ = getattr(original, "__name__", name)
    factory.__doc__ = getattr(original, "__doc__", None)
    return factory


_PATCHED = {name: _recording(name, fn) for name, fn in _ORIGINALS.items()}
# (namespace, recording, original): one dict update per namespace, per switch.
_C.set_context_state(OPEN, [
    (vars(torch), {n: _PATCHED[n] for n in _FACTORIES}, {n: _ORIGINALS[n] for n in _FACTORIES}),
    (vars(torch.utils.data), {"DataLoader": _PATCHED["DataLoader"]}, {"DataLoader": _ORIGINALS["DataLoader"]}),
])
