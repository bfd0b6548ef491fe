"""The engine's module hooks stay installed between traces, idle: no registration
churn when a trace's sites repeat, nothing changed while no trace runs, gone with
the wrapper."""

import copy
import gc
import io
import pickle
import threading

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
from conftest import assert_hooks_idle, assert_no_hooks


@pytest.fixture
def net(tiny):
    return tiny  # conftest's tiny model; `x` is conftest's input on the same device


def engine_hooks(net):
    """{module name: [hook objects]} of fastinterleave's hooks on `net`."""
    out = {}
    for name, m in net.named_modules():
        hooks = [h for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()) if isinstance(h, nnsight._C.SiteHook)]
        if hooks:
            out[name] = hooks
    return out


def test_hooks_of_a_repeated_trace_are_registered_once(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.layer1.output[:, 0] = 0
        model.layer2.input.save()
    first = engine_hooks(net)
    assert set(first) == {"layer1", "layer2"}
    for _ in range(3):
        with model.trace(x):
            model.layer1.output[:, 0] = 0
            out = model.layer2.input.save()
        assert engine_hooks(net) == first  # the same hook objects: nothing registered again
    expected = net.layer1(x).clone()
    expected[:, 0] = 0
    assert_close(out, expected)
    assert_hooks_idle(net)


def test_a_graph_site_without_nodes_gets_an_idle_hook_and_the_others_map_right(net, x):
    # The engine maps each plan site to the hook of its graph site: a site the plan
    # does not use (none is recorded that way today) must not shift the others.
    model = nnsight.NNsight(net)
    with model.trace(x) as tracer:
        out = model.layer2.output.save()
        graph = tracer._graph
        assert graph.sites == [("layer2", 0)]
        graph.sites.insert(0, ("layer1", 0))  # site 0: no node reads it
        graph.nodes = [(*node[:4], node[4] + 1, *node[5:]) for node in graph.nodes]
    assert_close(out, net(x))
    assert set(engine_hooks(net)) == {"layer1", "layer2"}
    assert_hooks_idle(net)


def test_idle_hooks_change_nothing(net, x):
    plain = net(x)
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.layer1.output[:] = 0
        model.layer2.output.save()
    assert engine_hooks(net)
    assert_close(net(x), plain)  # outside a trace the edit is not applied
    # A hand-written hook registered afterwards still sees the plain value.
    seen = []
    handle = net.layer1.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        net(x)
    finally:
        handle.remove()
    assert_close(seen[0], net.layer1(x))


def test_a_traced_model_can_be_copied_and_pickled(net, x):
    # The idle hooks left on the modules must not stop copy.deepcopy / pickle /
    # torch.save of the model; a copy carries idle hooks of its own where the
    # original has them, and computes the same.
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.layer1.output[:] = 0
        model.layer2.inputs.save()
    plain = net(x)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    for copy_ in (copy.deepcopy(net), pickle.loads(pickle.dumps(net)), torch.load(buffer, weights_only=False)):
        assert_close(copy_(x), plain)
        hooks = engine_hooks(copy_)
        assert set(hooks) == {"layer1", "layer2"}
        assert all(not h.attached for hs in hooks.values() for h in hs)
        assert [h is o for h, o in zip(hooks["layer1"], engine_hooks(net)["layer1"])] == [False]
        assert len(copy_.layer2._forward_pre_hooks) == 1 and not copy_.layer2._forward_hooks  # where they were
    # The original still traces, with its own hooks.
    with model.trace(x):
        out = model.layer2.output.save()
    assert_close(out, plain)
    assert_hooks_idle(net)


def test_a_site_hook_called_wrongly_raises_a_type_error():
    hook = nnsight._C.SiteHook(True)
    with pytest.raises(TypeError, match=r"SiteHook takes \(module, args, output\)"):
        hook(1, 2)
    assert hook(None, (), None) is None  # idle: changes nothing


def test_a_trace_with_other_sites_removes_hooks_it_does_not_need(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.layer1.output.save()
    assert set(engine_hooks(net)) == {"layer1"}
    with model.trace(x):
        out = model.layer2.output.save()
    assert set(engine_hooks(net)) == {"layer2"}
    assert_close(out, net(x))
    with model.trace(x):
        pass
    assert engine_hooks(net) == {}


def test_an_empty_trace_that_fails_raises_and_leaves_no_hooks(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.layer1.output.save()
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        with model.trace(torch.rand(1, 7, device=x.device)):
            pass
    assert engine_hooks(net) == {}
    with model.trace(x):
        out = model.layer2.output.save()
    assert_close(out, net(x))


def test_hooks_go_with_the_wrapper_and_with_remove_hooks(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.layer1.output.save()
    assert engine_hooks(net)
    model.remove_hooks()
    assert_no_hooks(net)
    with model.trace(x):  # reinstalled when needed
        out = model.layer1.output.save()
    assert_close(out, net.layer1(x))
    assert engine_hooks(net)
    del model
    gc.collect()
    assert_no_hooks(net)


def test_an_edit_copy_shares_the_hooks_and_both_stay_right(net, x):
    model = nnsight.NNsight(net)
    with model.edit() as edited:
        model.layer1.output[:] = 0
    with edited.trace(x):
        a = edited.layer2.output.save()
    with model.trace(x):
        b = model.layer2.output.save()
    assert_close(a, net.layer2(x.new_zeros(x.shape[0], 10)))
    assert_close(b, net(x))
    assert_hooks_idle(net)


def test_replacing_a_module_moves_its_hook(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.layer2.output.save()
    old = net.layer2
    model.layer2 = torch.nn.Linear(10, 2).to(x.device)
    with model.trace(x):
        out = model.layer2.output.save()
    assert_close(out, net(x))
    assert not old._forward_hooks  # the replaced module is left clean
    assert set(engine_hooks(net)) == {"layer2"}


def test_a_trace_started_while_the_model_runs_a_trace_gets_hooks_of_its_own(net, x):
    """An intervention that itself traces the same model (nested run): the inner
    run cannot borrow the outer run's hooks; it gets temporary ones."""
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.layer1.output.save()  # hooks on layer1 stay installed
    inner = {}

    def nested(h):
        with model.trace(h.new_ones(1, 5)):
            inner["l1"] = model.layer1.output.save()
        return h

    with model.trace(x):
        h = model.layer1.output
        nnsight.apply(nested, h)
        outer = model.layer1.output.save()
    assert_close(inner["l1"].value, net.layer1(x.new_ones(1, 5)))
    assert_close(outer, net.layer1(x))
    assert set(engine_hooks(net)) == {"layer1"}  # the temporary ones are gone
    assert_hooks_idle(net)


def test_plain_forwards_on_another_thread_during_idle_time_are_untouched(net, x):
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.layer1.output[:] = 0
    outs = []
    t = threading.Thread(target=lambda: outs.append(net(x)))
    t.start()
    t.join()
    assert_close(outs[0], net(x))
    with torch.no_grad():
        assert_close(outs[0], net.layer2(net.layer1(x)))
