"""Branches: tracer.cond(...) / .else_() decide at run time which
interventions run. References: plain torch doing the chosen branch by hand."""

import pytest
import torch

import fastinterleave as nnsight

from conftest import make_tiny


@pytest.fixture
def net():
    return make_tiny()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(1, 5)


def run_branches(model, x, sign):
    with model.trace(x) as tracer:
        total = model.layer1.output.sum() * sign
        with tracer.cond(total > 0) as branch:
            model.layer1.output[:] = 1
            taken_if = (model.layer1.output * 1).save()
        with branch.else_():
            model.layer1.output[:] = 2
            taken_else = (model.layer1.output * 1).save()
        out = model.output.save()
    return taken_if, taken_else, out


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_if_else_takes_one_branch(net, x, sign):
    model = nnsight.NNsight(net)
    taken_if, taken_else, out = run_branches(model, x, sign)
    positive = (net.layer1(x).sum() * sign).item() > 0
    fill = 1.0 if positive else 2.0
    torch.testing.assert_close(out, net.layer2(torch.full((1, 10), fill)))
    taken, not_taken = (taken_if, taken_else) if positive else (taken_else, taken_if)
    torch.testing.assert_close(taken, torch.full((1, 10), fill))
    with pytest.raises(ValueError, match="never set"):
        not_taken.value


def test_elif_chain(net, x):
    model = nnsight.NNsight(net)
    h = net.layer1(x)
    with model.trace(x) as tracer:
        m = model.layer1.output.max()
        with tracer.cond(m > 100) as first:
            a = nnsight.apply(lambda: "a").save()
        with first.else_(m > -100) as second:
            b = (model.layer1.output * 0 + 7).save()
        with second.else_():
            c = (model.layer1.output * 0).save()
    assert h.max() <= 100
    torch.testing.assert_close(b, torch.full_like(h, 7.0))
    for unset in (a, c):
        with pytest.raises(ValueError):
            unset.value


def test_nested_branches(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x) as tracer:
        h = model.layer1.output
        with tracer.cond(h.sum() < 1000):
            outer = (h * 2).save()
            with tracer.cond(h.sum() > 1000):
                inner = (h * 3).save()
            after_inner = (h * 4).save()
    ref = net.layer1(x)
    torch.testing.assert_close(outer, ref * 2)
    torch.testing.assert_close(after_inner, ref * 4)
    with pytest.raises(ValueError):
        inner.value


def test_a_value_from_a_branch_not_taken_stays_unset_downstream(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x) as tracer:
        with tracer.cond(model.layer1.output.sum() > 1000):
            v = model.layer1.output * 2
        downstream = (v + 1).save()
        unrelated = model.layer2.output.save()
    with pytest.raises(ValueError):
        downstream.value
    torch.testing.assert_close(unrelated, net(x))


def test_condition_on_a_python_bool_and_module_level_cond(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        with nnsight.cond(False):
            model.layer1.output[:] = 0
        out = model.output.save()
    torch.testing.assert_close(out, net(x))


def test_a_module_only_in_a_branch_not_taken_is_not_an_error(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x) as tracer:
        with tracer.cond(model.layer1.output.sum() > 1000):
            model.layer2.iter[3].output.save()  # call 3 never happens; the branch is not taken
        out = model.output.save()
    torch.testing.assert_close(out, net(x))


def test_condition_must_be_one_value(net, x):
    model = nnsight.NNsight(net)
    with pytest.raises(RuntimeError, match="must be one value"):
        with model.trace(x) as tracer:
            with tracer.cond(model.layer1.output > 0):
                pass
