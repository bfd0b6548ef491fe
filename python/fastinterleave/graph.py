"""The recorded graph: one trace's nodes, in recording order.

Nodes are plain tuples the C++ compiler reads directly; the Python side never
orders, counts or runs them (after the trace, operations on proxies evaluate
eagerly on their values instead).
"""

import contextvars
import operator
import os

import torch

from . import _C

# Op codes (csrc/include/fastinterleave/graph.h: enum class Op).
SITE, SWAP, CALL, GETITEM, SETITEM, GETATTR, STOP, IDENTITY, GRAD, COND, ENDCOND = range(11)
# Hook kinds and projections.
OUTPUT, INPUT = 0, 1
WHOLE, FIRST_ARG = 0, 1

# A recorded node's line is the first frame outside these directories (the
# engine's line_index: fastinterleave's and torch's files are not the user's).
_C.set_skipped_dirs((os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__))))
_line_index = _C.line_index

RECORDING, DONE, RUNNING = 0, 1, 2

_LINE_OF_NODE = operator.itemgetter(9)  # a node record's line index

# Traces and sessions being recorded in this thread / asyncio task, innermost
# last (a tuple; _C.Context sets it). An operation on a proxy of another
# recording graph (a session's earlier trace) records in the innermost.
OPEN = contextvars.ContextVar("fastinterleave.open", default=())
_open_blocks = OPEN.get


class Graph:
    """Nodes, the sites they read, saved node ids, source lines, Python callables."""

    # Defaults read from the class until set (a trace's fixed cost is mostly such stores).
    invoker = 0  # the invoke being recorded (-1: an edit, seen by the whole batch)
    values = None  # {node: value} once run
    state = RECORDING
    node_lines = None  # each node's line, kept when the nodes are dropped
    shared = False  # in a session: proxies of other graphs read here are kept for it
    fake = None  # scan=True: node -> fake value (shapes while recording)
    fake_mode = None
    validate = False
    bridged = ()  # in a session: nodes later steps read (kept while it runs, not after)

    def __init__(self):
        self.nodes = []
        self.sites = []
        self._site_index = {}
        self.saved = []
        self.lines = []
        self._line_index = {}
        self.fns = []
        self._fn_index = {}

    # -- recording -------------------------------------------------------------

    def add(self, op, name="", args=(), kwargs=None, site=-1, iteration=0, projection=WHOLE, fn=None):
        """Records a node and returns its proxy (or, after the trace, the value)."""
        if self.state != RECORDING:
            return self._eager(op, name, args, kwargs, fn)
        blocks = _open_blocks()
        if blocks and blocks[-1]._graph is not self:
            return blocks[-1]._graph.add(op, name, args, kwargs, site, iteration, projection, fn)
        py_fn = -1 if fn is None else self.fn_id(fn)
        if self.shared:
            _keep_foreign(self, args)
            if kwargs:
                _keep_foreign(self, kwargs)
        nodes = self.nodes
        index = len(nodes)
        line = _line_index(self._line_index, self.lines)  # the user's line recording it (-1: none)
        nodes.append((op, name, args, kwargs, site, iteration, self.invoker, projection, py_fn, line))
        if self.fake is not None and op != SITE:
            from .scan import fake_eval

            value = fake_eval(self, op, name, args, kwargs, fn, self.validate)
            if value is not None:
                self.fake[index] = value
        return Proxy(self, index)

    def add_site(self, path, kind, calls, projection):
        """Records a Site node, a module's value (``add(SITE, ...)`` without the
        checks no site needs), and returns its proxy."""
        if self.state != RECORDING:
            return self._eager(SITE, "", (), None, None)
        key = (path, kind)
        site = self._site_index.get(key)
        if site is None:
            site = self._site_index[key] = len(self.sites)
            self.sites.append(key)
        nodes = self.nodes
        index = len(nodes)
        line = _line_index(self._line_index, self.lines)
        nodes.append((SITE, "", (), None, site, calls, self.invoker, projection, -1, line))
        return Proxy(self, index)

    def site(self, module_path, kind):
        key = (module_path, kind)
        index = self._site_index.get(key)
        if index is None:
            index = self._site_index[key] = len(self.sites)
            self.sites.append(key)
        return index

    def fn_id(self, fn):
        index = self._fn_index.get(id(fn))
        if index is None:
            index = self._fn_index[id(fn)] = len(self.fns)
            self.fns.append(fn)
        return index

    # -- after the run ---------------------------------------------------------

    def describe(self, node):
        """``file.py:12: source`` of the line that recorded `node`."""
        from .errors import source_line

        lines = self.node_lines if self.node_lines is not None else list(map(_LINE_OF_NODE, self.nodes))
        if 0 <= node < len(lines) and lines[node] >= 0:
            return source_line(self.lines[lines[node]])
        return f"node {node}"

    def finish(self, values, keep_nodes=False):
        """Keeps the saved values and drops the recording (constants included),
        unless it may run again (`keep_nodes`: a trace in a session loop)."""
        self.values = values
        self.node_lines = list(map(_LINE_OF_NODE, self.nodes))
        if not keep_nodes:
            self.nodes = []
            self.fns = []
            self._fn_index = {}
        self.state = DONE

    def extend(self, other):
        """Appends another graph's nodes (an edit), re-pointed at this graph; they
        see the whole batch."""
        offset = len(self.nodes)
        sites = [self.site(*key) for key in other.sites]
        fns = [self.fn_id(fn) for fn in other.fns]
        lines = []
        for line in other.lines:
            lines.append(len(self.lines))
            self.lines.append(line)

        def rebind(obj):
            return map_proxies(obj, lambda p: Proxy(self, p._node + offset) if p._graph is other else p)

        for op, name, args, kwargs, site, calls, _, projection, py_fn, line in other.nodes:
            self.nodes.append((
                op, name, rebind(args), rebind(kwargs) if kwargs else kwargs,
                sites[site] if site >= 0 else -1, calls, -1, projection,
                fns[py_fn] if py_fn >= 0 else -1, lines[line] if line >= 0 else -1,
            ))

    def kept(self):
        """The nodes whose values outlive the run: saved, and bridged to later steps."""
        return self.saved + self.bridged if self.bridged else self.saved

    def drop_bridged(self):
        """After the session: the values only later steps needed are dropped."""
        if self.bridged:
            if self.values:
                for node in set(self.bridged).difference(self.saved):
                    self.values.pop(node, None)
            self.bridged = ()

    def why_unset(self, node):
        where = self.describe(node)
        if node not in self.saved:
            return (
                f"this value was not saved: call .save() on it inside the trace to keep it after the trace "
                f"(recorded at {where})"
            )
        return (
            f"this value was never set: the intervention recorded at {where} did not run "
            "(stop() ended the forward pass before it, or the code skipped it)"
        )

    def _eager(self, op, name, args, kwargs, fn):
        args = resolve(args)
        kwargs = resolve(kwargs) if kwargs else {}
        if op == GETITEM:
            return args[0][args[1]]
        if op == SETITEM:
            args[0][args[1]] = args[2]
            return None
        if op == GETATTR:
            return getattr(args[0], name)
        if op == GRAD:
            return args[0].grad
        if op == CALL and fn is not None:
            return fn(*args, **kwargs)
        raise _C.InterventionError("this trace has already run: module inputs and outputs can only be read or set inside it")


def map_proxies(obj, fn):
    """`obj` with every proxy in it (inside tuples, lists, dict values and slices)
    replaced by ``fn(proxy)``; the containers are rebuilt, everything else kept."""
    if isinstance(obj, Proxy):
        return fn(obj)
    kind = type(obj)
    if kind is tuple:
        return tuple(map_proxies(x, fn) for x in obj)
    if kind is list:
        return [map_proxies(x, fn) for x in obj]
    if kind is dict:
        return {k: map_proxies(v, fn) for k, v in obj.items()}
    if kind is slice:
        return slice(map_proxies(obj.start, fn), map_proxies(obj.stop, fn), map_proxies(obj.step, fn))
    return obj


def _keep_foreign(graph, obj):
    """Marks proxies of other (still recording) graphs as bridged: in a session a
    later step reads them without .save(); after the session they are gone unless
    saved (Graph.drop_bridged), as in nnsight."""

    def keep(proxy):
        other = proxy._graph
        if other is not graph and other.state == RECORDING:
            if not other.bridged:
                other.bridged = []
            other.bridged.append(proxy._node)
        return proxy

    map_proxies(obj, keep)


def resolve(obj):
    """Replaces proxies (of finished traces) by their values, inside containers too."""
    return map_proxies(obj, _value_of)


def _value_of(proxy):
    return proxy.value


from .proxy import Proxy  # noqa: E402  (proxy.py needs the op codes above)

