"""The C++ side: engine unit tests (ctest) and a plan recorded here rerun by a
C++ program that links the engine alone (no libpython)."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastinterleave as nnsight
from fastinterleave import _C

from conftest import make_tiny

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cpp"


def _tool(name):
    """cmake/ninja/ctest from the venv running the tests, else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


@pytest.fixture(scope="session")
def cpp_build():
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    configure = [
        _tool("cmake"), "-S", str(ROOT / "tests" / "cpp"), "-B", str(BUILD), "-G", "Ninja",
        f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
    ]
    for cmd in (configure, [_tool("cmake"), "--build", str(BUILD)]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return BUILD


def test_engine_unit_tests_pass_under_ctest(cpp_build):
    result = subprocess.run([_tool("ctest"), "--test-dir", str(cpp_build), "--output-on-failure"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed" in result.stdout


def test_cpp_program_links_no_libpython(cpp_build):
    result = subprocess.run(["ldd", str(cpp_build / "run_plan")], capture_output=True, text=True)
    assert result.returncode == 0
    assert "libtorch" in result.stdout
    assert "libpython" not in result.stdout and "torch_python" not in result.stdout


def test_cpp_reruns_a_plan_recorded_in_python(cpp_build, tmp_path):
    net = make_tiny()
    model = nnsight.NNsight(net)
    torch.manual_seed(3)
    x, x2 = torch.rand(1, 5), torch.rand(1, 5)

    nnsight.CONFIG.engine.python_fallback = False  # the graph must be C++-only
    try:
        with torch.no_grad():
            with model.trace() as tracer:
                with tracer.invoke(x):
                    clean = model.layer1.output[:, 2:5].save()
                    a = model.layer2.output.save()
                with tracer.invoke(x2):
                    model.layer1.output[:, 2:5] = clean
                    model.layer1.output[:, 0] = 0
                    h = model.layer1.output.save()
                    model.layer2.input = model.layer2.input * 2 + 1
                    b = model.layer2.output.save()
                    s = (model.layer2.output.softmax(-1) - 0.5).sum(1).save()
    finally:
        nnsight.CONFIG.engine.python_fallback = True
    graph = tracer._graph

    # The Python run itself is right (plain torch by hand).
    with torch.no_grad():
        h_ref = net.layer1(x2)
        h_ref[:, 2:5] = net.layer1(x)[:, 2:5]
        h_ref[:, 0] = 0
        b_ref = net.layer2(h_ref * 2 + 1)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(b, b_ref)
    torch.testing.assert_close(s, (b_ref.softmax(-1) - 0.5).sum(1))
    torch.testing.assert_close(a, net.layer2(net.layer1(x)))

    plan_file = tmp_path / "plan.fig"
    tracer._plan.write(str(plan_file))
    model_file = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated, still the way here
        torch.jit.save(torch.jit.trace(net, x), str(model_file))
    # The C++ program must reproduce every saved value of the Python run.
    saved_nodes = sorted(graph.values)
    values = [graph.values[n] for n in saved_nodes]
    assert len(values) == 5
    data = [("input", torch.cat([x, x2]))] + [(f"saved.{n}", v) for n, v in zip(saved_nodes, values)]
    data_file = tmp_path / "data.fit"
    _C.save_tensors(str(data_file), data)

    result = subprocess.run([str(cpp_build / "run_plan"), str(plan_file), str(model_file), str(data_file)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(values)} of {len(values)} saved values match" in result.stdout


def test_cpp_program_rejects_a_corrupt_plan(cpp_build, tmp_path):
    bad = tmp_path / "bad.fig"
    bad.write_bytes(b"FIGRAPH\x00\x01\x00\x00\x00garbage")
    result = subprocess.run([str(cpp_build / "run_plan"), str(bad), str(bad), str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "bad fastinterleave file" in result.stderr
