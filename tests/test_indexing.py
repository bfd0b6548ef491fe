"""Indexing a module's value inside a trace gives what Python indexing gives: reads
(``h[idx]``) and writes (``h[idx] = v``) over basic indices (ints, slices, None,
Ellipsis, run by the engine as views) and advanced ones, checked against the same
indexing done in a plain forward hook."""

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight


class Cube(torch.nn.Module):
    def forward(self, x):
        return x.reshape(2, 3, 4) * 1.0


def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 24), Cube())


INDICES = [
    0, -1, 1, slice(None), slice(1, None), slice(None, -1), slice(0, 3, 2), slice(-2, None), slice(5, 9),
    (0, 1), (-1, -2, -3), (slice(None), 1), (Ellipsis, 2), (0, Ellipsis), (None, 0), (slice(None), None, 1),
    (0, slice(1, 3), slice(None, None, 3)), (Ellipsis,), (), (None,), (1, Ellipsis, None),
    # advanced: the general path
    [0, 1], (slice(None), [2, 0]), torch.tensor([1, 0]), (0, torch.tensor([True, False, True])), True,
]


def hand(net, x, edit):
    out = {}

    def hook(m, a, o):
        out["v"] = edit(o)

    h = net[1].register_forward_hook(hook)
    try:
        final = net(x)
    finally:
        h.remove()
    return out["v"], final


@pytest.mark.parametrize("idx", INDICES, ids=repr)
def test_read(idx):
    net = make()
    x = torch.rand(1, 24)
    model = nnsight.NNsight(net)
    with model.trace(x):
        got = model[1].output[idx].save()
    want, _ = hand(net, x, lambda o: o[idx].clone())
    assert_close(got, want)


@pytest.mark.parametrize("value", [0, 2.5, torch.tensor(-3.0), "row", "row with a leading 1"], ids=repr)
@pytest.mark.parametrize("idx", INDICES, ids=repr)
def test_write(idx, value):
    net = make()
    x = torch.rand(1, 24)
    model = nnsight.NNsight(net)

    def shaped(target):  # a tensor shaped like the target (with an extra leading 1)
        v = torch.arange(target.numel(), dtype=target.dtype).reshape(target.shape)
        return v[None] if value.endswith("1") else v

    def edit(o):
        o[idx] = shaped(o[idx]) if isinstance(value, str) else value
        return o.clone()

    want, want_final = hand(net, x, edit)
    v = shaped(want[idx]) if isinstance(value, str) else value
    with model.trace(x):
        model[1].output[idx] = v
        got = model[1].output.save()
        final = model.output.save()
    assert_close(got, want)
    assert_close(final, want_final)


@pytest.mark.parametrize("idx", [3, -4, (0, 3), (0, 0, 4), (0, 0, 0, 0)], ids=repr)
def test_out_of_range_is_an_index_error_like_python(idx):
    net = make()
    x = torch.rand(1, 24)
    with pytest.raises(IndexError):
        hand(net, x, lambda o: o[idx])
    model = nnsight.NNsight(net)
    with pytest.raises(IndexError):
        with model.trace(x):
            model[1].output[idx].save()
    with pytest.raises(IndexError):
        with model.trace(x):
            model[1].output[idx] = 0


def test_a_write_through_a_view_keeps_gradients_right():
    net = make()
    x = torch.rand(1, 24)
    model = nnsight.NNsight(net)
    with model.trace(x):
        model[1].output[:, 1, ::2] = 0
        model.output.sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()

    def edit(o):
        o[:, 1, ::2] = 0
        return o

    _, final = hand(net, x, edit)
    final.sum().backward()
    for g, p in zip(grads, net.parameters()):
        assert_close(g, p.grad)
