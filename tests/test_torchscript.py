"""The C++ embedding: a graph exported from Python (``tracer.export``) runs inside a
TorchScript model from a C++ program that links the engine alone, and gives the
numbers the Python run gave; malformed and hostile graph files give errors; the
installed CMake package builds examples/cpp with ``find_package(fastinterleave)``."""

import os
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
from fastinterleave import _C

from conftest import make_gpt2, make_tiny
from test_cpp import BUILD, ROOT, _tool, cpp_build  # noqa: F401  (cpp_build: the C++ build fixture)

T = 8  # sequence length


class Traceable(torch.nn.Module):
    """What torch.jit.trace records (HF models cannot be scripted): the model called
    with fixed keywords. The C++ side names its submodules with the prefix "model"."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False, return_dict=False)[0]


def ids_of(seed, rows=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (rows, T), generator=g)


@pytest.fixture(scope="module")
def gpt2_script(tmp_path_factory):
    """(GPT-2-shaped LM, its traced TorchScript file). Recorded with use_cache=False,
    the keywords the traced model runs with (block outputs are then 1-tuples)."""
    pytest.importorskip("transformers")
    net = make_gpt2()
    net.config.use_cache = False
    path = tmp_path_factory.mktemp("gpt2") / "gpt2.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace/save: deprecated (still the way for HF models); TracerWarnings
        torch.jit.save(torch.jit.trace(Traceable(net), ids_of(0)), str(path))
    return net, path


def run_cpp(model_file, graph_file, inputs, tmp_path, prefix="model"):
    """Runs the graph in the TorchScript model from C++: {"output": ..., "saved.<name>": ...}."""
    inputs_file, out_file = tmp_path / "inputs.fit", tmp_path / "out.fit"
    _C.save_tensors(str(inputs_file), [(f"input.{i}", x) for i, x in enumerate(inputs)])
    result = subprocess.run(
        [str(BUILD / "test_torchscript"), "run", str(model_file), prefix, str(graph_file), str(inputs_file),
         str(out_file)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(_C.load_tensors(str(out_file)))


def assert_same_as_python(out, tracer, saved):
    """Every named saved value, and the output's logits, as Python computed them."""
    for name, value in saved.items():
        assert_close(out[f"saved.{name}"], value, msg=lambda m: f"{name}: {m}")
    assert_close(out["output"], tracer.output.logits)


# -- the C++ path gives Python's numbers (traced GPT-2) --------------------------------------


def test_cpp_save_matches_python(cpp_build, gpt2_script, tmp_path):
    net, model_file = gpt2_script
    model = nnsight.NNsight(net)
    ids = ids_of(1)
    with torch.no_grad(), model.trace(ids) as tracer:
        h1 = model.transformer.h[1].output[0].save()  # a block's output is a tuple
        whole = model.transformer.h[0].output.save()
        mlp = model.transformer.h[1].mlp.output.save()  # a site inside a block
        attn_in = model.transformer.h[0].attn.input.save()
        ln_f_in = model.transformer.ln_f.input.save()
        logits = model.output.logits.save()
    tracer.export(str(tmp_path / "g.fig"))
    out = run_cpp(model_file, tmp_path / "g.fig", [ids], tmp_path)
    assert isinstance(whole, tuple) and len(whole) == 1
    assert "saved.whole.0" in out and "saved.whole" not in out  # the tuple, as in Python
    assert_close(out["saved.whole.0"], whole[0])
    assert_same_as_python(out, tracer, dict(h1=h1, mlp=mlp, attn_in=attn_in, ln_f_in=ln_f_in, logits=logits))


def test_cpp_inplace_edit_matches_python(cpp_build, gpt2_script, tmp_path):
    net, model_file = gpt2_script
    model = nnsight.NNsight(net)
    ids = ids_of(2)
    with torch.no_grad(), model.trace(ids) as tracer:
        model.transformer.h[0].mlp.output[:, :, 3] = 0
        model.transformer.h[1].output[0][:, 2] = 0
        h1 = model.transformer.h[1].output[0].save()
        mlp0 = model.transformer.h[0].mlp.output.save()
    with torch.no_grad():
        plain = net(ids).logits
    tracer.export(str(tmp_path / "g.fig"))
    out = run_cpp(model_file, tmp_path / "g.fig", [ids], tmp_path)
    assert (h1[:, 2] == 0).all() and (mlp0[:, :, 3] == 0).all()
    assert not torch.allclose(tracer.output.logits, plain)
    assert_same_as_python(out, tracer, dict(h1=h1, mlp0=mlp0))


def test_cpp_swap_matches_python(cpp_build, gpt2_script, tmp_path):
    net, model_file = gpt2_script
    model = nnsight.NNsight(net)
    ids = ids_of(3)
    steer = torch.linspace(-1, 1, 32)
    with torch.no_grad(), model.trace(ids) as tracer:
        model.transformer.h[1].mlp.output = model.transformer.h[1].mlp.output + steer
        model.transformer.h[0].output = (model.transformer.h[0].output[0] * 0.5,)
        model.transformer.h[1].input = model.transformer.h[1].input * 2
        mlp = model.transformer.h[1].mlp.output.save()
        h0 = model.transformer.h[0].output[0].save()
    tracer.export(str(tmp_path / "g.fig"))
    out = run_cpp(model_file, tmp_path / "g.fig", [ids], tmp_path)
    assert_same_as_python(out, tracer, dict(mlp=mlp, h0=h0))


def test_cpp_several_invokes_match_python(cpp_build, gpt2_script, tmp_path):
    net, model_file = gpt2_script
    model = nnsight.NNsight(net)
    a, b = ids_of(4), ids_of(5, rows=2)
    steer = torch.linspace(1, -1, 32)
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(a):
            clean = model.transformer.h[0].output[0][:, 3].save()
            clean_mlp = model.transformer.h[1].mlp.output.save()
        with tracer.invoke(b):
            model.transformer.h[0].output[0][:, 3] = clean
            model.transformer.h[1].mlp.output = model.transformer.h[1].mlp.output + steer
            patched = model.transformer.h[1].output[0].save()
            last = model.output.logits[:, -1].save()
    tracer.export(str(tmp_path / "g.fig"), names={"clean": clean, "clean_mlp": clean_mlp, "patched": patched,
                                                  "last": last})
    out = run_cpp(model_file, tmp_path / "g.fig", [torch.cat([a, b])], tmp_path)
    assert clean_mlp.shape[0] == 1 and patched.shape[0] == 2
    assert_same_as_python(out, tracer, dict(clean=clean, clean_mlp=clean_mlp, patched=patched, last=last))
    # With another batch than the one recorded, the C++ side refuses to guess the rows.
    _C.save_tensors(str(tmp_path / "in2.fit"), [("input.0", b)])
    result = subprocess.run([str(BUILD / "test_torchscript"), "run", str(model_file), "model", str(tmp_path / "g.fig"),
                             str(tmp_path / "in2.fit"), str(tmp_path / "o.fit")], capture_output=True, text=True)
    assert result.returncode == 1 and "batch of 3 rows" in result.stderr


def test_cpp_refuses_an_output_pruned_by_the_tracer(cpp_build, gpt2_script, tmp_path):
    """Recorded with use_cache=True, a block returns (hidden, present); the traced
    model (use_cache=False) passes only hidden: an error, not a silent misread."""
    net, model_file = gpt2_script
    model = nnsight.NNsight(net)
    ids = ids_of(6)
    with torch.no_grad(), model.trace(ids, use_cache=True) as tracer:
        h = model.transformer.h[1].output[0].save()
    tracer.export(str(tmp_path / "g.fig"))
    _C.save_tensors(str(tmp_path / "in.fit"), [("input.0", ids)])
    result = subprocess.run([str(BUILD / "test_torchscript"), "run", str(model_file), "model", str(tmp_path / "g.fig"),
                             str(tmp_path / "in.fit"), str(tmp_path / "o.fit")], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout
    assert "module 'transformer.h.1' holds 3 tensors in Python but 1" in result.stderr
    assert h is not None


# -- export ------------------------------------------------------------------------------------


def test_export_names_saved_values_after_the_block(tmp_path):
    model = nnsight.NNsight(make_tiny())
    with model.trace(torch.rand(1, 5)) as tracer:
        hidden = model.layer1.output.save()
        model.layer2.output.save()  # unnamed: kept, reachable by node in C++
    tracer.export(str(tmp_path / "a.fig"))
    plan = _C.load_plan((tmp_path / "a.fig").read_bytes())
    assert plan.num_nodes >= 2
    assert b"hidden" in (tmp_path / "a.fig").read_bytes()
    with pytest.raises(nnsight.InterventionError, match="names\\['x'\\] is not a value saved"):
        tracer.export(str(tmp_path / "b.fig"), names={"x": torch.zeros(1)})
    assert hidden.shape == (1, 10)


def test_an_empty_trace_exports_an_empty_graph(tmp_path):
    """An empty trace runs the model without a plan; exporting it still works."""
    net = make_tiny()
    model = nnsight.NNsight(net)
    x = torch.rand(1, 5)
    with model.trace(x) as tracer:
        pass
    assert torch.equal(tracer.output, net(x))
    tracer.export(str(tmp_path / "a.fig"))
    assert _C.load_plan((tmp_path / "a.fig").read_bytes()).num_nodes == 0


def test_export_before_the_block_ran_is_an_error(tmp_path):
    model = nnsight.NNsight(make_tiny())
    with model.trace(torch.rand(1, 5)) as tracer:
        with pytest.raises(nnsight.InterventionError, match="after the trace's `with` block has run"):
            tracer.export(str(tmp_path / "a.fig"))


@pytest.mark.python_fallback
def test_export_refuses_python_code_naming_the_line(tmp_path):
    model = nnsight.NNsight(make_tiny())
    with model.trace(torch.rand(1, 5)) as tracer:
        n = nnsight.apply(len, model.layer1.output).save()  # noqa: F841  (len runs natively)
        m = nnsight.apply(lambda v: v.sum(), model.layer1.output).save()  # THE-PYTHON-LINE
    with pytest.raises(nnsight.InterventionError) as info:
        tracer.export(str(tmp_path / "a.fig"))
    message = str(info.value)
    assert "runs Python code" in message and "THE-PYTHON-LINE" in message, message
    assert f"{__file__}:" in message
    assert not (tmp_path / "a.fig").exists()
    assert m is not None


# -- malformed and hostile files -------------------------------------------------------------


def _s(text):
    data = text if isinstance(text, bytes) else text.encode()
    return struct.pack("<I", len(data)) + data


def _tensor(t, nbytes=None, sizes=None):
    t = t.contiguous()
    sizes = list(t.shape) if sizes is None else sizes
    raw = t.numpy().tobytes()
    out = struct.pack("<BI", 6, len(sizes)) + b"".join(struct.pack("<q", s) for s in sizes)
    return out + struct.pack("<Q", len(raw) if nbytes is None else nbytes) + raw


def _ref(i):
    return struct.pack("<Bi", 0, i)


def _const_tensor(t, **kw):
    return struct.pack("<BB", 1, 5) + _tensor(t, **kw)


def _node(op, args=(), name="", site=-1, saved=0, invoker=0, projection=0, line=-1, kwargs=()):
    out = struct.pack("<B", op) + _s(name) + struct.pack("<I", len(args)) + b"".join(args)
    out += struct.pack("<I", len(kwargs)) + b"".join(_s(k) + v for k, v in kwargs)
    return out + struct.pack("<iiiIiBiB", site, 0, -2, 0, invoker, projection, line, saved)


def graph_file(nodes, sites=(("l1", 0),), invokers=((0, 1),), batch=1, lines=(), names=(), structures=(),
               version=2, magic=b"FIGRAPH\x00", counts=None):
    """A graph file written from docs/graph-format.md (independently of the engine's writer)."""
    counts = counts or {}
    out = magic + struct.pack("<Iq", version, batch)
    out += struct.pack("<I", counts.get("invokers", len(invokers))) + b"".join(struct.pack("<qq", *i) for i in invokers)
    out += struct.pack("<I", counts.get("sites", len(sites))) + b"".join(_s(m) + struct.pack("<B", k) for m, k in sites)
    out += struct.pack("<I", len(lines)) + b"".join(_s(x) for x in lines)
    out += struct.pack("<I", counts.get("nodes", len(nodes))) + b"".join(nodes)
    out += struct.pack("<I", len(names)) + b"".join(_s(n) + struct.pack("<i", i) for n, i in names)
    out += struct.pack("<I", len(structures)) + b"".join(struct.pack("<i", i) + s for i, s in structures)
    return out


SITE, SWAP, CALL, GETITEM = 0, 1, 2, 3
VALID = graph_file(
    [_node(SITE, site=0), _node(CALL, [_ref(0), _const_tensor(torch.ones(1, 10))], name="add", saved=1)],
    names=[("h", 1)], structures=[(0, struct.pack("<Bi", 0, 2))],
)


def _nested_tuple_arg(depth):
    arg = _ref(0)
    for _ in range(depth):
        arg = struct.pack("<BI", 2, 1) + arg
    return arg


HOSTILE = {
    "bad magic": (VALID.replace(b"FIGRAPH", b"FIGRAPX", 1), "bad magic"),
    "version 1": (graph_file([], version=1), "unsupported graph file version 1"),
    "version 3": (graph_file([], version=3), "unsupported graph file version 3"),
    "trailing bytes": (VALID + b"\x00", "trailing bytes"),
    "site index out of range": (graph_file([_node(SITE, site=7)]), "bad site index"),
    "negative site index": (graph_file([_node(SITE, site=-5)]), "bad site index"),
    "reference to a later node (a cycle)": (
        graph_file([_node(CALL, [_ref(1)], name="neg"), _node(CALL, [_ref(0)], name="neg")]), "not an earlier node"),
    "reference to itself": (graph_file([_node(CALL, [_ref(0)], name="neg")]), "not an earlier node"),
    "negative reference": (graph_file([_node(CALL, [_ref(-3)], name="neg")]), "not an earlier node"),
    "invoker out of range": (graph_file([_node(SITE, site=0, invoker=4)]), "bad invoker index"),
    "invoker rows outside the batch": (graph_file([], invokers=[(0, 5)], batch=2), "outside the batch"),
    "tensor bytes do not match its shape": (
        graph_file([_node(CALL, [_const_tensor(torch.ones(2, 3), nbytes=4)], name="neg")]), "byte count"),
    "tensor shape larger than its bytes": (
        graph_file([_node(CALL, [_const_tensor(torch.ones(2), sizes=[1 << 20, 1 << 20])], name="neg")]),
        "byte count"),
    "tensor size overflows": (
        graph_file([_node(CALL, [_const_tensor(torch.ones(1), sizes=[1 << 62, 1 << 62, 16])], name="neg")]),
        "overflows"),
    "negative tensor size": (
        graph_file([_node(CALL, [_const_tensor(torch.ones(1), sizes=[-1])], name="neg")]), "negative tensor size"),
    "huge node count": (graph_file([], counts={"nodes": 0xFFFFFFFF}), "exceeds the file's size"),
    "huge site count": (graph_file([], counts={"sites": 0x7FFFFFFF}), "exceeds the file's size"),
    "unknown op": (graph_file([_node(200)]), "unknown op"),
    "arguments nested too deeply": (graph_file([_node(SITE, site=0), _node(CALL, [_nested_tuple_arg(200)], name="neg")]),
                                    "nested too deeply"),
    "swap of a non-site": (graph_file([_node(CALL, [], name="neg"), _node(SWAP, [_ref(0), _ref(0)])]),
                           "must target a site"),
    "name of an unsaved node": (graph_file([_node(SITE, site=0)], names=[("x", 0)]), "not saved"),
    "name of a missing node": (graph_file([_node(SITE, site=0, saved=1)], names=[("x", 3)]), "out of range"),
    "name given twice": (graph_file([_node(SITE, site=0, saved=1)], names=[("x", 0), ("x", 0)]), "given twice"),
    "structure of a missing site": (graph_file([], structures=[(3, struct.pack("<Bi", 0, 2))]), "distinct sites"),
    "structure nested too deeply": (
        graph_file([], structures=[(0, struct.pack("<BI", 2, 1) * 100 + struct.pack("<Bi", 0, 2))]), "too deeply"),
    "structure rank out of range": (graph_file([], structures=[(0, struct.pack("<Bi", 0, 1000))]), "rank"),
    # Strings must be UTF-8 (Python would raise UnicodeDecodeError on them, not the loader's error).
    "an op name that is not UTF-8": (graph_file([_node(CALL, [], name=b"ne\xffg")]), "not valid UTF-8"),
    "a module path with an overlong form": (graph_file([], sites=[(b"l\xc0\xaf", 0)]), "not valid UTF-8"),
    "a line with a surrogate": (graph_file([], lines=[b"x = \xed\xa0\x80"]), "not valid UTF-8"),
    "a string cut inside a character": (graph_file([], lines=[b"h\xc3"]), "not valid UTF-8"),
    "a code point past U+10FFFF": (graph_file([], lines=[b"\xf4\x90\x80\x80"]), "not valid UTF-8"),
}


def test_a_valid_hand_written_file_loads():
    assert _C.load_plan(VALID).num_nodes == 2


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_graph_files_are_errors(case):
    data, message = HOSTILE[case]
    with pytest.raises(ValueError, match=message):
        _C.load_plan(data)


def test_a_string_that_is_not_utf8_is_reported_at_its_byte():
    data = graph_file([_node(CALL, [], name=b"ne\xffg")])
    with pytest.raises(ValueError, match=r"at byte (\d+): a string is not valid UTF-8") as info:
        _C.load_plan(data)
    offset = int(re.search(r"at byte (\d+)", str(info.value)).group(1))
    assert data[offset] == 0xFF


def test_every_truncation_is_an_error():
    for cut in range(len(VALID)):
        with pytest.raises(ValueError):
            _C.load_plan(VALID[:cut])


def test_cpp_program_rejects_hostile_files_without_crashing(cpp_build, tmp_path):
    """A C++ program (no Python) loading each hostile file: an error naming the reason."""
    paths = []
    for i, case in enumerate(sorted(HOSTILE)):
        paths.append(tmp_path / f"{i}.fig")
        paths[-1].write_bytes(HOSTILE[case][0])
    (tmp_path / "valid.fig").write_bytes(VALID)
    result = subprocess.run([str(BUILD / "test_torchscript"), "load", *map(str, paths), str(tmp_path / "valid.fig")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(paths) + 1, result.stdout
    for case, line in zip(sorted(HOSTILE), lines):
        assert ": error: " in line and HOSTILE[case][1] in line, (case, line)
    assert lines[-1].endswith("valid.fig: ok (2 nodes)"), lines[-1]


# -- the CMake package -------------------------------------------------------------------------


def _printed(text, marker):
    """{"name (shape)": [numbers]} from the example's lines starting with `marker`."""
    out = {}
    for line in text.splitlines():
        if line.startswith(marker):
            head, _, numbers = line[len(marker):].replace("[", " ").replace("]", " ").partition(" sum ")
            if not numbers:
                head, _, numbers = head.partition(" prompt ")
            out[head.strip()] = [float(x) for x in numbers.replace(",", " ").split()]
    assert out, text
    return out


def test_installed_package_builds_and_runs_the_example(cpp_build, tmp_path):
    """`cmake --install` to a prefix; examples/cpp finds it with find_package and runs
    the files examples/cpp/make_files.py writes."""
    pytest.importorskip("transformers")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    prefix, build = tmp_path / "prefix", tmp_path / "build"

    def run(cmd):
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    run([_tool("cmake"), "--install", cpp_build, "--prefix", prefix])
    assert (prefix / "include" / "fastinterleave" / "torchscript.h").exists()
    config = list(prefix.glob("lib*/cmake/fastinterleave/fastinterleaveConfig.cmake"))
    assert config, "fastinterleaveConfig.cmake not installed"
    run([_tool("cmake"), "-S", ROOT / "examples" / "cpp", "-B", build, "-G", "Ninja", f"-DCMAKE_PREFIX_PATH={prefix}",
         "-DCMAKE_BUILD_TYPE=Release"])
    run([_tool("cmake"), "--build", build])
    files = tmp_path / "files"
    python_out = run([sys.executable, ROOT / "examples" / "cpp" / "make_files.py", files])
    cpp_out = run([build / "steer", files / "gpt2.pt", files / "steer.fig"])
    # The C++ program prints what the Python run gave.
    cpp, python = _printed(cpp_out, "c++:    "), _printed(python_out, "python: ")
    assert sorted(cpp) == sorted(python), cpp_out
    for key, numbers in python.items():
        assert cpp[key] == pytest.approx(numbers, rel=1e-4, abs=1e-5), (key, cpp_out)
    ldd = run(["ldd", build / "steer"])
    assert "libfastinterleave_engine" in ldd and str(prefix) in ldd and "libpython" not in ldd
