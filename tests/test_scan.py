"""scan / validate (shapes while recording, on fake tensors), tensor factories
taking proxies, @nnsight.trace, and the names users import."""

import pytest
import torch

import fastinterleave as nnsight
from fastinterleave import InterventionError

from conftest import make_gpt2, make_tiny


@pytest.fixture
def net():
    return make_tiny()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(3, 5)


def test_scan_gives_real_shapes_while_recording(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x, scan=True):
        shape = model.layer1.output.shape
        reduced = model.layer1.output.sum(1).shape
        in_shape = model.layer2.input.shape
        dtype = model.layer2.output.dtype
        out = model.output.save()
    assert shape == torch.Size([3, 10]) and type(shape) is torch.Size
    assert reduced == torch.Size([3]) and in_shape == torch.Size([3, 10])
    assert dtype == torch.float32
    torch.testing.assert_close(out, net(x))


def test_without_scan_shape_is_a_proxy(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        shape = model.layer1.output.shape
        assert isinstance(shape, nnsight.Proxy)
        saved = shape.save()
    assert tuple(saved) == (3, 10)


def test_scan_per_invoke(net):
    model = nnsight.NNsight(net)
    with model.trace(scan=True) as tracer:
        with tracer.invoke(torch.rand(1, 5)):
            one = model.layer1.output.shape
        with tracer.invoke(torch.rand(4, 5)):
            four = model.layer1.output.shape
    assert one[0] == 1 and four[0] == 4


def test_validate_raises_at_the_users_line(net, x):
    model = nnsight.NNsight(net)
    ran = []
    handle = net.layer1.register_forward_hook(lambda m, a, o: ran.append(type(o).__name__))
    try:
        with pytest.raises(IndexError, match="out of bounds") as err:
            with model.trace(x, validate=True):
                model.layer1.output[:, 100].save()
    finally:
        handle.remove()
    assert ran == ["FakeTensor"]  # raised while recording: the model ran on fake tensors only
    assert any("model.layer1.output[:, 100]" in str(f.statement) for f in err.traceback)


def test_model_scan_runs_nothing(net, x):
    model = nnsight.NNsight(net)
    ran = []
    handle = net.layer1.register_forward_hook(lambda m, a, o: ran.append(type(o).__name__))
    try:
        with model.scan(x):
            shape = model.layer2.output.shape
    finally:
        handle.remove()
    assert shape == torch.Size([3, 2]) and ran == ["FakeTensor"]


def test_scan_on_gpt2():
    gpt = make_gpt2()
    model = nnsight.NNsight(gpt)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with model.trace(ids, scan=True):
        hidden = model.transformer.h[0].output[0].shape
        logits = model.lm_head.output.shape
    assert hidden == torch.Size([2, 7, 32]) and logits == torch.Size([2, 7, 100])


def test_tensor_factories_take_proxies(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        zeros = torch.zeros(model.layer1.output.shape).save()
        ones = torch.ones(model.layer1.output.shape[0], 4).save()
        model.layer1.output = torch.full(model.layer1.output.shape, 0.5)
        out = model.output.save()
    assert torch.equal(zeros, torch.zeros(3, 10)) and torch.equal(ones, torch.ones(3, 4))
    torch.testing.assert_close(out, net.layer2(torch.full((3, 10), 0.5)))
    assert torch.zeros.__module__ != __name__  # the real factory again after the trace
    assert isinstance(torch.zeros(2), torch.Tensor)


def test_trace_decorator(net, x):
    @nnsight.trace
    def top2(t):
        return t.topk(2, dim=-1).values

    model = nnsight.NNsight(net)
    with model.trace(x):
        best = top2(model.layer1.output).save()
    torch.testing.assert_close(best, net.layer1(x).topk(2, dim=-1).values)


def test_names_users_import():
    for name in ("NNsight", "LanguageModel", "Envoy", "apply", "log", "cond", "iter", "stop", "list",
                 "dict", "int", "float", "str", "bool", "tuple", "set", "CONFIG", "trace"):
        assert hasattr(nnsight, name), name


def test_iter_inside_a_trace_is_a_clear_error(net, x):
    model = nnsight.NNsight(net)
    with pytest.raises(InterventionError, match="inside one trace is not supported"):
        with model.trace(x):
            nnsight.iter([1, 2])
