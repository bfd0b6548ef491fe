"""Sessions: several traces (and Python-level steps between them) recorded in
one block and run in order when it exits. Values flow between them without
``.save()``; ``session.iter`` loops over steps, ``session.cond`` guards them."""

import sys

import torch

from . import _C, patching
from .config import CONFIG
from .control import BRANCHES
from .graph import CALL, OPEN, STOP, Graph, _keep_foreign, resolve


class _Break(Exception):
    """A session-level stop(): leaves the innermost session.iter loop."""


class Session:
    """``with model.session() as session:`` — traces inside run when the block exits."""

    def __init__(self, model, scan=False, validate=False):
        self._model = model
        self._scan = scan  # the default of every trace inside (model.session(scan=..., validate=...))
        self._validate = validate
        self._steps = []
        self._stack = [self._steps]
        self._graph = None
        self._graphs = []
        self._frame = None

    # -- recording -------------------------------------------------------------------

    def __enter__(self):
        from .tracer import _OPEN

        root = self._model._envoy
        if root._session is not None:
            raise _C.InterventionError("a session of this model is already open: sessions cannot be nested")
        if root._tracer is not None:
            raise _C.InterventionError("a session cannot be opened inside a trace")
        object.__setattr__(root, "_session", self)
        _OPEN.append(self)
        patching.patch()
        _record_optimizers(True)
        self._frame = sys._getframe(1)
        self._new_segment()
        return self

    def _new_segment(self):
        graph = Graph()
        graph.shared = True
        self._graph = graph
        self._graphs.append(graph)
        self._stack[-1].append(("segment", graph))

    def _add_trace(self, tracer):
        self._graphs.append(tracer._graph)
        self._stack[-1].append(("trace", tracer))
        self._new_segment()

    def apply(self, fn, *args, **kwargs):
        """Records ``fn(*args, **kwargs)``, run in order with the session's traces."""
        from .tracer import _BUILTIN_OPS

        return self._graph.add(CALL, _BUILTIN_OPS.get(fn, ""), args, kwargs or None, fn=fn)

    def log(self, *args):
        """Prints the values when the session runs (in order with its traces)."""
        self.apply(print, *args)

    def local(self, fn=None):
        """nnsight 0.4's ``session.local()``: everything runs locally here (see
        ``Tracer.local``)."""
        from .helpers import local

        return local(fn)

    def stop(self):
        """Inside ``session.iter``: leaves the loop (like ``break``); outside any loop:
        ends the session there (the steps recorded after it do not run)."""
        self._graph.add(STOP)

    def iter(self, collection):
        """``with session.iter(items) as item:`` runs the block's steps once per item
        (a list, a proxy of one, a DataLoader, any iterable)."""
        return _Loop(self, collection)

    def cond(self, condition):
        """``with session.cond(c):`` runs the block's steps only if `c` is true then."""
        return _Guard(self, condition)

    def __exit__(self, exc_type, exc, tb):
        from .tracer import _OPEN, _inject

        object.__setattr__(self._model._envoy, "_session", None)
        if self in _OPEN:
            _OPEN.remove(self)
            patching.unpatch()
            _record_optimizers(False)
        if BRANCHES:
            from .control import finish

            finish(self, exc_type is not None)
        if exc_type is not None:
            return False
        if len(self._stack) > 1:
            raise _C.InterventionError(
                "a loop or branch of this session was left open (a `for x in proxy:` loop ended by an exception "
                "that was caught?): the steps recorded after it would run inside it"
            )
        try:
            try:
                self._run(self._steps)
            except _Break:
                pass  # session.stop() outside any loop: the session ends there
        finally:
            for graph in self._graphs:
                if graph.state != 1:
                    graph.finish(graph.values or {})
                else:
                    graph.node_lines = graph.node_lines or []
        if CONFIG.APP.FRAME_INJECTION:
            for graph in self._graphs:
                _inject(self._frame, graph)
        return False

    # -- running -----------------------------------------------------------------------

    def _run(self, steps):
        for kind, obj in steps:
            if kind == "segment":
                if obj.nodes:
                    _run_segment(obj)
            elif kind == "trace":
                obj._execute(keep_nodes=True)
            elif kind == "loop":
                for item in _items(obj.collection):
                    obj.current = item
                    try:
                        self._run(obj.steps)
                    except _Break:
                        break
            elif kind == "guard":
                previous = obj.previous
                if previous is not None and previous.taken:
                    obj.taken = True  # an earlier branch of the chain ran
                    continue
                runs = obj.condition is None or bool(resolve(obj.condition))
                obj.taken = runs
                if runs:
                    self._run(obj.steps)


def _run_segment(graph):
    """Runs session-level nodes (no model): all of them run at once."""
    from .errors import annotate

    saved = sorted(set(graph.saved))
    graph.state = 2
    try:
        plan = _C.compile(graph.nodes, graph.sites, [], 0, saved, graph.lines, graph)
        run = _C.Run(plan, graph.fns, CONFIG.engine.python_fallback)
        try:
            try:
                run.begin()
            except _C.EarlyStop:
                raise _Break() from None
            finally:
                graph.values = run.values(saved)
            run.end()
        finally:
            run.release()
    except _Break:
        graph.state = 1
        raise
    except BaseException as e:
        graph.state = 1
        raise annotate(e, graph)
    graph.state = 1


def _items(collection):
    value = resolve(collection)
    return list(value)


class _Block:
    def __init__(self, session):
        self._session = session
        self.steps = []

    def __enter__(self):
        session = self._session
        session._stack[-1].append((self.kind, self))
        session._stack.append(self.steps)
        session._new_segment()
        return self._entered()

    def __exit__(self, exc_type, exc, tb):
        session = self._session
        session._stack.pop()
        session._new_segment()
        return False


class _Loop(_Block):
    kind = "loop"

    def __init__(self, session, collection):
        super().__init__(session)
        self.collection = collection
        _keep_foreign(None, collection)
        self.current = None

    def _item(self):
        return self.current

    def _entered(self):
        # The loop's first step reads the current item, each iteration.
        return self._session._graph.add(CALL, "", (), None, fn=self._item)


class _Guard(_Block):
    kind = "guard"
    taken = False  # (when the session runs) whether this branch or an earlier one of its chain ran

    def __init__(self, session, condition, previous=None):
        super().__init__(session)
        self.condition = condition
        self.previous = previous
        _keep_foreign(None, condition)  # read when the session runs

    def _entered(self):
        return self

    def else_(self, condition=None):
        """The steps run when no earlier branch of the chain ran (with a condition: an elif)."""
        return _Guard(self._session, condition, previous=self)


# While a session is recorded, constructing a torch optimizer records it (as in
# nnsight 0.4): ``optimizer.step()`` / ``.zero_grad()`` then run in order with the
# session's traces (training a parameter made in the session, nnsight's LoRA
# example), not at once while recording.
_optimizer_depth = 0
_OPTIMIZER = torch.optim.Optimizer


def _construct(cls, *args, **kwargs):
    return cls(*args, **kwargs)


def _optimizer_new(cls, *args, **kwargs):
    if OPEN and _optimizer_depth and OPEN[-1]._graph.state == 0:
        return OPEN[-1]._graph.add(CALL, "", (cls, *args), kwargs or None, fn=_construct)
    return object.__new__(cls)


def _record_optimizers(on):
    global _optimizer_depth
    _optimizer_depth += 1 if on else -1
    if on and _optimizer_depth == 1:
        _OPTIMIZER.__new__ = _optimizer_new
    elif not on and _optimizer_depth == 0:
        del _OPTIMIZER.__new__


