"""Sessions (traces run in order at the end; values flow without .save()) and
edits (interventions every later trace starts with)."""

import pytest
import torch

import fastinterleave as nnsight
from fastinterleave import InterventionError

from conftest import make_tiny


@pytest.fixture
def net():
    return make_tiny()


@pytest.fixture
def xs():
    torch.manual_seed(1)
    return torch.rand(1, 5), torch.rand(1, 5)


def test_values_flow_between_traces_without_save(net, xs):
    x, x2 = xs
    model = nnsight.NNsight(net)
    with model.session():
        with model.trace(x):
            clean = model.layer1.output  # not saved
        with model.trace(x2):
            model.layer1.output = clean
            out = model.output.save()
    torch.testing.assert_close(out, net(x))


def test_traces_run_when_the_session_exits(net, xs):
    x, _ = xs
    model = nnsight.NNsight(net)
    calls = []
    handle = net.layer1.register_forward_hook(lambda *a: calls.append(1))
    try:
        with model.session():
            with model.trace(x):
                model.output.save()
            assert calls == []
        assert calls == [1]
    finally:
        handle.remove()


def test_session_iter_cond_and_stop(net, xs):
    x, _ = xs
    model = nnsight.NNsight(net)
    with model.session() as session:
        picked = nnsight.list().save()
        with session.iter([0, 1, 2, 3, 4]) as i:
            with session.cond(i == 3):
                session.stop()  # leaves the loop
            with model.trace(x):
                picked.append(model.layer1.output[:, i] * 1)
    ref = net.layer1(x)[0]
    assert len(picked) == 3
    torch.testing.assert_close(torch.stack(picked).flatten(), ref[:3])


def test_session_iter_over_a_data_loader(net):
    model = nnsight.NNsight(net)
    torch.manual_seed(3)
    data = torch.rand(4, 5)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    with model.session() as session:
        outs = nnsight.list().save()
        with session.iter(loader) as batch:
            with model.trace(batch):
                outs.append(model.output * 1)
    torch.testing.assert_close(torch.cat(list(outs)), net(data))


def test_nested_sessions_are_an_error(net):
    model = nnsight.NNsight(net)
    with pytest.raises(InterventionError, match="cannot be nested"):
        with model.session():
            with model.session():
                pass


def test_edit_applies_to_later_traces_of_the_copy(net, xs):
    x, x2 = xs
    model = nnsight.NNsight(net)
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    with edited.trace(torch.cat([x, x2])):  # a different batch size than the edit
        h = model.layer1.output.save()
    torch.testing.assert_close(h[:, 0], torch.zeros(2))
    torch.testing.assert_close(h[:, 1:], net.layer1(torch.cat([x, x2]))[:, 1:])
    # The original wrapper is unedited.
    with model.trace(x):
        plain = model.layer1.output.save()
    torch.testing.assert_close(plain, net.layer1(x))


def test_edit_in_place_and_clear(net, xs):
    x, _ = xs
    model = nnsight.NNsight(net)
    with model.edit(inplace=True):
        model.layer2.output = model.layer2.output * 0
    with model.trace(x):
        out = model.output.save()
    torch.testing.assert_close(out, torch.zeros(1, 2))
    model.clear_edits()
    with model.trace(x):
        out = model.output.save()
    torch.testing.assert_close(out, net(x))


def test_edit_with_an_attached_module(net, xs):
    x, _ = xs
    model = nnsight.NNsight(net)

    class Double(torch.nn.Module):
        def forward(self, t):
            return t * 2

    model.layer1.double = Double()
    with model.edit() as edited:
        model.layer1.output = model.layer1.double(model.layer1.output)
    with edited.trace(x):
        out = model.output.save()
    torch.testing.assert_close(out, net.layer2(net.layer1(x) * 2))


def test_data_loader_over_a_proxy(net):
    model = nnsight.NNsight(net)
    torch.manual_seed(4)
    data = torch.rand(4, 5)
    with model.session() as session:
        with model.trace(data):
            acts = model.layer1.output  # (4, 10), read later without .save()
        loader = torch.utils.data.DataLoader(acts, batch_size=2)  # records a node: acts is a proxy
        outs = nnsight.list().save()
        with session.iter(loader) as batch:
            with model.trace(data[:2]):
                outs.append(model.layer2(batch))
    assert len(outs) == 2
    torch.testing.assert_close(torch.cat(list(outs)), net.layer2(net.layer1(data)))
