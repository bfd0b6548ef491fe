"""Scheduling rules nnsight 0.4 code relies on (DESIGN.md, "Scheduling"), and the
Python types values come back as. References: the same computation done by hand
with plain torch on the same modules."""

import dataclasses

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
import fastinterleave.util
from fastinterleave import InterventionError

from conftest import loop_with, make_gpt2, make_loop, make_tiny


@pytest.fixture
def net():
    return make_tiny()


def inputs(n, seed):
    torch.manual_seed(seed)
    return torch.rand(n, 5)


# -- on-demand values ---------------------------------------------------------------------


def test_clean_to_corrupted_patch_runs_the_computation_it_needs_on_demand(net):
    """`h[:, 0]` needs only the clean layer1 value; the walk of the clean invoke stopped
    at its read of the model output, yet the corrupted invoke's patch must see it."""
    model = nnsight.NNsight(net)
    clean, corrupted = inputs(1, 1), inputs(1, 2)
    with model.trace() as tracer:
        with tracer.invoke(clean):
            h = model.layer1.output
            clean_out = model.output.save()
        with tracer.invoke(corrupted):
            model.layer1.output[:, 0] = h[:, 0] * 2 + 1  # a chain of three computations
            patched = model.output.save()
    with torch.no_grad():
        h_corrupted = net.layer1(corrupted)
        h_corrupted[:, 0] = net.layer1(clean)[:, 0] * 2 + 1
        assert_close(patched, net.layer2(h_corrupted))
        assert_close(clean_out, net(clean))


def test_a_computation_waiting_for_a_later_module_is_not_run_early(net):
    """On demand runs only what all its inputs allow: a patch from layer2 into layer1
    of the same forward pass still raises (it could change nothing)."""
    model = nnsight.NNsight(net)
    with pytest.raises(InterventionError, match="already used the value"):
        with model.trace(inputs(1, 1)):
            late = model.layer2.output
            model.layer1.output[:, 0] = late[:, 0]


# -- edits after use: an error only when the edit is dead ------------------------------------


def test_an_edit_after_use_that_a_later_node_reads_runs(net):
    """nnsight 0.4.11's own test: the edit of layer1 lands after layer2 ran (the model
    does not see it), but the branch recorded after it reads the edited value."""
    model = nnsight.NNsight(net)
    x = inputs(1, 1)
    with model.trace(x) as tracer:
        l1 = model.layer1.output
        l2 = model.layer2.output.save()
        with tracer.cond(5 > 0):
            l1[:] = 1
        seen = (l1[:, 0] == 1).save()
        with tracer.cond(l1[:, 0] == 1):
            l2[:] = 5
        out = model.output.save()
    assert bool(seen.all())
    assert_close(l2, torch.full((1, 2), 5.0))
    assert_close(out, l2)  # the model's output is layer2's value, edited in place


def test_a_dead_edit_still_raises(net):
    model = nnsight.NNsight(net)
    with pytest.raises(InterventionError, match="already used the value"):
        with model.trace(inputs(1, 1)):
            a = model.layer1.output
            model.layer2.output.save()
            a[:, 3] = 0


def test_an_edit_through_a_model_output_attribute_lands():
    net = make_gpt2()
    model = nnsight.NNsight(net)
    ids = torch.tensor([[1, 2, 3, 4]])
    with model.trace(ids):
        model.transformer.output.last_hidden_state[:, -1] = 0
        logits = model.lm_head.output.save()
    with torch.no_grad():
        hidden = net.transformer(ids).last_hidden_state.clone()
        hidden[:, -1] = 0
        assert_close(logits, net.lm_head(hidden))


def test_a_dead_edit_through_a_model_output_attribute_raises():
    """`out.last_hidden_state[...] = 0` after lm_head ran changed nothing, silently."""
    model = nnsight.NNsight(make_gpt2())
    with pytest.raises(InterventionError, match="already used the value"):
        with model.trace(torch.tensor([[1, 2, 3, 4]])):
            out = model.transformer.output
            model.lm_head.output.save()
            out.last_hidden_state[:, -1] = 0


# -- branches not taken ------------------------------------------------------------------------


@pytest.mark.parametrize("taken", [True, False])
def test_a_read_inside_a_branch_follows_the_branch_even_if_read_before(net, taken):
    model = nnsight.NNsight(net)
    x = inputs(1, 1)
    bound = -1e9 if taken else 1e9
    with model.trace(x) as tracer:
        before = model.layer1.output.sum().save()
        with tracer.cond(before > bound):
            h = model.layer1.output.save()
    if taken:
        with torch.no_grad():
            assert_close(h, net.layer1(x))
    else:
        with pytest.raises(ValueError):
            h.value


@pytest.mark.parametrize("taken", [True, False])
def test_a_branch_decided_by_a_later_module_runs_nothing_before_it_is_decided(net, taken):
    """layer1 fires before the condition (on layer2) is known: what the branch computes
    from layer1 waits for it, and stays unset when the branch is not taken."""
    model = nnsight.NNsight(net)
    x = inputs(1, 1)
    bound = -1e9 if taken else 1e9
    with model.trace(x) as tracer:
        with tracer.cond(model.layer2.output.sum() > bound):
            h = model.layer1.output.save()
            doubled = (model.layer1.output * 2).save()
    if taken:
        with torch.no_grad():
            assert_close(h, net.layer1(x))
            assert_close(doubled, net.layer1(x) * 2)
    else:
        for value in (h, doubled):
            with pytest.raises(ValueError):
                value.value


def test_a_read_after_a_branch_is_not_the_branch_read(net):
    """The read inside the branch (not taken) is not reused after it."""
    model = nnsight.NNsight(net)
    x = inputs(1, 1)
    with model.trace(x) as tracer:
        with tracer.cond(model.layer1.output.sum() > 1e9):
            model.layer1.output.save()
        after = model.layer1.output.save()
    with torch.no_grad():
        assert_close(after, net.layer1(x))


# -- Python types, as torch gives them ------------------------------------------------------------


def test_values_have_torch_s_python_types(net):
    model = nnsight.NNsight(net)
    x = inputs(4, 1)
    with model.trace(x):
        h = model.layer1.output
        shape = h.shape.save()
        size = h.size().save()
        split = h.split(5, dim=1).save()
        chunks = h.chunk(2, dim=1).save()
        top = h.max(dim=1).save()
    with torch.no_grad():
        ref = net.layer1(x)
    assert type(shape) is torch.Size and shape == ref.shape
    assert type(size) is torch.Size and size == ref.size()
    for got, want in ((split, ref.split(5, dim=1)), (chunks, ref.chunk(2, dim=1))):
        assert type(got) is tuple and len(got) == len(want)
        for g, w in zip(got, want):
            assert_close(g, w)
    want = ref.max(dim=1)
    assert type(top) is type(want)
    assert_close(top.values, want.values)
    assert_close(top.indices, want.indices)


def test_a_shape_used_inside_the_trace_is_a_torch_size(net):
    model = nnsight.NNsight(net)
    with model.trace(inputs(3, 1)):
        kind = nnsight.apply(lambda s: type(s).__name__, model.layer1.output.shape).save()
        zeros = torch.zeros(model.layer1.output.shape).save()
    assert kind == "Size"
    assert zeros.shape == (3, 10)


# -- @dataclass outputs, and writes that read what they write ------------------------------------


@dataclasses.dataclass
class Pair:
    hidden: torch.Tensor
    scale: float = 1.0


class PairBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 4)

    def forward(self, x):
        return Pair(self.lin(x), 2.0)


class DataclassNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = PairBlock()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x).hidden)


def test_a_dataclass_output_is_sliced_per_invoke():
    torch.manual_seed(0)
    net = DataclassNet().eval()
    model = nnsight.NNsight(net)
    a, b = inputs(2, 1), inputs(3, 2)
    with model.trace() as tracer:
        with tracer.invoke(a):
            first = model.block.output.save()
        with tracer.invoke(b):
            second = model.block.output.save()
            model.block.output.hidden[:] = 0
            out_b = model.output.save()
    with torch.no_grad():
        for got, x in ((first, a), (second, b)):
            assert type(got) is Pair and got.scale == 2.0
            assert got.hidden.shape == (x.shape[0], 4)
        assert_close(first.hidden, net.block.lin(a))
        assert_close(out_b, net.head(torch.zeros(3, 4)))


def test_a_row_written_over_every_row_as_in_torch(net):
    """`h[:] = h[0, :]`: the source is part of what is written."""
    model = nnsight.NNsight(net)
    x = inputs(4, 1)
    with model.trace(x):
        h = model.layer1.output
        h[:] = h[0, :]
        out = model.output.save()
    with torch.no_grad():
        h = net.layer1(x)
        h[:] = h[0, :]
        assert_close(out, net.layer2(h))


# -- modules called inside a trace with hook=True ---------------------------------------------


class Attachment(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.one = nnsight.util.WrapperModule()
        self.lin = torch.nn.Linear(10, 10)

    def forward(self, x):
        return self.lin(self.one(x)) * 2


def test_a_module_called_with_hook_true_is_a_call_of_it(net):
    """nnsight's editing pattern: a module attached to the model, called on a value in
    an edit with hook=True; a later trace reads and edits what the attached module and
    the module inside it compute."""
    model = nnsight.NNsight(net)
    torch.manual_seed(3)
    model.layer1.attachment = Attachment()
    x = inputs(2, 1)
    with model.edit() as edited:
        model.layer1.output[:] = model.layer1.attachment(model.layer1.output, hook=True)
    with edited.trace(x):
        inner = model.layer1.attachment.one.output.clone().save()
        attached = model.layer1.attachment.output.clone().save()
        model.layer1.attachment.output *= 0.5
        out = model.output.save()
    with torch.no_grad():
        h = net.layer1(x)
        assert_close(inner, h)
        assert_close(attached, net.layer1.attachment(h))
        assert_close(out, net.layer2(net.layer1.attachment(h) * 0.5))


def test_a_module_called_without_hook_fires_no_hook(net):
    model = nnsight.NNsight(net)
    x = inputs(2, 1)
    with model.trace(x):
        again = model.layer2(model.layer1.output * 2).save()
        out = model.output.save()
        seen = model.layer2.output.save()  # call 0 of layer2 is the model's own
    with torch.no_grad():
        assert_close(again, net.layer2(net.layer1(x) * 2))
        assert_close(seen, net(x))
        assert_close(out, net(x))


# -- blocks of calls (.all()) -------------------------------------------------------------------


@pytest.mark.parametrize("constant", [True, False])
def test_a_branch_inside_an_all_block_is_decided_at_every_call(constant):
    net = make_loop()
    model = nnsight.NNsight(net)
    torch.manual_seed(1)
    x = torch.randn(2, 4)
    with model.trace(x) as tracer:
        with model.lin.all():
            condition = True if constant else model.lin.output.sum() > 0
            with tracer.cond(condition):
                model.lin.output[:, 0] = 9.0
        out = model.output.save()

    def edit(call, inp, output):
        if constant or output.sum() > 0:
            output[:, 0] = 9.0

    assert_close(out, loop_with(net, x, edit))


def test_a_value_read_before_an_all_block_is_read_once():
    net = make_loop()
    model = nnsight.NNsight(net)
    torch.manual_seed(1)
    x = torch.randn(2, 4)
    with model.trace(x):
        first = model.lin.output
        scale = (first[:, 1] * 0 + 2.0).save()  # computed once, from call 0
        with model.lin.all():
            model.lin.output[:, 1] = model.lin.output[:, 1] * scale
        out = model.output.save()
    assert_close(out, loop_with(net, x, lambda call, inp, o: o[:, 1].mul_(2.0)))
