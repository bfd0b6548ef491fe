"""Module-level helpers of nnsight 0.4: ``nnsight.apply``, ``nnsight.list()``, ..."""

import builtins
import functools

from . import _C


def _tracer():
    from .tracer import current_tracer

    tracer = current_tracer()
    if tracer is None:
        raise _C.InterventionError("this helper can only be used inside a `with model.trace(...)` block")
    return tracer


def apply(fn, *args, **kwargs):
    """Records ``fn(*args, **kwargs)`` in the open trace (run with the model)."""
    return _tracer().apply(fn, *args, **kwargs)


def log(*args):
    """Prints the values when the model runs."""
    _tracer().log(*args)


def cond(condition):
    """``with nnsight.cond(x > 0):`` — a branch of the open trace (see Tracer.cond)."""
    return _tracer().cond(condition)


def stop():
    """Ends the forward pass of the open trace here."""
    _tracer().stop()


def trace(fn):
    """Decorator: calls of `fn` inside a trace record one node (run with the
    model) instead of tracing its body."""

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        return apply(fn, *args, **kwargs)

    return inner


class _Local:
    """``with nnsight.local():`` — nnsight 0.4 runs the block on this machine when the
    rest runs on a remote service. Everything runs locally here, so the block records
    into the open trace or session as any other code; ``apply`` / ``log`` / ``cond`` /
    ``iter`` / ``stop`` are those of the open trace or session."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return False

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_tracer(), name)


def local(fn=None):
    """nnsight 0.4's ``nnsight.local``: code to run on this machine rather than on a
    remote service. Everything runs locally here: ``with nnsight.local():`` records its
    block as usual, and ``nnsight.local(fn)`` (or ``@nnsight.local``) makes `fn` one
    recorded step, like ``nnsight.trace(fn)``."""
    if fn is None:
        return _Local()
    if not callable(fn):
        raise TypeError(f"nnsight.local() takes a function (or nothing, as a `with` block), not {type(fn).__name__}")
    return trace(fn)


def iter(collection):
    """``with nnsight.iter(items) as item:`` — a loop over session steps (see
    Session.iter). Loops inside one trace are not supported: use a session."""
    tracer = _tracer()
    if not hasattr(tracer, "iter"):
        raise _C.InterventionError(
            "nnsight.iter loops over the steps of a session (`with model.session() as session:`); "
            "a loop inside one trace is not supported"
        )
    return tracer.iter(collection)


def _container(kind):
    def make(*args, **kwargs):
        return apply(kind, *args, **kwargs)

    make.__name__ = kind.__name__
    make.__doc__ = f"A traced ``{kind.__name__}(...)``: built when the model runs (e.g. `.save()` it and append proxies)."
    return make


list = _container(builtins.list)
dict = _container(builtins.dict)
tuple = _container(builtins.tuple)
set = _container(builtins.set)
int = _container(builtins.int)
float = _container(builtins.float)
str = _container(builtins.str)
bool = _container(builtins.bool)
bytes = _container(builtins.bytes)
complex = _container(builtins.complex)
bytearray = _container(builtins.bytearray)
