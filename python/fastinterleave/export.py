"""Exporting a trace's graph to a file a C++ program runs (``tracer.export(path)``).

The file is the engine's versioned graph format (docs/graph-format.md). The engine
writes the graph itself; this module adds the two sections only Python knows:
the names of saved values and the structure of each intercepted value as Python
saw it (TorchScript's ``torch.jit.trace`` flattens a submodule's output tuple and
keeps only the tensors the rest of the model uses, so a C++ host needs the
Python structure to give ``output[0]`` its meaning).
"""

import struct

import torch

from . import _C
from .errors import _LOCATION, InterventionError, source_line
from .graph import OUTPUT
from .proxy import Proxy

_MAGIC = b"FIGRAPH\x00"
_VERSION = 2
_MAX_DEPTH = 64

# Value structure kinds and constant tags (docs/graph-format.md).
_TENSOR, _CONST, _TUPLE, _LIST, _DICT, _RECORD, _OPAQUE = range(7)
_NONE, _BOOL, _INT, _DOUBLE, _STRING = range(5)


def export_trace(tracer, path, names, frame):
    """Writes `tracer`'s graph (compiled when its block ran) to `path`."""
    plan = tracer._plan
    if plan is None and tracer._layout is not None:  # an empty trace ran without a plan
        plan = tracer._compile(*tracer._layout, [])
    if plan is None:
        raise InterventionError(
            "nothing to export yet: call tracer.export(path) after the trace's `with` block has run"
        )
    graph = tracer._graph
    named = _saved_names(graph, names, frame)
    try:
        core = plan.serialize()
    except ValueError as e:
        raise InterventionError(_with_source(str(e), graph)) from None
    if core[:8] != _MAGIC or struct.unpack_from("<I", core, 8)[0] != _VERSION or core[-8:] != bytes(8):
        raise InterventionError("internal: the engine wrote a graph file of another version than this exporter")
    sites = _site_table(core)
    structures = _site_structures(tracer, [tuple(s) for s in plan.sites])
    data = bytearray(core[:-8])  # drop the engine's empty names and structures sections
    data += struct.pack("<I", len(named))
    for name, node in named:
        data += _str(name) + struct.pack("<i", node)
    entries = sorted((sites.index(key), s) for key, s in structures.items() if key in sites)
    data += struct.pack("<I", len(entries))
    for index, s in entries:
        data += struct.pack("<i", index) + s
    data = bytes(data)
    _C.load_plan(data)  # what we write, the strict loader reads
    with open(path, "wb") as f:
        f.write(data)


def _with_source(message, graph):
    """``file.py:12`` -> ``file.py:12: <the source line>`` for the trace's lines."""
    known = set(graph.lines)
    return _LOCATION.sub(lambda m: source_line(m.group(0)) if m.group(0) in known else m.group(0), message)


def _is_scalar(value):
    return value is None or isinstance(value, (bool, int, float, str))


def _saved_names(graph, names, frame):
    """[(name, node)]: `names` maps names to saved proxies or values; by default the
    caller's variables holding saved values (as frame injection left them) name them."""
    saved = set(graph.saved)
    values = graph.values or {}
    taken = set()

    def node_of(obj, scalars):
        if isinstance(obj, Proxy):
            return obj._node if obj._graph is graph and obj._node in saved else None
        if _is_scalar(obj) and not scalars:
            return None  # `x is 0` says nothing about where 0 came from
        # Several saved nodes can give the very same object (a block's output[0]
        # is the next module's input): each variable takes the next of them.
        nodes = [node for node, value in values.items() if value is obj and node in saved]
        return next((n for n in nodes if n not in taken), nodes[0] if nodes else None)

    out = []
    if names is None:
        for name, obj in list(frame.f_locals.items()) if frame is not None else []:
            node = node_of(obj, scalars=False)
            if node is not None and node not in taken:
                taken.add(node)
                out.append((name, node))
        return out
    for name, obj in dict(names).items():
        if not isinstance(name, str) or not name:
            raise InterventionError(f"export: names must be non-empty strings, got {name!r}")
        node = node_of(obj, scalars=True)
        if node is None:
            raise InterventionError(
                f"export: names[{name!r}] is not a value saved in this trace (call .save() on it inside the trace)"
            )
        taken.add(node)
        out.append((name, node))
    return out


def _site_table(core):
    """The (module path, hook kind) of each site, read from the engine's file header."""
    pos = 8 + 4 + 8
    (ninv,) = struct.unpack_from("<I", core, pos)
    pos += 4 + 16 * ninv
    (nsites,) = struct.unpack_from("<I", core, pos)
    pos += 4
    sites = []
    for _ in range(nsites):
        (n,) = struct.unpack_from("<I", core, pos)
        path = core[pos + 4:pos + 4 + n].decode()
        sites.append((path, core[pos + 4 + n]))
        pos += 5 + n
    return sites


def _site_structures(tracer, sites):
    """{(path, kind): encoded structure}: runs the model once more, without
    interventions, with plain hooks noting what each site's value looks like."""
    model = tracer._model
    args, kwargs = model._batch_invokes([inv.inputs for inv in tracer._invokers])
    if tracer._model_kwargs:
        kwargs = {**kwargs, **tracer._model_kwargs}

    found = {}
    handles = []

    def output_hook(key):
        def hook(module, inputs, output):
            if key not in found:
                found[key] = _structure(output)

        return hook

    def input_hook(key):
        def hook(module, inputs, kw):
            if key not in found:
                found[key] = _structure((inputs, kw))

        return hook

    try:
        for key in sites:
            path, kind = key
            module = model._module_at(path)
            if kind == OUTPUT:
                handles.append(module.register_forward_hook(output_hook(key)))
            else:
                handles.append(module.register_forward_pre_hook(input_hook(key), with_kwargs=True))
        with torch.no_grad():
            model._execute(*args, **kwargs)
    except Exception as e:
        raise InterventionError(
            f"export: running the model to record the structure of the values it intercepts failed: {e}"
        ) from e
    finally:
        for handle in handles:
            handle.remove()
    return found


def _str(text):
    data = text.encode()
    return struct.pack("<I", len(data)) + data


def _structure(value, depth=0):
    """The encoded structure of a value, as the engine converts Python values."""
    if isinstance(value, torch.Tensor):
        return struct.pack("<Bi", _TENSOR, value.dim())
    if depth < _MAX_DEPTH:
        if value is None:
            return struct.pack("<BB", _CONST, _NONE)
        if isinstance(value, bool):
            return struct.pack("<BBB", _CONST, _BOOL, value)
        if isinstance(value, int) and -(2**63) <= value < 2**63:
            return struct.pack("<BBq", _CONST, _INT, value)
        if isinstance(value, float):
            return struct.pack("<BBd", _CONST, _DOUBLE, value)
        if isinstance(value, str):
            return struct.pack("<BB", _CONST, _STRING) + _str(value)
        if isinstance(value, (tuple, list)) and (isinstance(value, tuple) or type(value) is list):
            kind = _TUPLE if isinstance(value, tuple) else _LIST
            return struct.pack("<BI", kind, len(value)) + b"".join(_structure(x, depth + 1) for x in value)
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            kind = _DICT if type(value) is dict else _RECORD  # a dict subclass: a transformers ModelOutput
            return struct.pack("<BI", kind, len(value)) + b"".join(
                _str(k) + _structure(v, depth + 1) for k, v in value.items()
            )
    return struct.pack("<B", _OPAQUE) + _str(type(value).__qualname__)
