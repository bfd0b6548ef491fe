"""The engine's module hooks on a wrapped model, kept installed between traces.

A trace needs a forward (or forward-pre) hook on each module it reads or edits.
Registering and removing them for every trace costs more than a small model's
forward, so the hooks of the last trace's sites stay installed: idle (they
return at once and change nothing) until the next run attaches to them. A trace
with other sites removes the hooks it does not need. They all go when the
wrapper is garbage collected, or with ``model.remove_hooks()``.
"""

import threading
import weakref

from . import _C
from .graph import OUTPUT


class ModelHooks:
    """The installed hooks of one wrapped model: ``(path, kind) -> (module, SiteHook, handle)``."""

    __slots__ = ("_installed", "_sites", "_hooks", "busy", "_lock", "_finalizer", "__weakref__")

    def __init__(self, owner):
        self._installed = {}
        self._sites = None  # the sites of the last run, in plan order
        self._hooks = []  # their hooks, in the same order
        self.busy = False  # a run uses the hooks (acquire() sets it; the caller clears it after the run)
        self._lock = threading.Lock()  # two threads' traces: one takes the installed hooks
        # Removed with the wrapper (`owner` is shared by its edit copies).
        self._finalizer = weakref.finalize(owner, _remove_all, self._installed)

    def acquire(self, sites, module_at):
        """``(hooks, remove)``: the hooks on `sites` ([(path, kind)], one per site, in
        order) for one run. Usually the installed ones (missing ones installed, those
        of other sites removed), with `remove` None: `busy` is then set, and the
        caller clears it once the run is over (a plain store, not a call: the hot
        path). While busy, hooks of the run's own, and `remove` to call after it."""
        with self._lock:
            if not self.busy:
                if sites != self._sites:
                    self._install(sites, module_at)
                self.busy = True
                return self._hooks, None
        # The model is already running a trace (called again from inside one, or from
        # another thread: each run's hooks act on its own thread's calls only): this
        # run gets hooks of its own, removed after it.
        return _temporary(sites, module_at)

    def _install(self, sites, module_at):
        installed = self._installed
        self._sites = None  # until done: a failure below leaves nothing half-known
        wanted = set(sites)
        for key in [k for k in installed if k not in wanted]:
            installed.pop(key)[2].remove()
        for path, kind in sites:
            module = module_at(path)
            entry = installed.get((path, kind))
            if entry is not None:
                if entry[0] is module:
                    continue
                entry[2].remove()  # the module at this path was replaced
            installed[(path, kind)] = (module, *_register(module, kind))
        self._hooks = [installed[key][1] for key in sites]
        self._sites = list(sites)

    def drop_idle(self):
        """For a trace without sites: removes the idle hooks, as a trace with other
        sites would (none while a run is attached to them)."""
        if self._installed and not self.busy:
            self.remove()

    def remove(self):
        """Removes every hook (the next trace installs those it needs)."""
        _remove_all(self._installed)
        self._sites = None
        self._hooks = []


def _register(module, kind):
    hook = _C.SiteHook(kind == OUTPUT)
    if kind == OUTPUT:
        handle = module.register_forward_hook(hook, prepend=True)
    else:
        handle = module.register_forward_pre_hook(hook, prepend=True, with_kwargs=True)
    return hook, handle


def _temporary(sites, module_at):
    pairs = [_register(module_at(path), kind) for path, kind in sites]

    def remove():
        for _, handle in pairs:
            handle.remove()

    return [hook for hook, _ in pairs], remove


def _remove_all(installed):
    for _, _, handle in installed.values():
        handle.remove()
    installed.clear()
