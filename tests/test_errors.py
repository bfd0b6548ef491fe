"""Errors users can cause: each is clear, names the user's line, and leaves the
model exactly as it was (no hooks, same outputs), so the next trace works."""

import copy
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
from conftest import assert_hooks_idle
from fastinterleave import InterventionError



@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(1, 5)


def assert_clean(model, net, x):
    """No hook left active, and a fresh trace gives plain-forward values."""
    assert_hooks_idle(net)
    with model.trace(x):
        out = model.output.save()
    torch.testing.assert_close(out, net(x))


def test_unknown_module_attribute_lists_the_children(model):
    with pytest.raises(AttributeError) as err:
        model.layer3
    assert "layer3" in str(err.value)
    assert "layer1, layer2" in str(err.value)


def test_second_invoke_inside_an_open_one(model, net, x):
    with pytest.raises(InterventionError, match="already open"):
        with model.trace() as tracer:
            with tracer.invoke(x):
                with tracer.invoke(x):
                    pass
    assert_clean(model, net, x)


def test_intervention_outside_a_trace(model):
    with pytest.raises(InterventionError, match="inside a `with model.trace"):
        model.layer1.output
    with pytest.raises(InterventionError, match="inside a `with model.trace"):
        model.layer1.output = torch.zeros(1, 10)
    with pytest.raises(InterventionError, match="inside a `with model.trace"):
        nnsight.apply(len, [1])


def test_value_of_an_unsaved_proxy(model, x):
    holder = {}
    with model.trace(x):
        holder["p"] = model.layer1.output
    with pytest.raises(ValueError, match="not saved: call .save()"):
        holder["p"].value


def test_value_while_recording(model, x):
    with model.trace(x):
        p = model.layer1.output.save()
        with pytest.raises(ValueError, match="while the trace is being recorded"):
            p.value


def test_module_never_called_names_the_line(x):
    class Skips(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(5, 5)
            self.unused = torch.nn.Linear(5, 5)

        def forward(self, x):
            return self.used(x)

    model = nnsight.NNsight(Skips())
    with pytest.raises(InterventionError) as err:
        with model.trace(x):
            model.unused.output.save()  # the line to name
    msg = str(err.value)
    assert "module 'unused' was never called" in msg
    assert "model.unused.output.save()  # the line to name" in msg
    assert_hooks_idle(model._model)


def test_lines_follow_the_code_when_it_is_recompiled(model, x):
    # Recorded lines are cached per (code, instruction); code compiled again (a
    # notebook cell run again, edited) must name its own lines.
    for blank_lines in (0, 3, 1):
        source = "\n" * blank_lines + textwrap.dedent("""
            def record(model, x, holder):
                with model.trace(x):
                    holder["p"] = model.layer1.output
        """)
        namespace = {}
        exec(compile(source, "<cell>", "exec"), namespace)
        for _ in range(2):  # the second run reads the cache
            holder = {}
            namespace["record"](model, x, holder)
            with pytest.raises(ValueError) as err:
                holder["p"].value
            assert f"recorded at <cell>:{blank_lines + 4}" in str(err.value)


def test_lines_stay_right_past_the_bound_of_the_line_cache(model, x):
    # The caches of recorded locations and of files are bounded (each dropped whole
    # when full): more distinct locations and files than they hold, then the first
    # ones again.
    sources = [compile("model.layer1.output + 1\n" * 2, f"<cell {i}>", "exec") for i in range(4400)]
    for _ in range(2):
        with model.trace(x) as tracer:
            for code in sources:
                exec(code, {"model": model})
            graph = tracer._graph
            lines = [graph.lines[node[9]] for node in graph.nodes[1:]]  # after the site (read once)
        assert lines == [f"<cell {i}>:{k}" for i in range(4400) for k in range(1, 3)]


def test_exception_inside_the_model_keeps_its_type_and_cleans_up(model, net, x):
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        with model.trace(torch.rand(1, 7)):
            model.layer1.output.save()
    assert_clean(model, net, x)


def test_exception_inside_an_intervention_names_the_line(model, net, x):
    with pytest.raises(IndexError) as err:
        with model.trace(x):
            model.layer1.output[:, 100].save()
    assert "out of bounds" in str(err.value)
    notes = "\n".join(getattr(err.value, "__notes__", []))
    assert "model.layer1.output[:, 100].save()" in notes
    assert_clean(model, net, x)


def test_exception_inside_a_python_function_keeps_its_type(model, net, x):
    def boom(t):
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom") as err:
        with model.trace(x):
            nnsight.apply(boom, model.layer1.output)
    assert any("nnsight.apply(boom" in n for n in err.value.__notes__)
    assert_clean(model, net, x)


def test_exception_in_the_with_body_runs_nothing(model, net, x):
    calls = []
    handle = net.layer1.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(KeyError):
            with model.trace(x):
                model.layer1.output.save()
                raise KeyError("user")
    finally:
        handle.remove()
    assert calls == []
    assert_clean(model, net, x)


def test_trace_without_inputs(model):
    with pytest.raises(InterventionError, match="no inputs"):
        with model.trace():
            pass


def test_nested_traces_of_one_model(model, x):
    with pytest.raises(InterventionError, match="cannot be nested"):
        with model.trace(x):
            with model.trace(x):
                pass


def test_remote_is_not_supported(model, x):
    with pytest.raises(NotImplementedError, match="remote"):
        model.trace(x, remote=True)


def test_proxy_truth_value_and_iteration_are_clear_errors(model, x, monkeypatch):
    # With nnsight's CONFIG.APP.CONTROL_FLOW_HANDLING off (on, `if` records a branch:
    # tests/test_dropin_control_flow.py).
    monkeypatch.setattr(nnsight.CONFIG.APP, "CONTROL_FLOW_HANDLING", False)
    with pytest.raises(InterventionError, match="tracer.cond"):
        with model.trace(x):
            if model.layer1.output.sum() > 0:
                pass
    with pytest.raises(InterventionError, match="cannot be iterated"):
        with model.trace(x):
            for _ in model.layer1.output:
                pass


def test_copying_a_proxy_is_a_clear_error_and_clone_is_the_way(model, x):
    with model.trace(x):
        h = model.layer1.output
        for copy_ in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=r"proxy.clone\(\)"):
                copy_(h)
        c = h.clone().save()
        h[:] = 0
    assert_close(c, model._model.layer1(x))  # the clone kept the value from before the edit
    assert_hooks_idle(model._model)


def test_extension_built_for_another_torch_is_refused(monkeypatch):
    from fastinterleave import _loader

    monkeypatch.setattr(_loader.torch, "__version__", "0.0.1")
    with pytest.raises(ImportError, match="Rebuild it with"):
        _loader.load_extension()


def test_frame_injection_at_module_level(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(
        """
        import torch
        import fastinterleave as nnsight
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        model = nnsight.NNsight(net)
        x = torch.ones(1, 3)
        with model.trace(x):
            h = model[0].output.save()
            unsaved = model[1].output
        assert type(h) is torch.Tensor, type(h)
        assert torch.allclose(h, net[0](x))
        assert type(unsaved) is nnsight.Proxy
        print("ok")
        """
    ))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
