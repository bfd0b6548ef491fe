"""Shared fixtures: devices and small models built in code (nothing is downloaded)."""

import os
from collections import OrderedDict

import pytest
import torch


NO_FALLBACK = os.environ.get("FASTINTERLEAVE_NO_FALLBACK") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "python_fallback: the test runs Python code inside the trace (nnsight.apply, module calls, "
        "Python objects), so it needs the engine's Python fallback",
    )


@pytest.fixture(autouse=True)
def _engine_fallback():
    """FASTINTERLEAVE_NO_FALLBACK=1 runs every test with the Python fallback off:
    what passes then ran entirely in the C++ engine."""
    import fastinterleave

    before = fastinterleave.CONFIG.engine.python_fallback
    if NO_FALLBACK:
        fastinterleave.CONFIG.engine.python_fallback = False
    yield
    fastinterleave.CONFIG.engine.python_fallback = before


def devices():
    """CPU, plus CUDA when present (FASTINTERLEAVE_TEST_DEVICE=cuda forces it alone)."""
    forced = os.environ.get("FASTINTERLEAVE_TEST_DEVICE")
    if forced:
        return [forced]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=devices())
def device(request):
    return torch.device(request.param)


def make_tiny(device="cpu", seed=0):
    """``Sequential(layer1=Linear(5, 10), layer2=Linear(10, 2))``, nnsight's tiny test model."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        OrderedDict(layer1=torch.nn.Linear(5, 10), layer2=torch.nn.Linear(10, 2))
    )
    return net.to(device).eval()


def make_gpt2(n_layer=2, n_embd=32, n_head=2, vocab_size=100, device="cpu", seed=0):
    """A GPT-2-shaped LM with random weights (transformers.GPT2Config)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, n_positions=64,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).to(device).eval()


class Loop(torch.nn.Module):
    """Applies `lin` three times, then `out`: calls of one module in one forward pass."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, 1)

    def forward(self, x):
        for _ in range(3):
            x = self.lin(x)
        return self.out(x)


def make_loop(seed=0):
    torch.manual_seed(seed)
    return Loop().eval()


def loop_with(net, x, edit):
    """net(x) (a Loop) with edit(call, input, output) done in a plain forward hook on `lin`."""
    calls = []

    def hook(module, args, output):
        edit(len(calls), args[0], output)
        calls.append(1)

    handle = net.lin.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return net(x)
    finally:
        handle.remove()


@pytest.fixture
def net():
    """The tiny MLP on the CPU."""
    return make_tiny()


@pytest.fixture
def model(net):
    import fastinterleave

    return fastinterleave.NNsight(net)


@pytest.fixture
def tiny(device):
    return make_tiny(device)


@pytest.fixture
def gpt2(device):
    return make_gpt2(device=device)


@pytest.fixture
def x(device):
    torch.manual_seed(1)
    return torch.rand(1, 5, device=device)


class Hooks:
    """Plain PyTorch hooks, registered by hand: the reference every test compares to."""

    def __init__(self):
        self.handles = []

    def output(self, module, fn):
        """fn(output) -> new output or None."""
        self.handles.append(module.register_forward_hook(lambda m, a, o: fn(o)))

    def pre(self, module, fn):
        """fn(args) -> new args or None."""
        self.handles.append(module.register_forward_pre_hook(lambda m, a: fn(a)))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@pytest.fixture
def hooks():
    with Hooks() as h:
        yield h


def assert_hooks_idle(*roots):
    """No hook is left on the modules of `roots` but fastinterleave's own, and none of
    those is attached to a run. (The hooks of the last trace's sites stay installed
    between traces; idle, they return at once and change nothing.)"""
    from fastinterleave import _C

    for root in roots:
        for name, module in root.named_modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for hook in hooks.values():
                    assert isinstance(hook, _C.SiteHook), (name, hook)
                    assert not hook.attached, name
            assert not module._backward_hooks, name
            assert not getattr(module, "_backward_pre_hooks", {}), name


def assert_no_hooks(*roots):
    """No hook of any kind on any module of `roots`."""
    for root in roots:
        for name, module in root.named_modules():
            assert not module._forward_hooks, name
            assert not module._forward_pre_hooks, name
            assert not module._backward_hooks, name
