"""fastinterleave: nnsight 0.4's intervention API over a C++ engine.

``import fastinterleave as nnsight`` runs code written for nnsight 0.4.x:

    model = nnsight.NNsight(net)
    with model.trace(x):
        hidden = model.layer1.output.save()
        model.layer2.output[:, 0] = 0
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from ._loader import load_extension as _load_extension

_C = _load_extension()

from .config import CONFIG  # noqa: E402
from .envoy import Envoy  # noqa: E402
from .errors import InterventionError  # noqa: E402
from .helpers import (  # noqa: E402
    apply,
    bool,
    bytearray,
    bytes,
    complex,
    cond,
    dict,
    float,
    int,
    iter,
    list,
    local,
    log,
    set,
    stop,
    str,
    trace,
    tuple,
)
from .language import LanguageModel  # noqa: E402
from .model import NNsight  # noqa: E402
from .proxy import Proxy  # noqa: E402
from .tracer import Invoker, Tracer  # noqa: E402
from . import sweep  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CONFIG",
    "Envoy",
    "InterventionError",
    "Invoker",
    "LanguageModel",
    "NNsight",
    "Proxy",
    "Tracer",
    "apply",
    "bool",
    "bytearray",
    "bytes",
    "complex",
    "cond",
    "dict",
    "float",
    "int",
    "iter",
    "list",
    "local",
    "log",
    "set",
    "stop",
    "str",
    "sweep",
    "tuple",
]
