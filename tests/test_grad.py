"""Gradients: proxy.grad inside a trace with the backward pass recorded in it.
References are plain autograd with retain_grad() / tensor hooks."""

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


def reference_grad(net, x, weight=None):
    h = net.layer1(x)
    h.retain_grad()
    out = net.layer2(h)
    (out if weight is None else out * weight).sum().backward()
    net.zero_grad()
    return h.grad


def test_read_a_gradient(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        g = model.layer1.output.grad.save()
        model.output.sum().backward()
    torch.testing.assert_close(g, reference_grad(net, x))


def test_gradient_of_an_input(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        g = model.layer2.input.grad.save()
        model.output.sum().backward()
    torch.testing.assert_close(g, reference_grad(net, x))


def test_edit_a_gradient_in_place_and_by_swap(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.layer1.output.grad[:] = 0
        model.output.sum().backward()
    assert net.layer1.weight.grad is not None
    assert torch.count_nonzero(net.layer1.weight.grad) == 0
    net.zero_grad()

    with model.trace(x):
        h = model.layer1.output
        h.grad = h.grad * 2
        model.output.sum().backward()
    doubled = net.layer1.weight.grad.clone()
    net.zero_grad()
    handle = net.layer1.register_forward_hook(lambda m, a, o: o.register_hook(lambda g: g * 2) and None)
    try:
        net(x).sum().backward()
    finally:
        handle.remove()
    torch.testing.assert_close(doubled, net.layer1.weight.grad)
    net.zero_grad()


def test_values_computed_from_a_gradient(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        norm = (model.layer1.output.grad ** 2).sum().sqrt().save()
        model.output.sum().backward()
    torch.testing.assert_close(norm, reference_grad(net, x).norm())


def test_several_backward_passes(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        h = model.layer1.output
        first = h.grad.save()
        model.output.sum().backward(retain_graph=True)
        second = h.grad.save()
        (model.output.sum() * 3).backward()
    ref = reference_grad(net, x)
    torch.testing.assert_close(first, ref)
    torch.testing.assert_close(second, ref * 3)


def test_each_invoke_gets_its_rows_of_the_gradient(net, x):
    model = nnsight.NNsight(net)
    weight = torch.tensor([[1.0, -2.0]])
    with model.trace() as tracer:
        with tracer.invoke(x[:1]):
            g0 = model.layer1.output.grad.save()
            out0 = model.output
        with tracer.invoke(x[1:]):
            g1 = model.layer1.output.grad.save()
            ((out0 * weight).sum() + model.output.sum()).backward()
    h = net.layer1(x)
    h.retain_grad()
    out = net.layer2(h)
    ((out[:1] * weight).sum() + out[1:].sum()).backward()
    torch.testing.assert_close(g0, h.grad[:1])
    torch.testing.assert_close(g1, h.grad[1:])
    net.zero_grad()


def test_retain_grad(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        h = model.layer1.output.save()
        h.retain_grad()
        model.output.sum().backward()
    # After the trace, h is the tensor itself: its .grad attribute was retained.
    torch.testing.assert_close(h.grad, reference_grad(net, x))


def test_gradient_of_a_value_without_grad_is_an_error(net, x):
    model = nnsight.NNsight(net)
    with pytest.raises(InterventionError, match="does not require grad"):
        with torch.no_grad():
            with model.trace(x):
                model.layer1.output.grad.save()
                model.output.sum().backward()


def test_gpt2_attention_gradient():
    gpt = make_gpt2()
    model = nnsight.NNsight(gpt)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with model.trace(ids):
        g = model.transformer.h[1].mlp.output.grad.save()
        model.output.logits[:, -1].logsumexp(-1).sum().backward()
    seen = {}

    def keep(m, a, o):
        o.retain_grad()
        seen["o"] = o

    handle = gpt.transformer.h[1].mlp.register_forward_hook(keep)
    try:
        gpt(ids).logits[:, -1].logsumexp(-1).sum().backward()
    finally:
        handle.remove()
    torch.testing.assert_close(g, seen["o"].grad)
    gpt.zero_grad()


def test_no_hooks_left_after_a_gradient_trace(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        h = model.layer1.output
        h.grad.save()
        kept = h.save()
        model.output.sum().backward()
    assert not kept._backward_hooks
