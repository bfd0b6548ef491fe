"""Envoy: a module of the wrapped model, with its .output / .input / .inputs."""

import contextvars
import inspect
import warnings

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
        # The model's open trace and session, per thread / asyncio task (set by
        # _C.Context as a block opens; every envoy of the model shares them).
        if root is None:
            object.__setattr__(self, "_tracer_var", contextvars.ContextVar("fastinterleave.trace", default=None))
            object.__setattr__(self, "_session_var", contextvars.ContextVar("fastinterleave.session", default=None))
        else:
            object.__setattr__(self, "_tracer_var", root._tracer_var)
            object.__setattr__(self, "_session_var", root._session_var)
        # The engine's hooks on the model (root envoy only; shared by edit copies).
        object.__setattr__(self, "_hooks", ModelHooks(self) if root is None else None)
        object.__setattr__(self, "_rename", dict(rename or {}))
        children = {}
        for name, child in module.named_children():
            children[name] = Envoy(child, f"{path}.{name}" if path else name, self._root, rename)
        object.__setattr__(self, "_children", children)
        for name, child in children.items():
            _attach(self, name, child)
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
        tracer = self._tracer_var.get()
        if tracer is not None and isinstance(attr, torch.Tensor):
            # Parameters and buffers read inside a trace are clones: edits do not touch the model.
            return tracer._graph.add(CALL, "clone", (attr.detach(),), fn=torch.Tensor.clone)
        return attr

    def __setattr__(self, name, value):
        if name in ("output", "input", "inputs") or name.startswith("_"):
            object.__setattr__(self, name, value)
        elif name.startswith("nns_") and hasattr(type(self), name):  # a value moved aside by a submodule
            object.__setattr__(self, name, value)
        elif isinstance(value, torch.nn.Module):
            setattr(self._module, name, value)
            child = self._children[name] = Envoy(value, f"{self._path}.{name}" if self._path else name, self._root)
            _attach(self, name, child)
            self._root._hooks.remove()  # hooks sit on the modules that were there
        else:
            if self._tracer_var.get() is not None and not hasattr(self._module, name):
                # Inside a trace a new attribute is a typo far more often than not
                # (`envoy.ouptut = v` would silently add one to the user's module).
                raise AttributeError(_unknown_attribute(self, name))
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
        tracer = self._tracer_var.get()
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
        _check_call(current + n)
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

    def _clear(self, propagate=True):
        """nnsight 0.4's ``Envoy._clear()`` (its tests call it between traces): resets an
        envoy's per-trace state. Nothing outlives a trace on an envoy here."""

    def modules(self):
        """This envoy and all below it, depth first."""
        out = [self]
        for child in self._children.values():
            out.extend(child.modules())
        return out

    def __repr__(self):
        return f"Envoy({self._path or '<root>'}: {type(self._module).__name__})"

    # -- sites -------------------------------------------------------------------

    @property
    def _tracer(self):
        """The model's trace open in this thread / task, or None."""
        return self._tracer_var.get()

    @property
    def _session(self):
        """The model's session open in this thread / task, or None."""
        return self._session_var.get()

    def _open_tracer(self, what):
        tracer = self._tracer_var.get()
        if tracer is None:
            where = f"'{self._path}'" if self._path else "the model"
            raise _C.InterventionError(
                f".{what} of {where} can only be used inside a `with model.trace(...)` block"
            )
        return tracer

    @property
    def output(self):
        """The module's output (a proxy)."""
        tracer = self._tracer_var.get()  # (_open_tracer, inlined: the hot path)
        if tracer is None:
            self._open_tracer("output")
        return tracer._site(self._path, OUTPUT, WHOLE)

    @output.setter
    def output(self, value):
        self._open_tracer("output")._swap(self._path, OUTPUT, WHOLE, value)

    @property
    def inputs(self):
        """``(args, kwargs)`` the module is called with (a proxy)."""
        tracer = self._tracer_var.get()  # (_open_tracer, inlined: the hot path)
        if tracer is None:
            self._open_tracer("inputs")
        return tracer._site(self._path, INPUT, WHOLE)

    @inputs.setter
    def inputs(self, value):
        self._open_tracer("inputs")._swap(self._path, INPUT, WHOLE, value)

    @property
    def input(self):
        """The module's first positional argument (a proxy)."""
        tracer = self._tracer_var.get()  # (_open_tracer, inlined: the hot path)
        if tracer is None:
            self._open_tracer("input")
        return tracer._site(self._path, INPUT, FIRST_ARG)

    @input.setter
    def input(self, value):
        self._open_tracer("input")._swap(self._path, INPUT, FIRST_ARG, value)


def self_returning(name, inner, doc):
    """A method calling ``self.<inner>.<name>(...)`` that returns `self` where that
    returns the inner object (``model.to(...)`` keeps the envoy / the wrapper)."""

    def method(self, *args, **kwargs):
        target = getattr(self, inner)
        result = getattr(target, name)(*args, **kwargs)
        return self if result is target else result

    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    return method


# Module methods that return the module: through an envoy they return the envoy
# (nnsight 0.4 does it for `to`).
_SELF_RETURNING = ("to", "cuda", "cpu", "eval", "train", "half", "float", "double", "bfloat16", "requires_grad_")
for _name in _SELF_RETURNING:
    setattr(Envoy, _name, self_returning(
        _name, "_module",
        f"The module's ``{_name}(...)``; returns this envoy (``model = model.{_name}(...)`` keeps the wrapper)."))

# nnsight 0.4's Envoy attributes that a child module of the same name would hide:
# the child is mounted under its name instead, and the attribute moves to
# ``nns_<name>`` (as in nnsight 0.4: BERT's and ViT's layers have an `output`
# submodule, read with `layer.output`, while the layer's own output is
# `layer.nns_output`). A child named like one of the module methods above
# (`model.layer1.double`) simply hides the method.
_MOUNTED_NAMES = frozenset(("output", "input", "inputs", "iter", "next", "all", "modules", "to"))


class _Mounted:
    """A child module mounted under a name of the Envoy class (``layer.output``); an
    envoy without such a child (one made by ``type(envoy)(...)``) keeps the attribute."""

    def __init__(self, name, original):
        self.name = name
        self.original = original

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        child = obj._children.get(self.name)
        if child is not None:
            return child
        return self.original.__get__(obj, objtype)

    def __set__(self, obj, value):
        if self.name in obj._children:
            if isinstance(value, torch.nn.Module):
                setattr(obj._module, self.name, value)
                obj._children[self.name] = Envoy(value, f"{obj._path}.{self.name}" if obj._path else self.name, obj._root)
                obj._root._hooks.remove()  # hooks sit on the modules that were there
                return
            raise AttributeError(
                f"'{self.name}' of '{obj._path or '<root>'}' is its submodule: set the module's own "
                f"{self.name} with `.nns_{self.name} = ...`"
            )
        setter = getattr(self.original, "__set__", None)
        if setter is None:
            raise AttributeError(f"cannot set '{self.name}' of an envoy")
        setter(obj, value)


def _attach(owner, name, child):
    """Makes the child envoy ``owner.name`` (mounting it over an Envoy attribute of that name)."""
    if name in _MOUNTED_NAMES:
        _mount(owner, name)
    elif name in _SELF_RETURNING:
        object.__setattr__(owner, name, child)
    else:
        _expose(owner, name, child)


def _mount(owner, name):
    cls = type(owner)
    if not cls.__dict__.get("_preserved", False):
        # A class of this envoy's own, so that the mount concerns this module only.
        cls = type(f"{cls.__name__}.Preserved", (cls,), {"_preserved": True, "__module__": cls.__module__})
        object.__setattr__(owner, "__class__", cls)
    original = inspect.getattr_static(cls, name)
    if isinstance(original, _Mounted):
        return
    warnings.warn(
        f"Module of type `{type(owner._module)}` has pre-defined a `{name}` attribute. nnsight access for "
        f"`{name}` will be mounted at `.nns_{name}` instead of `.{name}` for this module only.",
        stacklevel=4,
    )
    setattr(cls, f"nns_{name}", original)
    setattr(cls, name, _Mounted(name, original))


def _expose(owner, name, child):
    """Makes ``owner.name`` the child envoy by plain attribute lookup (no ``__getattr__``
    call per access), unless `owner`'s class has an attribute of that name (which wins,
    as it would through ``__getattr__``)."""
    if not hasattr(type(owner), name) and name.isidentifier():
        object.__setattr__(owner, name, child)


def _unexpose(owner, name):
    if owner.__dict__.get(name) is not None and not name.startswith("_"):
        object.__delattr__(owner, name)


# The engine counts a module's calls in 32 bits (a bounded range's stop included).
_MAX_CALL = 2**31 - 2


def _check_call(call, what="call index"):
    if call > _MAX_CALL:
        raise _C.InterventionError(
            f"{what} {call} is too large: a module's calls are counted up to {_MAX_CALL} "
            "(for every call from some index on, use .all() or .iter[start:])"
        )
    return call


def _calls(spec):
    """An iteration spec as the engine takes it: int, (start, stop or None), or a sorted list."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 0:
            raise _C.InterventionError("call indices are counted from 0 and cannot be negative")
        return _check_call(spec)
    if isinstance(spec, slice):
        if spec.step not in (None, 1):
            raise _C.InterventionError(".iter[a:b:step] with a step is not supported: list the calls instead")
        start = spec.start or 0
        for bound in (start, spec.stop):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
                raise _C.InterventionError(f".iter[a:b] takes int bounds, not {type(bound).__name__}")
        if start < 0 or (spec.stop is not None and spec.stop <= start):
            raise _C.InterventionError(f".iter[{start}:{spec.stop}] names no call")
        _check_call(start)
        if spec.stop is not None:
            _check_call(spec.stop - 1, "the last call of .iter[a:b],")
        return (start, spec.stop)
    if isinstance(spec, (list, tuple)):
        calls = sorted(set(_calls(int(c)) for c in spec))
        if not calls:
            raise _C.InterventionError(".iter[[]] names no call")
        return calls
    raise _C.InterventionError(f".iter[...] takes an int, a list of ints or a slice, not {type(spec).__name__}")


def _unknown_attribute(envoy, name):
    import difflib

    module = envoy._module
    values = ["output", "input", "inputs"]
    children = sorted(envoy._children)
    attrs = sorted(
        ({*module._parameters, *module._buffers} | {n for n in vars(module) if not n.startswith("_")})
        - set(envoy._children)
    )
    near = difflib.get_close_matches(name, values + children + attrs, n=1)
    where = f"module '{envoy._path}'" if envoy._path else "the model"
    hint = f" Did you mean '{near[0]}'?" if near else ""
    return (
        f"{where} ({type(module).__name__}) has no attribute '{name}' to set inside a trace (setting it would "
        f"only add an attribute to the module).{hint} Settable here: its values {', '.join(values)}; "
        f"its submodules {', '.join(children) or '(none)'}; its attributes {', '.join(attrs[:20])}"
        + (", ..." if len(attrs) > 20 else "")
    )


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
        # A block of calls reads its modules anew: a value read before it (or in an
        # earlier block) is not its value, and the nodes it records run per call.
        tracer._cache.clear()
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
        tracer._cache.clear()
        object.__setattr__(self, "_saved", None)
        return False

    def _site(self, kind, projection):
        return self._envoy._open_tracer("iteration")._site(self._envoy._path, kind, projection, self._calls)

    def _set_site(self, what, kind, projection, value):
        self._envoy._open_tracer(what)._swap(self._envoy._path, kind, projection, value, self._calls)

    def _mounted(self, name):
        """The child envoy mounted under `name` (a submodule named `output`), or None."""
        child = self._envoy._children.get(name)
        return None if child is None else IterationEnvoy(child, self._calls, persist=False)

    @property
    def output(self):
        return self._mounted("output") or self._site(OUTPUT, WHOLE)

    @output.setter
    def output(self, value):
        self._set_site("output", OUTPUT, WHOLE, value)

    @property
    def inputs(self):
        return self._mounted("inputs") or self._site(INPUT, WHOLE)

    @inputs.setter
    def inputs(self, value):
        self._set_site("inputs", INPUT, WHOLE, value)

    @property
    def input(self):
        return self._mounted("input") or self._site(INPUT, FIRST_ARG)

    @input.setter
    def input(self, value):
        self._set_site("input", INPUT, FIRST_ARG, value)

    # The module's own values when a submodule is mounted under their names.
    @property
    def nns_output(self):
        return self._site(OUTPUT, WHOLE)

    @nns_output.setter
    def nns_output(self, value):
        self._set_site("output", OUTPUT, WHOLE, value)

    @property
    def nns_inputs(self):
        return self._site(INPUT, WHOLE)

    @nns_inputs.setter
    def nns_inputs(self, value):
        self._set_site("inputs", INPUT, WHOLE, value)

    @property
    def nns_input(self):
        return self._site(INPUT, FIRST_ARG)

    @nns_input.setter
    def nns_input(self, value):
        self._set_site("input", INPUT, FIRST_ARG, value)

    def __getattr__(self, name):
        attr = getattr(self._envoy, name)
        if isinstance(attr, Envoy):
            return IterationEnvoy(attr, self._calls, persist=False)
        return attr

    def __setattr__(self, name, value):
        if name in ("output", "input", "inputs", "nns_output", "nns_input", "nns_inputs"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._envoy, name, value)

    def __getitem__(self, index):
        return IterationEnvoy(self._envoy[index], self._calls, persist=False)
