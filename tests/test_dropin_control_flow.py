"""Python control flow on proxies (nnsight 0.4's CONFIG.APP.CONTROL_FLOW_HANDLING, on by
default): `if proxy:` / `elif` / `else` inside a trace record a branch (as
`tracer.cond(...)` / `.else_()` do), and at session level guard its steps; `for x in
proxy:` at session level records a loop (as `session.iter(...)` does).

References: plain torch doing by hand the branch the values select. nnsight 0.4.11 gives
the same values for the module-level if / elif / else and nested ifs (checked by hand);
an `if` in a function called inside the trace fails there ("'SubGraph' object has no
attribute 'compile'"), and `for x in proxy:` inside one trace silently records nothing."""

import sys

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
from conftest import assert_hooks_idle, make_tiny
from fastinterleave import InterventionError


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(1, 5)


def with_fill(net, x, fill):
    """The model's output when layer1's output is replaced by `fill` everywhere."""
    return net.layer2(torch.full((x.shape[0], 10), float(fill)))


@pytest.fixture(autouse=True)
def _no_trace_function_left():
    before = sys.gettrace()
    yield
    assert sys.gettrace() is before, "a trace function was left installed"


# -- if / elif / else inside a trace -----------------------------------------------------------


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_if_else_records_both_branches_and_runs_the_one_selected(net, model, x, sign):
    with model.trace(x):
        total = model.layer1.output.sum() * sign
        if total > 0:
            model.layer1.output[:] = 1
            taken_if = (model.layer1.output * 1).save()
        else:
            model.layer1.output[:] = 2
            taken_else = (model.layer1.output * 1).save()
        out = model.output.save()
    positive = (net.layer1(x).sum() * sign).item() > 0
    fill = 1 if positive else 2
    assert_close(out, with_fill(net, x, fill))
    taken, not_taken = (taken_if, taken_else) if positive else (taken_else, taken_if)
    assert_close(taken, torch.full((1, 10), float(fill)))
    with pytest.raises(ValueError, match="Accessing value before it's been set"):
        not_taken.value
    assert_hooks_idle(net)


@pytest.mark.parametrize("high,low,fill", [(-100.0, -200.0, 1.0), (100.0, -100.0, 2.0), (100.0, 50.0, 3.0)])
def test_elif_chain(net, model, x, high, low, fill):
    m = net.layer1(x).max().item()
    assert -100 < m < 50
    with model.trace(x):
        top = model.layer1.output.max()
        if top > high:
            model.layer1.output[:] = 1
        elif top > low:
            model.layer1.output[:] = 2
        else:
            model.layer1.output[:] = 3
        out = model.output.save()
    assert_close(out, with_fill(net, x, fill))


def test_elif_with_a_proxy_after_a_plain_condition(net, model, x):
    flag = False
    with model.trace(x):
        if flag:
            model.layer1.output[:] = 5
        elif model.layer1.output.sum() < 1000:
            model.layer1.output[:] = 6
        else:
            model.layer1.output[:] = 7
        out = model.output.save()
    assert_close(out, with_fill(net, x, 6))


def test_plain_python_conditions_inside_a_branch(net, model, x):
    # Inside a recorded branch, `if` on plain values is Python's own.
    with model.trace(x):
        if model.layer1.output.sum() < 1000:
            for k in range(3):
                if k == 1:
                    model.layer1.output[:, k] = 10
                elif k == 2:
                    model.layer1.output[:, k] = 20
        out = model.output.save()
    h = net.layer1(x)
    h[:, 1] = 10
    h[:, 2] = 20
    assert_close(out, net.layer2(h))


def test_nested_ifs(net, model, x):
    with model.trace(x):
        h = model.layer1.output
        if h.sum() < 1000:
            outer = (h * 2).save()
            if h.sum() > 1000:
                inner = (h * 3).save()
            else:
                inner_else = (h * 5).save()
            after_inner = (h * 4).save()
        else:
            outer_else = (h * 6).save()
        last = model.output.save()
    ref = net.layer1(x)
    assert_close(outer, ref * 2)
    assert_close(inner_else, ref * 5)
    assert_close(after_inner, ref * 4)
    assert_close(last, net(x))
    for unset in (inner, outer_else):
        with pytest.raises(ValueError, match="never set"):
            unset.value


@pytest.mark.python_fallback  # `not proxy`: operator.not_
def test_if_not_and_one_line_if(net, model, x):
    with model.trace(x):
        h = model.layer1.output
        if not (h.sum() > 1000):
            a = (h * 2).save()
        else:
            b = (h * 3).save()
        if h.sum() > 1000: c = (h * 4).save()  # noqa: E701
        d = (h * 5).save()
    ref = net.layer1(x)
    assert_close(a, ref * 2)
    assert_close(d, ref * 5)
    for unset in (b, c):
        with pytest.raises(ValueError):
            unset.value


def test_if_as_the_last_statement_of_the_trace_and_of_an_invoke(net, model, x):
    with model.trace() as tracer:
        with tracer.invoke(x):
            out = model.output.save()
            if model.layer1.output.sum() > 1000:
                model.layer1.output[:] = 1
            else:
                model.layer1.output[:] = 2
    assert_close(out, with_fill(net, x, 2))
    with model.trace(x):
        out2 = model.output.save()
        if model.layer1.output.sum() > 1000:
            model.layer1.output[:] = 1
        else:
            model.layer1.output[:] = 3
    assert_close(out2, with_fill(net, x, 3))


def test_if_inside_a_python_loop_of_the_trace(net, model):
    torch.manual_seed(3)
    xs = torch.randn(4, 5)
    with model.trace(xs):
        h = model.layer1.output
        for row in range(4):
            if h[row].sum() > 0:
                h[row] = 1
            else:
                h[row] = -1
        out = model.output.save()
    ref = net.layer1(xs)
    signs = torch.where(ref.sum(1, keepdim=True) > 0, 1.0, -1.0).expand(4, 10)
    assert_close(out, net.layer2(signs))


def patch_by_sign(envoy):
    if envoy.output.sum() > 1000:
        envoy.output[:] = 1
    else:
        envoy.output[:] = 2


def patch_then_more(envoy):
    if envoy.output.sum() < 1000:
        envoy.output[:] = 3
    envoy.output[:, 0] = 9


def test_if_in_a_function_called_inside_the_trace(net, model, x):
    # The if / else ending the function (no line of it follows the body) and an if
    # followed by more code.
    with model.trace(x):
        patch_by_sign(model.layer1)
        out = model.output.save()
    assert_close(out, with_fill(net, x, 2))
    with model.trace(x):
        patch_then_more(model.layer1)
        out = model.output.save()
    h = torch.full((1, 10), 3.0)
    h[:, 0] = 9
    assert_close(out, net.layer2(h))


def test_an_if_chain_in_a_function_ending_it(net, model, x):
    def pick(envoy):
        total = envoy.output.sum()
        if total > 1000:
            envoy.output[:] = 1
        elif total < -1000:
            envoy.output[:] = 2
        else:
            if total > 1000:
                envoy.output[:] = 3
            else:
                envoy.output[:] = 4

    with model.trace(x):
        pick(model.layer1)
        out = model.output.save()
    assert_close(out, with_fill(net, x, 4))


def test_a_condition_computed_in_one_invoke_guards_another(net, model):
    torch.manual_seed(5)
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    with model.trace() as tracer:
        with tracer.invoke(a):
            clean = model.layer1.output
        with tracer.invoke(b):
            if clean.sum() == clean.sum():  # always true
                model.layer1.output[:] = clean
            out = model.output.save()
    assert_close(out, net(a))


def test_branch_in_an_edit(net, model, x):
    with model.edit() as edited:
        if model.layer1.output.sum() < 1000:
            model.layer1.output[:] = 0
    with edited.trace(x):
        out = edited.output.save()
    assert_close(out, with_fill(net, x, 0))


def test_branches_run_in_a_session(net, model, x):
    with model.session():
        with model.trace(x):
            h = model.layer1.output
        with model.trace(x):
            if h.sum() < 1000:
                model.layer1.output[:] = 4
            out = model.output.save()
    assert_close(out, with_fill(net, x, 4))


# -- the trace function: always removed, other tracers keep theirs -------------------------


def test_an_error_inside_a_branch_leaves_no_trace_function(net, model, x):
    with pytest.raises(ZeroDivisionError):
        with model.trace(x):
            if model.layer1.output.sum() < 1000:
                1 / 0
    assert sys.gettrace() is None
    with pytest.raises(ZeroDivisionError):
        with model.trace(x):
            patch_then_raise(model.layer1)
    assert sys.gettrace() is None
    # The model traces as before.
    with model.trace(x):
        out = model.output.save()
    assert_close(out, net(x))
    assert_hooks_idle(net)


def patch_then_raise(envoy):
    if envoy.output.sum() < 1000:
        envoy.output[:] = 1
        {}["missing"] if False else 1 / 0
    else:
        envoy.output[:] = 2


def test_an_existing_trace_function_keeps_its_events_and_is_restored(net, model, x):
    seen = []

    def local(frame, event, arg):
        seen.append((frame.f_code.co_name, event))
        return local

    def tracer_fn(frame, event, arg):
        if frame.f_code.co_name == "traced_block":
            return local
        return None

    def traced_block():
        with model.trace(x):
            if model.layer1.output.sum() > 1000:
                model.layer1.output[:] = 1
            else:
                model.layer1.output[:] = 2
            out = model.output.save()
        return out

    sys.settrace(tracer_fn)
    try:
        out = traced_block()
        assert sys.gettrace() is tracer_fn
    finally:
        sys.settrace(None)
    assert_close(out, with_fill(net, x, 2))
    lines = [e for name, e in seen if name == "traced_block"]
    assert lines.count("line") >= 6 and lines[-1] == "return"


def test_control_flow_handling_off_keeps_the_clear_errors(model, x, monkeypatch):
    monkeypatch.setattr(nnsight.CONFIG.APP, "CONTROL_FLOW_HANDLING", False)
    with pytest.raises(InterventionError, match="CONTROL_FLOW_HANDLING is off"):
        with model.trace(x):
            if model.layer1.output.sum() > 0:
                pass
    with pytest.raises(InterventionError, match="cannot be iterated"):
        with model.session():
            for _ in nnsight.list([1, 2]):
                pass


@pytest.mark.parametrize(
    "body,message",
    [
        ("if h.sum() > 0 and h.sum() < 5:\n    pass", "combine the conditions with `&`"),
        ("while h.sum() > 0:\n    break", "only an `if`"),
        ("y = 1 if h.sum() > 0 else 2", "only an `if`"),
        ("y = bool(h.sum() > 0)", "only an `if`"),
        ("for _ in range(2):\n    if h.sum() > 0:\n        break", "`break` inside `if proxy:`"),
        ("for _ in h:\n    pass", "inside a trace cannot be recorded"),
        ("a, b = h", "cannot be iterated"),
    ],
)
def test_what_cannot_be_recorded_is_a_clear_error(model, x, tmp_path, body, message):
    # Written to a file: the recorder reads the source of the statement.
    source = "def run(model, x):\n    with model.trace(x):\n        h = model.layer1.output\n"
    source += "".join(f"        {line}\n" for line in body.splitlines())
    path = tmp_path / "snippet.py"
    path.write_text(source)
    namespace = {}
    exec(compile(source, str(path), "exec"), namespace)
    with pytest.raises(InterventionError, match=message.replace("(", r"\(").replace("`", ".")):
        namespace["run"](model, x)


def test_code_without_source_points_to_tracer_cond(model, x):
    namespace = {}
    exec(
        "def run(model, x):\n    with model.trace(x):\n        if model.layer1.output.sum() > 0:\n            pass\n",
        namespace,
    )
    with pytest.raises(InterventionError, match="tracer.cond"):
        namespace["run"](model, x)


def test_return_inside_a_proxy_if_is_an_error(model, x):
    def early(envoy):
        if envoy.output.sum() < 0:
            return (envoy.output * 7).save()
        return None

    with pytest.raises(InterventionError, match="`return` inside `if proxy:`"):
        with model.trace(x):
            early(model.layer1)


def test_after_the_trace_a_proxy_has_its_value_truth(model, x):
    with model.trace(x):
        cache = {"positive": (model.layer1.output.sum() > -1000).save()}
    assert bool(cache["positive"]) is True
    if not cache["positive"]:
        raise AssertionError("the saved value is true")


# -- sessions: `if` guards steps, `for x in proxy:` loops --------------------------------------


@pytest.mark.python_fallback  # nnsight.int / nnsight.list
def test_if_else_at_session_level(net, model, x):
    for value, expected in ((3, "big"), (1, "small")):
        with model.session():
            v = nnsight.int(value)
            result = nnsight.list().save()
            if v > 2:
                result.append("big")
            else:
                result.append("small")
            result.append("after")
        assert result == [expected, "after"]


@pytest.mark.python_fallback  # nnsight.list
def test_for_over_a_proxy_list_at_session_level(net, model, x):
    with model.session():
        factors = nnsight.list([1.0, 2.0, 3.0])
        sums = nnsight.list().save()
        for factor in factors:
            with model.trace(x):
                sums.append(model.layer1.output.sum() * factor)
        done = nnsight.list().save()
        done.append(nnsight.apply(len, sums))  # after the loop: all three ran
    ref = net.layer1(x).sum()
    assert len(sums) == 3
    for got, factor in zip(sums, (1.0, 2.0, 3.0)):
        assert_close(got, ref * factor)
    assert done == [3]


@pytest.mark.python_fallback  # nnsight.list
def test_for_over_a_traced_tensor_with_stop_in_a_branch(net, model, x):
    with model.session() as session:
        with model.trace(x):
            h = model.layer1.output[0]
        kept = nnsight.list().save()
        for value in h:
            kept.append(value * 2)
            if value > 0:
                session.stop()  # leaves the loop when the session runs
        kept.append(-1)
    ref = net.layer1(x)[0]
    first_positive = next(i for i, v in enumerate(ref.tolist()) if v > 0)
    assert len(kept) == first_positive + 2
    assert_close(torch.stack(kept[:-1]), ref[: first_positive + 1] * 2)
    assert kept[-1] == -1


def test_break_inside_a_proxy_loop_is_an_error(model):
    with pytest.raises(InterventionError, match="`break` inside `for x in proxy:`"):
        with model.session():
            for item in nnsight.list([1, 2]):
                break


def test_comprehension_over_a_proxy_is_an_error(model):
    with pytest.raises(InterventionError, match="comprehension"):
        with model.session():
            items = nnsight.list([1, 2])
            [i for i in items]


def test_branches_recorded_by_two_threads_at_once(net, x):
    # sys.settrace is per thread: each thread's branches close on its own lines.
    import threading

    models = [nnsight.NNsight(make_tiny()), nnsight.NNsight(make_tiny())]
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def work(k):
        try:
            model = models[k]
            outs = []
            for step in range(20):
                with model.trace(x):
                    barrier.wait(timeout=30)
                    if model.layer1.output.sum() > 1000 * (1 - 2 * ((step + k) % 2)):
                        model.layer1.output[:] = 1
                    else:
                        model.layer1.output[:] = 2
                    outs.append(model.output.save())
            results[k] = outs
            assert sys.gettrace() is None
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(2):
        for step, out in enumerate(results[k]):
            fill = 1 if (step + k) % 2 else 2  # the threshold is -1000 on odd steps, +1000 on even
            assert_close(out.value, with_fill(net, x, fill))
