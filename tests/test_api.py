"""The front of the API: inputs, invokes, model subclasses, trace=False, rename."""

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


class KwModel(torch.nn.Module):
    """Takes its input by keyword, like HF models called with **tokenizer(...)."""

    def __init__(self):
        super().__init__()
        self.inner = make_tiny()

    def forward(self, features, scale=1.0):
        return self.inner(features) * scale


def test_keyword_only_inputs_make_an_implicit_invoke(x):
    km = KwModel()
    model = nnsight.NNsight(km)
    with model.trace(features=x, scale=2.0):
        out = model.output.save()
        inputs = model.inputs.save()
    torch.testing.assert_close(out, km(features=x, scale=2.0))
    args, kwargs = inputs
    assert args == () and set(kwargs) == {"features", "scale"} and kwargs["scale"] == 2.0


def test_trace_keywords_go_to_the_model_call(x):
    km = KwModel()
    model = nnsight.NNsight(km)
    with model.trace(x, scale=3.0):
        out = model.output.save()
        inputs = model.inputs.save()
    torch.testing.assert_close(out, km(x, scale=3.0))
    assert inputs[1] == {"scale": 3.0}


def test_trace_false_runs_at_once(net, x):
    out = nnsight.NNsight(net).trace(x, trace=False)
    torch.testing.assert_close(out, net(x))


def test_tracer_output_is_the_model_output(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x) as tracer:
        model.layer1.output[:] = 0
    torch.testing.assert_close(tracer.output, net.layer2(torch.zeros(1, 10)))


class Doubling(nnsight.NNsight):
    """A subclass with nnsight 0.4's hook signatures: inputs are lists of floats."""

    prepared = []

    def _prepare_input(self, *inputs, **kwargs):
        rows = torch.tensor(inputs[0], dtype=torch.float32)
        Doubling.prepared.append(rows.shape[0])
        return ((rows,), kwargs), rows.shape[0]

    def _batch(self, batched_inputs, *args, **kwargs):
        if batched_inputs is None:
            return args, kwargs
        return (torch.cat([batched_inputs[0][0], args[0]]),), kwargs

    def _execute(self, *args, **kwargs):
        return self._model(args[0] * 2, **kwargs)


def test_model_subclass_hooks(net):
    model = Doubling(net)
    a = [[0.1, 0.2, 0.3, 0.4, 0.5]]
    b = [[0.5, 0.4, 0.3, 0.2, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]]
    with model.trace() as tracer:
        with tracer.invoke(a) as inv_a:
            ha = model.layer1.output.save()
            size_a = inv_a.batch_size
        with tracer.invoke(b) as inv_b:
            hb = model.layer1.output.save()
            size_b = inv_b.batch_size
            prepared_b = inv_b.inputs
    assert (size_a, size_b) == (1, 2)
    torch.testing.assert_close(prepared_b[0][0], torch.tensor(b))
    torch.testing.assert_close(ha, net.layer1(torch.tensor(a) * 2))
    torch.testing.assert_close(hb, net.layer1(torch.tensor(b) * 2))


class Shifted(nnsight.NNsight):
    """A subclass preparing and batching tensor inputs: a trace of one tensor input
    must still call both (not read the rows itself, nor take them as they are)."""

    def _prepare_input(self, *inputs, **kwargs):
        rows = torch.cat([inputs[0], inputs[0]]) + 1
        return ((rows,), kwargs), rows.shape[0]

    def _batch(self, batched_inputs, *args, **kwargs):
        rows = args[0] * 2
        if batched_inputs is None:
            return (rows,), kwargs
        return (torch.cat([batched_inputs[0][0], rows]),), kwargs


def test_a_subclass_prepare_input_and_batch_are_called_for_one_tensor_input(net, x):
    model = Shifted(net)
    with model.trace(x) as tracer:
        out = model.layer2.output.save()
    assert tracer._invokers[0].batch_size == 2
    torch.testing.assert_close(out, net((torch.cat([x, x]) + 1) * 2))


def test_default_batch_concatenates_positional_tensors(net):
    model = nnsight.NNsight(net)
    torch.manual_seed(2)
    xs = [torch.rand(n, 5) for n in (1, 3, 2)]
    outs = []
    with model.trace() as tracer:
        for xi in xs:
            with tracer.invoke(xi):
                outs.append(model.layer2.output.save())
    for xi, o in zip(xs, outs):
        torch.testing.assert_close(o.value, net(xi))


def test_rename_aliases(net, x):
    model = nnsight.NNsight(net, rename={"first": "layer1"})
    with model.trace(x):
        a = model.first.output.save()
        b = model.layer1.output.save()
    torch.testing.assert_close(a, net.layer1(x))
    torch.testing.assert_close(a, b)


def test_module_list_indexing_negative():
    seq = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    model = nnsight.NNsight(seq)
    x = torch.ones(2, 3)
    with model.trace(x):
        last = model[-1].output.save()
        first_in = model[0].input.save()
    torch.testing.assert_close(last, seq(x))
    assert first_in is x or torch.equal(first_in, x)


def test_envoy_passes_through_module_attributes(net):
    model = nnsight.NNsight(net)
    assert model.layer1.in_features == 5
    assert model.layer1.weight is net.layer1.weight  # outside a trace: the parameter itself
