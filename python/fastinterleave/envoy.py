"""Envoy: a module of the wrapped model, with its .output / .input / .inputs."""

import torch

from . import _C
from .graph import CALL, FIRST_ARG, INPUT, OUTPUT, WHOLE


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
        object.__setattr__(self, "_rename", dict(rename or {}))
        children = {}
        for name, child in module.named_children():
            children[name] = Envoy(child, f"{path}.{name}" if path else name, self._root, rename)
        object.__setattr__(self, "_children", children)
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
            self._children[name] = Envoy(value, f"{self._path}.{name}" if self._path else name, self._root)
        else:
            setattr(self._module, name, value)

    def __getitem__(self, index):
        items = list(self._children.values())
        return items[index]

    def __len__(self):
        return len(self._children)

    def __iter__(self):
        return iter(self._children.values())

    def __call__(self, *args, **kwargs):
        """Applies the module to proxies inside a trace (without firing hooks), or runs it."""
        tracer = self._root._tracer
        if tracer is None:
            return self._module(*args, **kwargs)
        return tracer._graph.add(CALL, "", args, kwargs or None, fn=self._module.forward)

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
        return self._open_tracer("output")._site(self._path, OUTPUT, WHOLE)

    @output.setter
    def output(self, value):
        self._open_tracer("output")._swap(self._path, OUTPUT, WHOLE, value)

    @property
    def inputs(self):
        """``(args, kwargs)`` the module is called with (a proxy)."""
        return self._open_tracer("inputs")._site(self._path, INPUT, WHOLE)

    @inputs.setter
    def inputs(self, value):
        self._open_tracer("inputs")._swap(self._path, INPUT, WHOLE, value)

    @property
    def input(self):
        """The module's first positional argument (a proxy)."""
        return self._open_tracer("input")._site(self._path, INPUT, FIRST_ARG)

    @input.setter
    def input(self, value):
        self._open_tracer("input")._swap(self._path, INPUT, FIRST_ARG, value)
