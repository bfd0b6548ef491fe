"""The schedule: nnsight 0.4.11's ordering rules, pinned by their consequences.

Expected values are computed with plain torch; the comments give what nnsight
0.4.11 does in each case (checked against it)."""

import sys
import weakref

import pytest
import torch

import fastinterleave as nnsight
from conftest import assert_hooks_idle
from fastinterleave import InterventionError



@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(1, 5)


def test_save_before_stop_survives(model, net, x):
    with model.trace(x) as tracer:
        h = model.layer1.output.save()
        tracer.stop()
        after = model.layer2.output.save()
    torch.testing.assert_close(h, net.layer1(x))
    # Unset, as in nnsight: the forward pass ended before layer2.
    with pytest.raises(ValueError, match="never set"):
        after.value
    assert_hooks_idle(net)


def test_stop_as_first_statement_runs_nothing(model, net, x):
    calls = []
    handle = net.layer1.register_forward_hook(lambda *a: calls.append(1))
    try:
        with model.trace(x) as tracer:
            tracer.stop()
            h = model.layer1.output.save()
    finally:
        handle.remove()
    assert calls == []
    with pytest.raises(ValueError):
        h.value


def test_proxy_stop_ends_after_its_value(model, net, x):
    with model.trace(x):
        h = model.layer1.output.save()
        h.stop()
        out = model.layer2.output.save()
    torch.testing.assert_close(h, net.layer1(x))
    with pytest.raises(ValueError):
        out.value


@pytest.mark.python_fallback
def test_side_effects_keep_program_order(model, net, x):
    with model.trace(x):
        hs = []
        hs.append(model.layer2.output)
        n = nnsight.apply(len, hs).save()
        first = nnsight.apply(lambda l: l[0] * 1, hs).save()
    assert n == 1
    torch.testing.assert_close(first, net(x))


def test_a_read_recorded_after_a_swap_sees_the_swap(model, net, x):
    with model.trace(x):
        before = model.layer1.output.save()
        model.layer1.output = model.layer1.output * 2
        after = model.layer1.output.save()
        out = model.layer2.output.save()
    ref = net.layer1(x)
    torch.testing.assert_close(before, ref)
    torch.testing.assert_close(after, ref * 2)
    torch.testing.assert_close(out, net.layer2(ref * 2))


def test_read_of_a_later_module_before_an_edit_of_an_earlier_one(model, net, x):
    # nnsight 0.4.11 runs the edit when layer1 fires: b reflects it.
    with model.trace(x):
        b = model.layer2.output.save()
        model.layer1.output[:, 0] = 0
    h = net.layer1(x)
    h[:, 0] = 0
    torch.testing.assert_close(b, net.layer2(h))


def _source_of(fn, needle):
    import inspect

    lines, start = inspect.getsourcelines(fn)
    for i, line in enumerate(lines):
        if needle in line:
            return start + i
    raise AssertionError(needle)


def test_edit_that_would_run_after_the_module_ran_is_an_error(model, net, x):
    # nnsight 0.4.11 runs `a[:, 3] = 0` only when layer2 fires: silently too late.
    def body():
        with model.trace(x):
            a = model.layer1.output
            b = model.layer2.output.save()  # noqa: F841
            a[:, 3] = 0

    with pytest.raises(InterventionError) as err:
        body()
    msg = str(err.value)
    # Both lines are named, with their source.
    assert f":{_source_of(body, 'a[:, 3] = 0')}: a[:, 3] = 0" in msg
    assert f":{_source_of(body, 'b = model.layer2')}: b = model.layer2.output.save()" in msg
    assert_hooks_idle(net)
    # The model is unchanged and the next trace works.
    with model.trace(x):
        out = model.layer2.output.save()
    torch.testing.assert_close(out, net(x))


def test_swap_whose_value_needs_a_later_module_is_an_error(model, net, x):
    # nnsight 0.4.11 silently never applies this swap.
    with pytest.raises(InterventionError, match="already used the value"):
        with model.trace(x):
            model.layer1.output = model.layer2.output.sum() * torch.ones(1, 10)


def test_edit_blocked_by_a_node_waiting_for_a_later_module_is_an_error(model, x):
    # b = l2.output; a = l1.output; s = a.sum() + b.sum(); a[:, 0] = 0:
    # the add waits for layer2, and the edit is recorded after it.
    with pytest.raises(InterventionError):
        with model.trace(x):
            b = model.layer2.output
            a = model.layer1.output
            (a.sum() + b.sum()).save()
            a[:, 0] = 0


@pytest.mark.python_fallback
def test_unsaved_intermediates_are_freed_after_their_last_use(model, x):
    refs = []

    def track(t):
        refs.append(weakref.ref(t))

    def freed():
        return refs[0]() is None

    with model.trace(x):
        t = model.layer1.output * 2
        nnsight.apply(track, t)
        u = t.sum().save()
        # Runs when layer2 fires: t's last use was before.
        dead = nnsight.apply(lambda _: freed(), model.layer2.output).save()
    assert refs and dead is True
    assert u is not None


@pytest.mark.python_fallback
def test_saved_values_are_kept_and_only_them(model, x):
    refs = {}

    def track(name):
        def fn(t):
            refs[name] = weakref.ref(t)

        return fn

    with model.trace(x):
        kept = (model.layer1.output + 1).save()
        dropped = model.layer1.output - 1
        nnsight.apply(track("kept"), kept)
        nnsight.apply(track("dropped"), dropped)
    assert refs["kept"]() is not None
    assert refs["dropped"]() is None


def _count_python_calls(model, x, n_nodes):
    """Python-level call events (calls and C calls) during the forward pass."""
    counts = []

    class Counting(nnsight.NNsight):
        def _execute(self, *args, **kwargs):
            n = [0]

            def profile(frame, event, arg):
                if event in ("call", "c_call"):
                    n[0] += 1

            sys.setprofile(profile)
            try:
                return super()._execute(*args, **kwargs)
            finally:
                sys.setprofile(None)
                counts.append(n[0])

    counting = Counting(model._model)
    with counting.trace(x):
        h = counting.layer1.output
        for i in range(n_nodes - 1):
            h = h * 1.0001 + 0.0001
        h.save()
        counting.layer2.output[:, 0] = 0
    return counts[0]


def test_python_calls_per_forward_do_not_grow_with_nodes(model, x):
    nnsight.CONFIG.engine.python_fallback = False
    try:
        one = _count_python_calls(model, x, 1)
        many = _count_python_calls(model, x, 200)
    finally:
        nnsight.CONFIG.engine.python_fallback = True
    assert one == many


def test_fallback_off_really_refuses_python_nodes(model, x):
    nnsight.CONFIG.engine.python_fallback = False
    try:
        with pytest.raises(InterventionError, match="fallback is switched off"):
            with model.trace(x):
                nnsight.apply(lambda t: t + 1, model.layer1.output).save()
    finally:
        nnsight.CONFIG.engine.python_fallback = True
