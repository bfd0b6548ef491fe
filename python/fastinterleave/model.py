"""NNsight: wrap a torch module to trace interventions on it."""

import torch

from .envoy import _SELF_RETURNING, Envoy, _expose, _unexpose, self_returning
from .tracer import Tracer


class NNsight:
    """Wraps an ``nn.Module``. Its submodules are attributes (``model.layer1``,
    ``model.h[0]``); ``model.trace(...)`` opens a trace.

    Subclasses adapt inputs with nnsight 0.4's hooks: ``_prepare_input``,
    ``_batch`` and ``_execute``."""

    def __init__(self, model, *args, rename=None, **kwargs):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_envoy", Envoy(model, rename=rename))
        object.__setattr__(self, "_edits", [])  # graphs every trace starts with (model.edit())
        for name, child in self._envoy._children.items():
            _expose_root(self, name, child)

    # -- tracing -------------------------------------------------------------------

    def trace(self, *inputs, trace=True, **kwargs):
        """``with model.trace(x):`` records interventions run on ``x`` when the block
        exits; ``model.trace(x, trace=False)`` just runs the model and returns its output."""
        if not trace:
            (args, kw), _ = self._prepare_input(*inputs)
            return self._execute(*args, **{**kw, **kwargs})
        return Tracer(self, *inputs, **kwargs)

    def scan(self, *inputs, **kwargs):
        """``with model.scan(x):`` — records on fake tensors only: shapes and
        errors show while recording, nothing runs."""
        tracer = Tracer(self, *inputs, scan=True, validate=True, **kwargs)
        tracer._run_model = False
        return tracer

    def session(self, backend=None, remote=False, blocking=True, validate=False, scan=False, debug=None):
        """``with model.session() as session:`` — traces inside run in order when it
        exits; their values flow between them without .save(). ``validate=True`` /
        ``scan=True`` apply to every trace inside; ``debug`` is accepted (errors always
        name the line); ``blocking`` only matters remotely."""
        from .session import Session

        if remote or backend is not None:
            raise NotImplementedError(
                "fastinterleave runs models locally: remote execution (remote=True / backend=...) is not supported"
            )
        return Session(self, scan=scan, validate=validate)

    def edit(self, *inputs, inplace=False, **kwargs):
        """``with model.edit() as edited:`` — interventions recorded here run in
        every later trace of `edited` (a copy of this wrapper, or this one if
        ``inplace=True``)."""
        from .tracer import EditTracer

        return EditTracer(self, *inputs, inplace=inplace, **kwargs)

    def clear_edits(self):
        """Drops the edits made with ``model.edit(...)``."""
        object.__setattr__(self, "_edits", [])

    def remove_hooks(self):
        """Removes the hooks fastinterleave keeps installed on the model between traces
        (idle ones: they change nothing; the next trace installs those it needs). They
        also go when the wrapper is garbage collected."""
        self._envoy._hooks.remove()

    def _shallow_copy(self):
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        object.__setattr__(copy, "_edits", list(self._edits))
        return copy

    # -- input handling (nnsight 0.4's signatures) ---------------------------------------

    def _prepare_input(self, *inputs, **kwargs):
        """``(inputs, kwargs), batch_size``: the rows of the first tensor argument."""
        first = None
        for value in inputs:
            if isinstance(value, torch.Tensor):
                first = value
                break
        else:
            for value in kwargs.values():
                if isinstance(value, torch.Tensor):
                    first = value
                    break
        if first is None:
            return (inputs, kwargs), 1
        shape = first.shape
        return (inputs, kwargs), shape[0] if shape else 1

    def _batch(self, batched_inputs, *args, **kwargs):
        """Adds one invoke's prepared inputs to the batch: tensors concatenate on dim 0."""
        if batched_inputs is None:
            return args, kwargs
        batched_args, batched_kwargs = batched_inputs
        if len(batched_args) != len(args) or set(batched_kwargs) != set(kwargs):
            raise ValueError("every invoke must pass the same arguments to be batched together")
        args = tuple(_cat(a, b) for a, b in zip(batched_args, args))
        kwargs = {k: _cat(batched_kwargs[k], v) for k, v in kwargs.items()}
        return args, kwargs

    def _execute(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    # Whether ``_prepare_input`` / ``_execute`` / ``_batch`` are the ones above: a
    # trace then reads a tensor input's rows itself, calls the module itself, and
    # takes a single invoke's inputs as they are (Python calls fewer per trace).
    # Set for each subclass.
    _plain_prepare = True
    _plain_execute = True
    _plain_batch = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._plain_prepare = cls._prepare_input is NNsight._prepare_input
        cls._plain_execute = cls._execute is NNsight._execute
        cls._plain_batch = cls._batch is NNsight._batch

    def _batch_invokes(self, inputs):
        """The batched ``(args, kwargs)`` of every invoke's prepared ``(args, kwargs)``:
        ``_batch`` folded over them, or, with the default ``_batch``, one concatenation
        per argument (folding it is O(N^2) in the number of invokes)."""
        if self._plain_batch:
            return inputs[0] if len(inputs) == 1 else batch_all(inputs)
        batched = None
        for args, kwargs in inputs:
            batched = self._batch(batched, *args, **kwargs)
        return batched

    def _module_at(self, path):
        """The module whose hooks serve the envoy at `path` ("" is the root)."""
        return self._model.get_submodule(path)

    # -- the root module ----------------------------------------------------------------

    def __getattr__(self, name):
        return getattr(self._envoy, name)

    def __setattr__(self, name, value):
        if name == "_edits":
            object.__setattr__(self, name, value)
            return
        setattr(self._envoy, name, value)
        child = self._envoy._children.get(name)
        if child is not None:
            _expose_root(self, name, child)
        elif name in self.__dict__:
            _unexpose(self, name)

    def __getitem__(self, index):
        return self._envoy[index]

    def __call__(self, *args, **kwargs):
        return self._envoy(*args, **kwargs)

    @property
    def output(self):
        return self._envoy.output

    @output.setter
    def output(self, value):
        self._envoy.output = value

    @property
    def input(self):
        return self._envoy.input

    @input.setter
    def input(self, value):
        self._envoy.input = value

    @property
    def inputs(self):
        return self._envoy.inputs

    @inputs.setter
    def inputs(self, value):
        self._envoy.inputs = value

    @property
    def device(self):
        """The device of the model's first parameter (None without parameters)."""
        for param in self._model.parameters():
            return param.device
        return None

    def __repr__(self):
        return f"{type(self).__name__}({self._model!r})"


def _expose_root(owner, name, child):
    """``model.name`` is the child envoy; a child named like one of the module methods
    below hides the method, as it does on an envoy."""
    if name in _SELF_RETURNING:
        object.__setattr__(owner, name, child)
    else:
        _expose(owner, name, child)


# `model = model.to("cuda")` / `.eval()` / ... keep the wrapper (nnsight 0.4 does it for `to`).
for _name in _SELF_RETURNING:
    setattr(NNsight, _name, self_returning(
        _name, "_envoy", f"The model's ``{_name}(...)``; returns this wrapper (``model = model.{_name}(...)`` keeps it)."))


def batch_all(inputs):
    """What folding NNsight._batch over every invoke's ``(args, kwargs)`` gives, in one
    concatenation per argument."""
    first_args, first_kwargs = inputs[0]
    for args, kwargs in inputs[1:]:
        if len(args) != len(first_args) or set(kwargs) != set(first_kwargs):
            raise ValueError("every invoke must pass the same arguments to be batched together")

    def join(values, where):
        if all(isinstance(v, torch.Tensor) for v in values):
            try:
                return torch.cat(values, dim=0)
            except RuntimeError:
                raise ValueError(_mismatch(where, values)) from None
        first = values[0]
        for v in values[1:]:
            if not (v is first or (not isinstance(v, torch.Tensor) and v == first)):
                raise ValueError(
                    f"cannot batch invoke inputs of type {type(v).__name__} that differ between invokes"
                )
        return first

    args = tuple(join([a[i] for a, _ in inputs], f"positional input {i}") for i in range(len(first_args)))
    kwargs = {k: join([kw[k] for _, kw in inputs], f"input '{k}'") for k in first_kwargs}
    return args, kwargs


def _mismatch(where, values, names=None):
    """The error of tensors (one per invoke) that cannot be concatenated along dim 0."""
    names = names or [f"invoke {i}" for i in range(len(values))]
    shapes = ", ".join(f"{n}: {tuple(v.shape)} on {v.device}" for n, v in zip(names, values))
    return (
        f"cannot batch the invokes: their {where} tensors cannot be concatenated along dim 0 "
        f"(every dim but the first must match, on one device) — {shapes}. "
        "Give every invoke inputs of the same shape past the batch dim, or run them in separate traces"
    )


def _cat(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        try:
            return torch.cat([a, b], dim=0)
        except RuntimeError:
            raise ValueError(_mismatch("input", [a, b], ["the invokes before", "the next invoke"])) from None
    if a is b or (not isinstance(a, torch.Tensor) and a == b):
        return a
    raise ValueError(f"cannot batch invoke inputs of type {type(a).__name__} that differ between invokes")
