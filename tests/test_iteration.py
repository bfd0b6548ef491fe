"""Iteration: a module called several times in one forward pass; call k is
what .next() / .iter[k] read (generation step k is call k). Values compared
with plain hooks recording every call."""

import pytest
import torch

import fastinterleave as nnsight
from fastinterleave import InterventionError

from conftest import make_loop


@pytest.fixture
def net():
    return make_loop()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(2, 4)


def calls_of(module, run):
    """Every output of `module` while `run()` executes (plain hook)."""
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_next_reads_the_following_calls(net, x):
    ref = calls_of(net.lin, lambda: net(x))
    model = nnsight.NNsight(net)
    with model.trace(x):
        a0 = model.lin.output.save()
        a1 = model.lin.next().output.save()
        a2 = model.lin.next().output.save()
    for got, want in zip((a0, a1, a2), ref):
        torch.testing.assert_close(got, want)


def test_iter_index_is_a_one_off(net, x):
    ref = calls_of(net.lin, lambda: net(x))
    model = nnsight.NNsight(net)
    with model.trace(x):
        two = model.lin.iter[2].output.save()
        zero = model.lin.output.save()  # back to call 0
    torch.testing.assert_close(two, ref[2])
    torch.testing.assert_close(zero, ref[0])


def test_all_collects_every_call(net, x):
    ref = calls_of(net.lin, lambda: net(x))
    model = nnsight.NNsight(net)
    with model.trace(x):
        outs = nnsight.list().save()
        with model.lin.all():
            outs.append(model.lin.output.clone())
    assert len(outs) == 3
    for got, want in zip(outs, ref):
        torch.testing.assert_close(got, want)


def test_iter_list_and_slice(net, x):
    ref = calls_of(net.lin, lambda: net(x))
    model = nnsight.NNsight(net)
    with model.trace(x):
        # Containers first: as in nnsight 0.4.11, a node recorded after a
        # repeating access belongs to its body and is rebuilt at each call.
        picked = nnsight.list().save()
        ranged = nnsight.list().save()
        with model.lin.iter[[0, 2]]:
            picked.append(model.lin.output.sum())
        with model.lin.iter[1:3]:
            ranged.append(model.lin.output.sum())
    torch.testing.assert_close(torch.stack(picked), torch.stack([ref[0].sum(), ref[2].sum()]))
    torch.testing.assert_close(torch.stack(ranged), torch.stack([ref[1].sum(), ref[2].sum()]))


def test_edit_at_every_call(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        with model.lin.all():
            model.lin.output[:, 0] = 0
        out = model.output.save()

    def zero_first(m, a, o):
        o = o.clone()
        o[:, 0] = 0
        return o

    handle = net.lin.register_forward_hook(zero_first)
    try:
        want = net(x)
    finally:
        handle.remove()
    torch.testing.assert_close(out, want)


def test_swap_at_one_call(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.lin.iter[1].output = model.lin.iter[1].output * 0
        out = model.output.save()
    with torch.no_grad():
        h = net.lin(x)
        h = net.lin(h) * 0
        want = net.out(net.lin(h))
    torch.testing.assert_close(out, want)


def test_a_value_read_under_all_lives_until_the_last_call(net, x):
    ref = calls_of(net.lin, lambda: net(x))
    model = nnsight.NNsight(net)
    with model.trace(x):
        scale = model.lin.weight[0] * 0 + 2  # a node made before the loop, read at every call
        sums = nnsight.list().save()
        with model.lin.all():
            sums.append((model.lin.output * scale).sum())
    torch.testing.assert_close(torch.stack(sums), torch.stack([(r * 2).sum() for r in ref]))


def test_a_call_that_never_happens_is_an_error(net, x):
    model = nnsight.NNsight(net)
    with pytest.raises(InterventionError, match="called only 3 times"):
        with model.trace(x):
            model.lin.iter[5].output.save()
    with pytest.raises(InterventionError, match="at call 3"):
        with model.trace(x):
            with model.lin.iter[1:4]:
                model.lin.output.save()


def test_next_on_the_root_advances_every_module(net, x):
    ref = calls_of(net.lin, lambda: net(x))
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.next()
        second = model.lin.output.save()
    torch.testing.assert_close(second, ref[1])


def test_iteration_resets_per_invoke(net, x):
    ref = calls_of(net.lin, lambda: net(x))
    model = nnsight.NNsight(net)
    with model.trace() as tracer:
        with tracer.invoke(x):
            a = model.lin.next().output.save()
        with tracer.invoke(x):
            b = model.lin.output.save()
    torch.testing.assert_close(a, ref[1])
    torch.testing.assert_close(b, ref[0])
