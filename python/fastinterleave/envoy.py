"""Envoy: a module of the wrapped model, with its .output / .input / .inputs."""

import torch

from . import _C
from .graph import CALL, FIRST_ARG, INPUT, OUTPUT, WHOLE
from .hooks import ModelHooks


class Envoy:
    """Mirrors one ``nn.Module``: children as attributes, and inside a trace its
    ``.output``, ``.input`` (first positional argument) and ``.inputs``
    (``(args, kwargs)``) as proxies; ``[...] = v`` edits them in place and
    ``= v`` swaps them."""

    def __init__(self, module, path="", root=None, rename=None):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_root", root if root is not None else self)
        object.__setattr__(self, "_tracer", None)  # the open tracer (root envoy only)
        object.__setattr__(self, "_session", None)  # the open session (root envoy only)
        # The engine's hooks on the model (root envoy only; shared by edit copies).
        object.__setattr__(self, "_hooks", ModelHooks(self) if root is None else None)
        object.__setattr__(self, "_rename", dict(rename or {}))
        children = {}
        for name, child in module.named_children():
            children[name] = Envoy(child, f"{path}.{name}" if path else name, self._root, rename)
        object.__setattr__(self, "_children", children)
        for name, child in children.items():
            _expose(self, name, child)
        aliases = {}
        for alias, target in self._rename.items():
            # An alias names a child (`rename={"transformer": "model"}`) or a longer path.
            if target in children or "." in target:
                aliases[alias] = target
        object.__setattr__(self, "_aliases", aliases)

    # -- the tree ------------------------------------------------------------------

    def _child(self, name):
        child = self._children.get(name)
        if child is not None:
            return child
        target = self._aliases.get(name)
        if target is not None:
            envoy = self
            for part in target.split("."):
                envoy = envoy._children[part]
            return envoy
        return None

    def __getattr__(self, name):
        child = self._child(name)
        if child is not None:
            return child
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        module = self._module
        try:
            attr = getattr(module, name)
        except AttributeError:
            valid = ", ".join(sorted(self._children) + sorted(self._aliases)) or "none"
            where = f"module '{self._path}'" if self._path else "the model"
            raise AttributeError(
                f"{where} ({type(module).__name__}) has no submodule or attribute '{name}'. "
                f"Its submodules: {valid}"
            ) from None
        tracer = self._root._tracer
        if tracer is not None and isinstance(attr, torch.Tensor):
            # Parameters and buffers read inside a trace are clones: edits do not touch the model.
            return tracer._graph.add(CALL, "clone", (attr.detach(),), fn=torch.Tensor.clone)
        return attr

    def __setattr__(self, name, value):
        if name in ("output", "input", "inputs") or name.startswith("_"):
            object.__setattr__(self, name, value)
        elif isinstance(value, torch.nn.Module):
            setattr(self._module, name, value)
            child = self._children[name] = Envoy(value, f"{self._path}.{name}" if self._path else name, self._root)
            _expose(self, name, child)
            self._root._hooks.remove()  # hooks sit on the modules that were there
        else:
            setattr(self._module, name, value)
            if self._children.pop(name, None) is not None:  # a submodule replaced by a non-module
                _unexpose(self, name)

    def __getitem__(self, index):
        items = list(self._children.values())
        return items[index]

    def __len__(self):
        return len(self._children)

    def __iter__(self):
        return iter(self._children.values())

    def __call__(self, *args, hook=False, **kwargs):
        """Applies the module to proxies inside a trace, or runs it. Inside a trace its
        hooks do not fire, unless ``hook=True``: then the call is one of the module's
        calls, and `.output` / `.input` of it and of the modules it calls see it (a
        module attached to the model, as in nnsight)."""
        tracer = self._root._tracer
        if tracer is None:
            return self._module(*args, **kwargs)
        fn = self._module if hook else self._module.forward
        return tracer._graph.add(CALL, "", args, kwargs or None, fn=fn)

    # -- iteration (a module's k-th call in one forward pass, or generation step k) --

    def next(self, n=1):
        """Later accesses (here and below, for the rest of the invoke) read the next call."""
        tracer = self._open_tracer("next()")
        current = tracer._iterations.get(self._path, 0)
        if type(current) is not int:
            raise _C.InterventionError(".next() cannot follow .all() or .iter[...] on the same module")
        for envoy in self.modules():
            tracer._iterations[envoy._path] = current + n
        return self

    def all(self):
        """Accesses (here and below) read every call. Lasts for the invoke, or the `with` block."""
        return IterationEnvoy(self, (0, None), persist=True)

    @property
    def iter(self):
        """``envoy.iter[k | [k, ...] | a:b]``: the given calls, one-off or as a `with` block."""
        return _IterIndexer(self)

    def modules(self):
        """This envoy and all below it, depth first."""
        out = [self]
        for child in self._children.values():
            out.extend(child.modules())
        return out

    def __repr__(self):
        return f"Envoy({self._path or '<root>'}: {type(self._module).__name__})"

    # -- sites -------------------------------------------------------------------

    def _open_tracer(self, what):
        tracer = self._root._tracer
        if tracer is None:
            where = f"'{self._path}'" if self._path else "the model"
            raise _C.InterventionError(
                f".{what} of {where} can only be used inside a `with model.trace(...)` block"
            )
        return tracer

    @property
    def output(self):
        """The module's output (a proxy)."""
        tracer = self._root._tracer  # (_open_tracer, inlined: the hot path)
        if tracer is None:
            self._open_tracer("output")
        return tracer._site(self._path, OUTPUT, WHOLE)

    @output.setter
    def output(self, value):
        self._open_tracer("output")._swap(self._path, OUTPUT, WHOLE, value)

    @property
    def inputs(self):
        """``(args, kwargs)`` the module is called with (a proxy)."""
        tracer = self._root._tracer  # (_open_tracer, inlined: the hot path)
        if tracer is None:
            self._open_tracer("inputs")
        return tracer._site(self._path, INPUT, WHOLE)

    @inputs.setter
    def inputs(self, value):
        self._open_tracer("inputs")._swap(self._path, INPUT, WHOLE, value)

    @property
    def input(self):
        """The module's first positional argument (a proxy)."""
        tracer = self._root._tracer  # (_open_tracer, inlined: the hot path)
        if tracer is None:
            self._open_tracer("input")
        return tracer._site(self._path, INPUT, FIRST_ARG)

    @input.setter
    def input(self, value):
        self._open_tracer("input")._swap(self._path, INPUT, FIRST_ARG, value)


def _expose(owner, name, child):
    """Makes ``owner.name`` the child envoy by plain attribute lookup (no ``__getattr__``
    call per access), unless `owner`'s class has an attribute of that name (which wins,
    as it would through ``__getattr__``)."""
    if not hasattr(type(owner), name) and name.isidentifier():
        object.__setattr__(owner, name, child)


def _unexpose(owner, name):
    if owner.__dict__.get(name) is not None and not name.startswith("_"):
        object.__delattr__(owner, name)


def _calls(spec):
    """An iteration spec as the engine takes it: int, (start, stop or None), or a sorted list."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 0:
            raise _C.InterventionError("call indices are counted from 0 and cannot be negative")
        return spec
    if isinstance(spec, slice):
        if spec.step not in (None, 1):
            raise _C.InterventionError(".iter[a:b:step] with a step is not supported: list the calls instead")
        start = spec.start or 0
        if start < 0 or (spec.stop is not None and spec.stop <= start):
            raise _C.InterventionError(f".iter[{start}:{spec.stop}] names no call")
        return (start, spec.stop)
    if isinstance(spec, (list, tuple)):
        calls = sorted(set(_calls(int(c)) for c in spec))
        if not calls:
            raise _C.InterventionError(".iter[[]] names no call")
        return calls
    raise _C.InterventionError(f".iter[...] takes an int, a list of ints or a slice, not {type(spec).__name__}")


class _IterIndexer:
    def __init__(self, envoy):
        self._envoy = envoy

    def __getitem__(self, spec):
        return IterationEnvoy(self._envoy, _calls(spec), persist=False)


class IterationEnvoy:
    """An envoy reading given calls of its module (and of those below it).

    As a ``with`` block it sets them for the block; used directly
    (``envoy.iter[2].output``) it reads them once."""

    def __init__(self, envoy, calls, persist):
        object.__setattr__(self, "_envoy", envoy)
        object.__setattr__(self, "_calls", calls)
        object.__setattr__(self, "_saved", None)
        if persist:
            self._apply()

    def _apply(self):
        tracer = self._envoy._open_tracer("iteration")
        saved = {e._path: tracer._iterations.get(e._path) for e in self._envoy.modules()}
        for path in saved:
            tracer._iterations[path] = self._calls
        object.__setattr__(self, "_saved", (tracer, saved))

    def __enter__(self):
        if self._saved is None:
            self._apply()
        return self

    def __exit__(self, *exc):
        tracer, saved = self._saved
        for path, before in saved.items():
            if before is None:
                tracer._iterations.pop(path, None)
            else:
                tracer._iterations[path] = before
        object.__setattr__(self, "_saved", None)
        return False

    def _site(self, kind, projection):
        return self._envoy._open_tracer("iteration")._site(self._envoy._path, kind, projection, self._calls)

    @property
    def output(self):
        return self._site(OUTPUT, WHOLE)

    @output.setter
    def output(self, value):
        self._envoy._open_tracer("output")._swap(self._envoy._path, OUTPUT, WHOLE, value, self._calls)

    @property
    def inputs(self):
        return self._site(INPUT, WHOLE)

    @inputs.setter
    def inputs(self, value):
        self._envoy._open_tracer("inputs")._swap(self._envoy._path, INPUT, WHOLE, value, self._calls)

    @property
    def input(self):
        return self._site(INPUT, FIRST_ARG)

    @input.setter
    def input(self, value):
        self._envoy._open_tracer("input")._swap(self._envoy._path, INPUT, FIRST_ARG, value, self._calls)

    def __getattr__(self, name):
        attr = getattr(self._envoy, name)
        if isinstance(attr, Envoy):
            return IterationEnvoy(attr, self._calls, persist=False)
        return attr

    def __setattr__(self, name, value):
        if name in ("output", "input", "inputs"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._envoy, name, value)

    def __getitem__(self, index):
        return IterationEnvoy(self._envoy[index], self._calls, persist=False)
