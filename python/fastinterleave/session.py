"""Sessions: several traces (and Python-level steps between them) recorded in
one block and run in order when it exits. Values flow between them without
``.save()``; ``session.iter`` loops over steps, ``session.cond`` guards them."""

import torch

from . import _C, patching  # noqa: F401  (patching: the factories every block installs)
from .config import CONFIG
from .control import BRANCHES
from .graph import CALL, OPEN, STOP, Graph, _keep_foreign, resolve


class _Break(Exception):
    """A session-level stop(): leaves the innermost session.iter loop."""


class Session(_C.Context):
    """``with model.session() as session:`` — traces inside run when the block exits.

    Entered and left in C (_C.Context: the model's open session in this thread /
    task, the factories); _enter / _exit are the Python parts."""

    _pauses_gc = False

    def __init__(self, model, scan=False, validate=False):
        _install_optimizer_recording()
        self._model = model
        self._var = model._envoy._session_var
        self._scan = scan  # the default of every trace inside (model.session(scan=..., validate=...))
        self._validate = validate
        self._steps = []
        self._stack = [self._steps]
        self._graph = None
        self._graphs = []

    # -- recording -------------------------------------------------------------------

    def _refuse(self, open_session):
        raise _C.InterventionError("a session of this model is already open: sessions cannot be nested")

    def _enter(self):
        if self._model._envoy._tracer is not None:
            raise _C.InterventionError("a session cannot be opened inside a trace")
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

    def _exit(self, exc_type, exc, tb):
        from .tracer import _inject

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
                graph.drop_bridged()
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

    saved = sorted(set(graph.kept()))
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
# example), not at once while recording. Optimizer.__new__ is replaced once, with
# the first session made, and stays: outside a session being recorded in the
# calling thread / task it is object.__new__ (so no block's entry or exit changes
# torch, and no interrupt can leave it half changed).
_OPTIMIZER = torch.optim.Optimizer
_open_blocks = OPEN.get


def _construct(cls, *args, **kwargs):
    return cls(*args, **kwargs)


def _recorded(cls, args, kwargs):
    """The node constructing ``cls(*args, **kwargs)`` if a session is being recorded here, else None."""
    blocks = _open_blocks()
    if blocks and blocks[-1]._graph.state == 0 and any(isinstance(b, Session) for b in blocks):
        return blocks[-1]._graph.add(CALL, "", (cls, *args), kwargs or None, fn=_construct)
    return None


def _optimizer_new(cls, *args, **kwargs):
    node = _recorded(cls, args, kwargs)
    return object.__new__(cls) if node is None else node


def _recording_new(own):
    """An optimizer class's own ``__new__`` (nnsight 0.4.11's import gives every torch
    optimizer one), recording like _optimizer_new first."""

    def __new__(cls, *args, **kwargs):
        node = _recorded(cls, args, kwargs)
        return own(cls, *args, **kwargs) if node is None else node

    __new__._fastinterleave_own = own
    return __new__


def _install_optimizer_recording():
    if _OPTIMIZER.__dict__.get("__new__") is not _optimizer_new:
        _OPTIMIZER.__new__ = _optimizer_new
    classes = _OPTIMIZER.__subclasses__()
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        own = cls.__dict__.get("__new__")
        if own is not None and not hasattr(own, "_fastinterleave_own"):
            cls.__new__ = _recording_new(own)


