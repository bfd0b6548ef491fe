"""Tracer and Invoker: record interventions, then run them with the model."""

import sys
import weakref

import torch

from . import _C, patching  # noqa: F401  (patching: the factories every block installs)
from .config import CONFIG
from .control import BRANCHES as _BRANCHES
from .errors import annotate
from .graph import CALL, COND, ENDCOND, FIRST_ARG, OPEN, OUTPUT, RUNNING, STOP, SWAP, Graph, _keep_foreign, resolve
from .proxy import Proxy

Tensor = torch.Tensor

# Python builtins the engine runs natively (TorchScript's operators of the same meaning).
_BUILTIN_OPS = {len: "len", abs: "abs", int: "Int", float: "Float", bool: "Bool"}

def current_tracer():
    """The innermost trace or session being recorded in this thread / task, or None."""
    blocks = OPEN.get()
    return blocks[-1] if blocks else None


class Invoker:
    """One input of a batched trace: ``with tracer.invoke(x):``.

    ``invoker.inputs`` is the prepared ``(args, kwargs)``; ``invoker.batch_size``
    how many rows it adds to the batch."""

    # Defaults read from the class until set (fewer stores per invoke).
    inputs = None
    batch_size = None
    index = None
    _deferred = False
    _scan = None  # tracer.invoke(x, scan=...): whether this invoke is scanned (None: as the trace)

    def __init__(self, tracer, *inputs, **kwargs):
        self._tracer = weakref.ref(tracer)  # the tracer holds its invokers: no cycle
        self._raw = (inputs, kwargs)

    @property
    def tracer(self):
        return self._tracer()

    def __enter__(self):
        tracer = self._tracer()
        if tracer._invoker is not None:
            raise _C.InterventionError(
                "an invoke is already open: close it (leave its `with` block) before opening another"
            )
        graph = tracer._graph
        if graph.state != 0:
            raise _C.InterventionError("this trace has already run")
        inputs, kwargs = self._raw
        for x in inputs:
            if type(x) is not Tensor and _has_proxy(x):
                self._deferred = True
                break
        else:
            if kwargs and _has_proxy(kwargs):
                self._deferred = True
        if self._deferred:
            # Inputs computed by an earlier step of a session: prepared when they exist.
            _keep_foreign(graph, self._raw)
            self.inputs = self._raw
        else:
            model = tracer._model
            first = inputs[0] if inputs else None
            if type(first) is Tensor and model._plain_prepare:
                # What NNsight._prepare_input gives, without the call (the common case).
                shape = first.shape
                self.inputs, self.batch_size = self._raw, shape[0] if shape else 1
            else:
                self.inputs, self.batch_size = model._prepare_input(*inputs, **kwargs)
            scan = self._scan
            if scan is None:
                scan = tracer._scan
            if scan:
                from .scan import scan_model

                fakes, mode = scan_model(tracer._model, *self.inputs)
                tracer._fakes[len(tracer._invokers)] = fakes
                graph.fake_mode = mode
        self.index = len(tracer._invokers)
        tracer._invokers.append(self)
        tracer._invoker = self
        graph.invoker = self.index
        if tracer._cache:
            tracer._cache.clear()
        if tracer._iterations:
            tracer._iterations.clear()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._tracer()._invoker = None
        return False


class Tracer(_C.Context):
    """``with model.trace(...) as tracer:`` records interventions; they run with
    one forward pass of all invokes' inputs when the block exits.

    Entering and leaving (the open trace of the model in this thread / task, the
    factories, the collector's pause) happen in C (_C.Context): no interrupt can
    leave them half done. _enter / _exit are the Python parts."""

    _pauses_gc = True  # see _C.Context: paused while the trace records and runs

    # Defaults read from the class until set (a trace's fixed cost is mostly such stores).
    _scan = False
    _run_model = True
    _fakes = {}  # scan=True: invoker index -> {(path, kind): fake values per call} (then per trace)
    _invoker = None
    _implicit = None
    _model_kwargs = {}  # replaced, never changed in place
    output = None
    _plan_handle = None  # the compiled plan, once run (the engine's handle)
    _layout = None  # an empty trace's batch layout (its plan is compiled only to export it)

    def __init__(self, model, *inputs, scan=False, validate=False, remote=False, backend=None, **kwargs):
        if remote or backend is not None:
            raise NotImplementedError(
                "fastinterleave runs models locally: remote execution (remote=True / backend=...) is not supported"
            )
        self._model = model
        self._var = model._envoy._tracer_var  # the model's open trace (set by _C.Context)
        self._graph = graph = Graph()
        self._session = model._envoy._session_var.get()
        if self._session is not None:
            graph.shared = True
            # model.session(scan=..., validate=...): the default of every trace inside it.
            scan = scan or self._session._scan
            validate = validate or self._session._validate
        if scan or validate:
            self._scan = True
            self._fakes = {}
            graph.fake = {}
            graph.validate = validate
        for edit in model._edits:
            graph.extend(edit)
        self._invokers = []
        self._cache = {}
        self._iterations = {}  # envoy path -> calls its sites read (.next(), .all(), .iter[...])
        if inputs:
            # Positional inputs make one implicit invoke; other keywords go to the model call.
            self._implicit = Invoker(self, *inputs)
            self._model_kwargs = kwargs
        elif kwargs:
            # Keyword-only inputs (`model.trace(**tokenizer(...))`) are the invoke's inputs.
            self._implicit = Invoker(self, **kwargs)

    # -- the block -------------------------------------------------------------------

    def _refuse(self, open_trace):
        raise _C.InterventionError("a trace of this model is already open: traces cannot be nested")

    def _enter(self):
        if self._implicit is not None:
            self._implicit.__enter__()
        return self

    def _exit(self, exc_type, exc, tb):
        self._invoker = None  # the implicit invoke ends with the block
        if _BRANCHES:  # `if proxy:` branches left open (an error, or a debugger's trace function)
            _finish_branches(self, exc_type is not None)
        if exc_type is not None:
            return False
        if self._session is not None:
            self._session._add_trace(self)  # runs when the session exits
            return False
        if not self._run_model:  # model.scan(...): shapes only
            return False
        self._execute()
        values = self._graph.values
        if values and CONFIG.APP.FRAME_INJECTION:
            _C.inject(self._frame, self._graph, values)  # (_inject, inlined: the hot path)
        return False

    def invoke(self, *inputs, scan=None, **kwargs):
        """A batch entry: ``with tracer.invoke(x):`` (all invokes run in one forward pass).
        ``scan=True`` scans this invoke (shapes while recording), ``scan=False`` skips the
        scan a ``scan=True`` / ``validate=True`` trace would make; other keywords go to the
        model's ``_prepare_input`` (as nnsight 0.4's Invoker)."""
        invoker = Invoker(self, *inputs, **kwargs)
        if scan is not None:
            invoker._scan = bool(scan)
            if scan and self._graph.fake is None:
                self._fakes = {}
                self._graph.fake = {}
        return invoker

    # -- recording helpers ----------------------------------------------------------------

    def _site(self, path, kind, projection, calls=None):
        """The proxy of a module's value at `calls` (default: the envoy's current iteration)."""
        if calls is None:
            calls = self._iterations.get(path, 0) if self._iterations else 0
        key = (path, kind, projection, tuple(calls) if type(calls) is list else calls)
        proxy = self._cache.get(key)
        if proxy is None:
            proxy = self._graph.add_site(path, kind, calls, projection)
            self._cache[key] = proxy
            if self._fakes:
                self._fake_site(self._graph, proxy, path, kind, projection, calls)
        return proxy

    def _fake_site(self, graph, proxy, path, kind, projection, calls):
        """scan=True: the site's fake value (recorded by the scan of the invoke's inputs)."""
        fakes = self._fakes.get(graph.invoker)
        if fakes is not None and type(calls) is int:
            per_call = fakes.get((path, kind), [])
            if calls < len(per_call):
                value = per_call[calls]
                graph.fake[proxy._node] = value[0][0] if projection == FIRST_ARG else value

    def _swap(self, path, kind, projection, value, calls=None):
        target = self._site(path, kind, projection, calls)
        self._graph.add(SWAP, "", (target, value))
        # Later reads of this site see the swapped value: they get a new node.
        for key in [k for k in self._cache if k[0] == path and k[1] == kind]:
            del self._cache[key]

    def cond(self, condition):
        """``with tracer.cond(x > 0):`` — the block's interventions run only if the
        condition (computed when the model runs) is true. ``.else_()`` chains."""
        return Condition(self, condition)

    def stop(self):
        """Ends the forward pass here; values saved before it are kept."""
        self._graph.add(STOP)

    def apply(self, fn, *args, **kwargs):
        """Records ``fn(*args, **kwargs)`` (a Python callable run when the model runs)."""
        return self._graph.add(CALL, _BUILTIN_OPS.get(fn, ""), args, kwargs or None, fn=fn)

    def log(self, *args):
        """Prints values when the model runs."""
        self.apply(print, *args)

    def local(self, fn=None):
        """nnsight 0.4's ``tracer.local()``: code to run on this machine rather than on a
        remote service. Everything runs locally here: ``with tracer.local():`` records
        its block as usual, and ``tracer.local(fn)`` records calls of `fn` (like
        ``nnsight.trace(fn)``)."""
        from .helpers import local

        return local(fn)

    # -- running -------------------------------------------------------------------------

    def _execute(self, keep_nodes=False):
        graph = self._graph
        model = self._model
        if not self._invokers:
            raise _C.InterventionError(
                "this trace has no inputs: pass them to model.trace(...) or open `with tracer.invoke(...)` blocks"
            )
        layout = []
        inputs = []
        start = 0
        for inv in self._invokers:
            if inv._deferred:  # each run (a session loop) reads the current values
                args, kw = resolve(inv._raw)
                inv.inputs, inv.batch_size = model._prepare_input(*args, **kw)
            layout.append((start, inv.batch_size))
            inputs.append(inv.inputs)
            start += inv.batch_size
        # (One invoke with the default batching: its own inputs, without a call.)
        args, kwargs = inputs[0] if len(inputs) == 1 and model._plain_batch else model._batch_invokes(inputs)
        if self._model_kwargs:
            kwargs = {**kwargs, **self._model_kwargs}

        graph.state = RUNNING
        if not graph.nodes and not keep_nodes:
            # Nothing to run beside the model: no plan, no run, no hooks.
            self._layout = (layout, start)
            model._envoy._hooks.drop_idle()
            try:
                self.output = model._execute(*args, **kwargs)
            except BaseException as e:
                graph.finish({})
                raise annotate(e, graph)
            graph.finish({})
            return
        values = {}
        try:
            # Compiled, run with the model's hooks and ended in one engine call.
            model_hooks = model._envoy._hooks
            hooks, remove = model_hooks.acquire(graph.sites, model._module_at)
            forward = model._model if model._plain_execute else model._execute
            saved = graph.saved + graph.bridged if graph.bridged else graph.saved  # (Graph.kept, inlined)
            try:
                self._plan_handle, self.output, values = _C.run_trace(
                    graph.nodes, graph.sites, layout, start, saved, graph.lines, graph, graph.fns,
                    CONFIG.engine.python_fallback, hooks, forward, args, kwargs,
                )
            finally:
                if remove is None:
                    model_hooks.busy = False
                else:
                    remove()
        except BaseException as e:
            graph.finish(values)
            raise annotate(e, graph)
        graph.finish(values, keep_nodes)

    @property
    def _plan(self):
        """The plan that ran (a ``_C.Plan``), or None."""
        handle = self._plan_handle
        return None if handle is None else _C.plan_of(handle)

    def _compile(self, layout, start, saved):
        graph = self._graph
        return _C.compile(graph.nodes, graph.sites, layout, start, saved, graph.lines, graph)

    def export(self, path, names=None):
        """Writes the graph that ran to `path`, for a C++ program to run with no Python.

        Call it after the ``with`` block. The file is the versioned graph format of
        docs/graph-format.md; a C++ program loads it with
        ``fastinterleave::Intervention::load`` and runs it in a TorchScript model
        (README: "C++ embedding"). Saved values are stored under names, by default
        the names of the caller's variables holding them (``h = ....save()`` is
        ``"h"``); ``names={"h": h}`` names them explicitly (saved proxies or the
        values they gave). Exporting runs the model once more, without
        interventions, to record the structure of each intercepted value.

        Raises InterventionError when the graph holds Python code (``nnsight.apply``,
        a Python-only operation or object), naming the line that recorded it."""
        from .export import export_trace

        export_trace(self, path, names, sys._getframe(1))


class Condition:
    """A branch of a trace: ``with tracer.cond(c) as branch: ...`` then
    ``with branch.else_(): ...`` (or ``.else_(c2)`` for an elif)."""

    def __init__(self, tracer, condition, previous=None):
        self._tracer = tracer
        self._condition = condition
        self._previous = previous
        self._node = None

    def __enter__(self):
        graph = self._tracer._graph
        if self._previous is None:
            proxy = graph.add(COND, "", (self._condition,))
        else:
            if self._previous._node is None:
                raise _C.InterventionError("else_() must follow a finished `with tracer.cond(...)` block")
            proxy = graph.add(COND, "else", (self._previous._node, self._condition))
        self._node = proxy
        # Module values read inside the branch are its own nodes (unset when it is
        # not taken), and those read in it are not reused after it.
        self._tracer._cache.clear()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._tracer._graph.add(ENDCOND)
        self._tracer._cache.clear()
        return False

    def else_(self, condition=None):
        """The branch taken when no earlier branch of the chain was (with a
        condition: an elif)."""
        return Condition(self._tracer, condition, previous=self)


class EditTracer(Tracer):
    """``with model.edit() as edited:`` records interventions that every later
    trace of `edited` starts with (on a copy of the model wrapper, or in place)."""

    def __init__(self, model, *inputs, inplace=False, **kwargs):
        target = model if inplace else model._shallow_copy()
        super().__init__(target, *inputs, **kwargs)
        self._target = target
        self._graph.invoker = -1  # edits see the whole batch, whatever its size

    def _enter(self):
        super()._enter()
        self._graph.invoker = -1
        return self._target

    def _exit(self, exc_type, exc, tb):
        if self._implicit is not None:
            self._implicit.__exit__(None, None, None)
        if _BRANCHES:
            _finish_branches(self, exc_type is not None)
        if exc_type is None:
            self._target._edits = [*self._target._edits, self._graph]
        return False


def _finish_branches(owner, failed):
    from .control import finish

    finish(owner, failed)


def _has_proxy(obj):
    """Whether a proxy is in `obj` (inside tuples, lists and dict values)."""
    kind = type(obj)
    if kind is tuple or kind is list:
        for x in obj:
            if type(x) is not Tensor and _has_proxy(x):
                return True
        return False
    if kind is dict:
        for x in obj.values():
            if type(x) is not Tensor and _has_proxy(x):
                return True
        return False
    return isinstance(obj, Proxy)


def _inject(frame, graph):
    """Replaces the frame's top-level locals that hold saved proxies of `graph` by their values."""
    if frame is not None and graph.values:
        _C.inject(frame, graph, graph.values)
