"""Proxy: a stand-in for a value inside a trace; operations on it record nodes."""

import copy
import copyreg
import functools
import operator
import sys

import torch

from . import _C
from .config import CONFIG
from .graph import CALL, DONE, GETATTR, GETITEM, GRAD, RECORDING, SETITEM, STOP, SWAP

_UNSET = "Accessing value before it's been set."  # nnsight 0.4's words; our detail follows

# Python operator -> ATen op name (the engine runs these natively).
_DUNDER_ATEN = {
    "add": "add", "sub": "sub", "mul": "mul", "truediv": "div", "div": "div", "floordiv": "floor_divide|floordiv",
    "mod": "remainder", "pow": "pow", "matmul": "matmul", "and": "bitwise_and", "or": "bitwise_or",
    "xor": "bitwise_xor", "lshift": "bitwise_left_shift", "rshift": "bitwise_right_shift",
    "lt": "lt", "le": "le", "gt": "gt", "ge": "ge", "eq": "eq", "ne": "ne",
    "neg": "neg", "pos": "positive", "abs": "abs", "invert": "bitwise_not",
    "iadd": "add_", "isub": "sub_", "imul": "mul_", "itruediv": "div_",
}

_METHODS = {}
_KNOWN_AFTER_SCAN = {"shape", "dtype", "device", "ndim"}


def _method(name):
    """A Python callable running `obj.name(*args, **kwargs)` (the fallback of a method node)."""
    fn = _METHODS.get(name)
    if fn is None:

        def fn(obj, *args, **kwargs):
            return getattr(obj, name)(*args, **kwargs)

        fn.__name__ = name
        _METHODS[name] = fn
    return fn


def _call_value(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _flip(fn):
    def flipped(a, b):
        return fn(b, a)

    return flipped


def _graph_of(args, kwargs):
    for a in args:
        if isinstance(a, Proxy):
            return a._graph
        if isinstance(a, (tuple, list)):
            for x in a:
                if isinstance(x, Proxy):
                    return x._graph
    for a in (kwargs or {}).values():
        if isinstance(a, Proxy):
            return a._graph
    raise _C.InterventionError("internal: no proxy among the arguments")


def _aten_name(func):
    name = getattr(func, "__name__", "") or ""
    if name.startswith("__") and name.endswith("__"):
        return _DUNDER_ATEN.get(name[2:-2], "")
    return name


class Proxy(_C.ProxyBase):
    """A value of the traced model (or computed from one), known once the trace runs.

    Inside the trace every operation records a node. After the trace, ``.value``
    holds saved values, and operations evaluate at once on the value.

    ``Proxy(graph, node)``: the C base keeps ``_graph`` and ``_node`` (read-only),
    made without a Python frame per proxy.
    """

    __slots__ = ()

    # -- values ----------------------------------------------------------------

    def save(self):
        """Keeps this value after the trace (and puts it in place of the local variable)."""
        if self._graph.state == RECORDING:
            self._graph.saved.append(self._node)
        return self

    @property
    def value(self):
        """The value, once the trace ran. ``ValueError`` if unsaved or never set."""
        g = self._graph
        if g.state == DONE:
            values = g.values
            if values is not None and self._node in values:
                return values[self._node]
            detail = g.why_unset(self._node)
            raise ValueError(f"{_UNSET} {detail[:1].upper()}{detail[1:]}")
        raise ValueError(
            f"{_UNSET} This value is not available while the trace is being recorded: "
            "values exist once the `with` block has exited"
        )

    def stop(self):
        """Ends the forward pass once this value is computed."""
        self._graph.add(STOP, "", (self,))

    @property
    def grad(self):
        """The gradient reaching this value in the next backward pass recorded after
        this line (``loss.backward()`` in the same trace). Edit it in place or assign."""
        return self._graph.add(GRAD, "", (self,))

    @grad.setter
    def grad(self, value):
        self._graph.add(SWAP, "", (self._graph.add(GRAD, "", (self,)), value))

    # -- recording ---------------------------------------------------------------

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        fake = self._graph.fake
        if fake is not None and name in _KNOWN_AFTER_SCAN and self._node in fake:
            from .scan import UNKNOWN, fake_attr

            value = fake_attr(fake[self._node], name)  # real values once scanned
            if value is not UNKNOWN:
                return value
        return self._graph.add(GETATTR, name, (self,))

    def __call__(self, *args, **kwargs):
        g = self._graph
        if g.state != RECORDING:
            return self.value(*args, **kwargs)
        record = g.nodes[self._node]
        if record[0] == GETATTR and self._node == len(g.nodes) - 1:
            # `x.sum(1)`: the attribute read was for a method call; record the call.
            g.nodes.pop()
            name = record[1]
            return g.add(CALL, name, (record[2][0], *args), kwargs or None, fn=_method(name))
        return g.add(CALL, "", (self, *args), kwargs or None, fn=_call_value)

    def __getitem__(self, key):
        return self._graph.add(GETITEM, "", (self, key))

    def __setitem__(self, key, value):
        self._graph.add(SETITEM, "", (self, key, value))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        graph = _graph_of(args, kwargs)
        name = _aten_name(func)
        if func is _TENSOR_GETITEM:
            return graph.add(GETITEM, "", tuple(args))
        if func is _TENSOR_SETITEM:
            graph.add(SETITEM, "", tuple(args))
            return None
        if kwargs:
            kwargs = dict(kwargs)
            kwargs.pop("_stacklevel", None)  # torch.nn.functional bookkeeping, not an op argument
            if "inplace" in kwargs and name:
                name = name + "_" if kwargs.pop("inplace") else name
        return graph.add(CALL, name, tuple(args), kwargs or None, fn=func)

    def __setattr__(self, name, value):
        # `proxy.requires_grad = True`: recorded, set on the value when the model runs.
        if name == "grad":
            _GRAD.__set__(self, value)
        elif name in ("_graph", "_node"):
            object.__setattr__(self, name, value)  # (read-only: raises)
        else:
            self._graph.add(CALL, "", (self, name, value), fn=setattr)

    # -- Python protocols: after the trace, the value's; while recording, a clear
    # error (or, for `if` / `for`, a branch / a session loop) --------------------------------

    def __bool__(self):
        if self._graph.state == DONE:
            return bool(self.value)
        if not CONFIG.APP.CONTROL_FLOW_HANDLING:
            raise _C.InterventionError(
                "a proxy has no truth value while the trace is being recorded (its value is computed when the "
                "model runs), and CONFIG.APP.CONTROL_FLOW_HANDLING is off: use `with tracer.cond(condition):` "
                "for a branch, or test the saved value after the trace"
            )
        from .control import branch

        return branch(self, sys._getframe(1))

    def __iter__(self):
        if self._graph.state == DONE:
            return iter(self.value)
        if not CONFIG.APP.CONTROL_FLOW_HANDLING:
            raise _C.InterventionError(
                "a proxy cannot be iterated while the trace is being recorded: index it (`proxy[0]`), "
                "or iterate over the saved value after the trace (`for x in proxy:` in a session records a "
                "loop when CONFIG.APP.CONTROL_FLOW_HANDLING is on)"
            )
        from .control import loop

        return loop(self, sys._getframe(1))

    def __len__(self):
        if self._graph.state == DONE:
            return len(self.value)
        raise _C.InterventionError(
            "len() of a proxy is not known while the trace is being recorded: use `nnsight.apply(len, proxy)`, "
            "or `proxy.shape[0]`"
        )

    def __contains__(self, item):
        if self._graph.state == DONE:
            return item in self.value
        raise _C.InterventionError(
            "`x in proxy` is not known while the trace is being recorded: use `nnsight.apply(operator.contains, "
            "proxy, x)`, or test the saved value after the trace"
        )

    def _known(self, what, instead):
        """The value (after the trace), for a protocol that needs it now."""
        if self._graph.state == DONE:
            return self.value
        raise _C.InterventionError(
            f"{what} is not known while the trace is being recorded (the value is computed when the model "
            f"runs): {instead}, or use the saved value after the trace"
        )

    def __int__(self):
        return int(self._known("int() of a proxy", "use `nnsight.int(proxy)`"))

    def __float__(self):
        return float(self._known("float() of a proxy", "use `nnsight.float(proxy)`"))

    def __complex__(self):
        return complex(self._known("complex() of a proxy", "use `nnsight.complex(proxy)`"))

    def __index__(self):
        return operator.index(self._known("A proxy used as a Python index", "index a proxy with it inside the trace"))

    def __format__(self, spec):
        if self._graph.state == DONE:
            return format(self.value, spec)
        if not spec:
            return str(self)
        raise _C.InterventionError(
            f"a proxy cannot be formatted with '{spec}' while the trace is being recorded: use "
            "`nnsight.apply(format, proxy, spec)`, or format the saved value after the trace"
        )

    def __array__(self, *args, **kwargs):
        import numpy

        value = self._known("numpy.asarray() of a proxy", "use `nnsight.apply(numpy.asarray, proxy)`")
        return numpy.asarray(value, *args, **kwargs)

    def __copy__(self):
        return copy.copy(self._copyable())

    def __deepcopy__(self, memo):
        return copy.deepcopy(self._copyable(), memo)

    def __reduce_ex__(self, protocol):
        # pickle (torch.save of a dict of saved proxies): the value's own reduction, so the
        # file holds the value (a tensor loads with torch.load's weights_only default).
        value = self._copyable()
        reducer = copyreg.dispatch_table.get(type(value))
        reduced = reducer(value) if reducer is not None else value.__reduce_ex__(max(protocol, 2))
        if type(reduced) is tuple and getattr(reduced[0], "__name__", "") in ("__newobj__", "__newobj_ex__"):
            # pickle checks that a __newobj__ reduction makes the pickled object's class
            # (here the proxy's): the same construction through `cls.__new__` instead.
            if reduced[0].__name__ == "__newobj__":
                cls, *args = reduced[1]
                make = cls.__new__
            else:
                cls, args, kwargs = reduced[1]
                make, args = functools.partial(cls.__new__, cls, *args, **kwargs), ()
                cls = None
            reduced = (make, (cls, *args) if cls is not None else tuple(args), *reduced[2:])
        elif type(reduced) is str:  # a global (a function, a class): pickled by name, in a list
            reduced = (operator.itemgetter(0), ([value],))
        return reduced

    def _copyable(self):
        if self._graph.state == DONE:
            return self.value
        # copy / deepcopy / pickle while recording: a proxy stands for a value that
        # exists only once the trace runs.
        raise TypeError(
            "a proxy cannot be copied or pickled: inside the trace, record a copy with `proxy.clone()`; "
            "after it, copy the saved value (`proxy.value`)"
        )

    __hash__ = object.__hash__

    def __repr__(self):
        g = self._graph
        if g.state == DONE:
            return repr(self.value)  # an unset value raises, as in nnsight
        state = "recording" if g.state == RECORDING else "running"
        return f"<fastinterleave.Proxy node {self._node} ({state})>"

    def __str__(self):
        if self._graph.state == DONE:
            return str(self.value)
        return repr(self)


_GRAD = Proxy.grad

_TENSOR_GETITEM = __import__("torch").Tensor.__getitem__
_TENSOR_SETITEM = __import__("torch").Tensor.__setitem__


def _binary(aten, fn):
    def method(self, other):
        return self._graph.add(CALL, aten, (self, other), fn=fn)

    return method


def _reflected(aten, fn, swap):
    """`other OP self`: recorded as aten(self, other) for commutative / r-ops, else aten(other, self)."""
    flipped = _flip(fn)
    if swap:

        def method(self, other):
            return self._graph.add(CALL, aten, (other, self), fn=fn)

    else:

        def method(self, other):
            return self._graph.add(CALL, aten, (self, other), fn=flipped)

    return method


def _unary(aten, fn):
    def method(self):
        return self._graph.add(CALL, aten, (self,), fn=fn)

    return method


for _name, _fn in [
    ("add", operator.add), ("sub", operator.sub), ("mul", operator.mul), ("truediv", operator.truediv),
    ("floordiv", operator.floordiv), ("mod", operator.mod), ("pow", operator.pow), ("matmul", operator.matmul),
    ("and", operator.and_), ("or", operator.or_), ("xor", operator.xor), ("lshift", operator.lshift),
    ("rshift", operator.rshift), ("lt", operator.lt), ("le", operator.le), ("gt", operator.gt),
    ("ge", operator.ge), ("eq", operator.eq), ("ne", operator.ne),
]:
    setattr(Proxy, f"__{_name}__", _binary(_DUNDER_ATEN[_name], _fn))

# Reflected operators. Commutative ones keep the proxy first so the ATen
# overload with a Tensor `self` applies; `rsub` has its own ATen op.
for _name, _aten, _fn, _swap in [
    ("radd", "add", operator.add, False), ("rmul", "mul", operator.mul, False),
    ("rand", "bitwise_and", operator.and_, False), ("ror", "bitwise_or", operator.or_, False),
    ("rxor", "bitwise_xor", operator.xor, False), ("rsub", "rsub", operator.sub, False),
    ("rpow", "pow", operator.pow, True), ("rmatmul", "matmul", operator.matmul, True),
    ("rtruediv", "fastinterleave::rtruediv", operator.truediv, False), ("rfloordiv", "", operator.floordiv, True),
    ("rmod", "", operator.mod, True),
]:
    setattr(Proxy, f"__{_name}__", _reflected(_aten, _fn, _swap))

for _name, _fn in [("neg", operator.neg), ("pos", operator.pos), ("abs", operator.abs), ("invert", operator.invert)]:
    setattr(Proxy, f"__{_name}__", _unary(_DUNDER_ATEN[_name], _fn))

# The engine's argument converter turns proxies into references to their nodes.
_C.set_proxy_type(Proxy)

if not hasattr(torch.Tensor, "save"):

    def _save_tensor(self):
        """A real tensor (made inside a trace or session, e.g. a ``torch.nn.Parameter``)
        is its own value: ``.save()`` returns it (fastinterleave; nnsight 0.4 proxies it)."""
        return self

    torch.Tensor.save = _save_tensor
