"""pytest plugin for the runs of nnsight's tests (copied there as _nnsight_suite_capture.py).

Frame injection: nnsight's default backend replaces, after a trace, the caller's local
variables that hold saved proxies by their values; the tests' custom backend
(AssertSavedLenBackend, removed by the rewrites) does not, and the tests that pass it read
`proxy.value` afterwards. So while a test that passed it runs (NNSIGHT_SUITE_NO_INJECTION:
a file listing them, one "module::test" a line), CONFIG.APP.FRAME_INJECTION is False in the
implementation under test, as that backend made it.

Randomness: the torch RNG is seeded before each test's setup and before its body, so the
random inputs, layers and weights a test makes (`torch.rand`, `torch.nn.Linear(768, 768)`)
are the same in both runs.

Saved values: while each test runs, every ``proxy.save()`` of the implementation under test
(NNSIGHT_SUITE_IMPL: "nnsight" or "fastinterleave") is recorded; after the test, each
recorded proxy's ``.value`` (or the exception reading it raises) is written, as plain
tensors / lists / dicts, to NNSIGHT_SUITE_VALUES/<module>__<test>.pt. The test's code is
not touched: ``save`` is wrapped, it still does what it did.
"""

import os
from pathlib import Path

import pytest

IMPL = os.environ.get("NNSIGHT_SUITE_IMPL", "nnsight")
OUT = Path(os.environ.get("NNSIGHT_SUITE_VALUES", "values"))
NO_INJECTION = os.environ.get("NNSIGHT_SUITE_NO_INJECTION")


def _impl():
    if IMPL == "fastinterleave":
        import fastinterleave as impl
    else:
        import nnsight as impl
    return impl


def _key(item):
    return f"{Path(item.nodeid.split('::')[0]).stem}::{item.name.split('[')[0]}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    names = set(Path(NO_INJECTION).read_text().split()) if NO_INJECTION else set()
    app = _impl().CONFIG.APP
    before = app.FRAME_INJECTION
    if _key(item) in names:
        app.FRAME_INJECTION = False
    try:
        yield
    finally:
        app.FRAME_INJECTION = before


def _proxy_class():
    if IMPL == "fastinterleave":
        from fastinterleave import Proxy
    else:
        from nnsight.tracing.graph.proxy import Proxy
    return Proxy


def _plain(value, depth=0):
    import torch

    if depth > 8:
        return f"<{type(value).__name__}>"
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, (bool, int, float, complex, str, bytes, type(None))):
        return value
    if isinstance(value, dict):  # a transformers ModelOutput too
        return {k: _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return f"<{type(value).__name__}>"


def _read(proxy):
    try:
        return _plain(proxy.value)
    except Exception as exc:  # unset (a stop, a branch not taken): what reading it raises
        return f"<unset: {type(exc).__name__}>"


def pytest_runtest_setup(item):
    import torch

    torch.manual_seed(0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    import torch

    torch.manual_seed(1)
    proxy = _proxy_class()
    original = proxy.save
    saved = []

    def save(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        saved.append(result)
        return result

    proxy.save = save
    try:
        yield
    finally:
        proxy.save = original
        OUT.mkdir(parents=True, exist_ok=True)
        torch.save([_read(p) for p in saved], OUT / f"{_key(item).replace('::', '__')}.pt")
