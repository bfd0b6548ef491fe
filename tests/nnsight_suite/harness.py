"""Fetch nnsight 0.4.11's own tests, adapt them, run them under nnsight and fastinterleave.

1. ``fetch_sdist()``: ``pip download --no-deps --no-binary :all: nnsight==0.4.11`` into
   ``<repo>/.cache/nnsight-sdist/`` (git-ignored; reused once there, checked by sha256).
2. ``adapt()``: the rewrites listed in ``REWRITES`` below, and nothing else. Every rewrite
   keeps line numbers. ``check_adapted()`` proves it: every function of the original file
   other than the two internals helpers (``INTERNAL_DEFS``) has the same syntax tree after
   the rewrites once the documented rewrites are applied to the original's tree too, so no
   assertion, no ``pytest.raises`` and no line of a test body is changed.
3. ``build_tiny_gpt2()``: the stand-in for ``openai-community/gpt2`` -- a GPT-2 with
   random weights (768 wide, as ``test_other_device_tensors`` builds ``Linear(768, 768)``
   for it; 8 layers, as the tests read ``h[5]``, ``h[6]``, ``h[-1]``) and a byte-level BPE
   tokenizer trained here on a few sentences, written with ``save_pretrained`` to a
   directory that replaces the hub id.
4. ``run()``: pytest in two subprocesses at once -- ``impl="nnsight"`` (nnsight 0.4.11, the
   reference) and ``impl="fastinterleave"`` -- over the same adapted test bodies and the same
   model directory; per-test outcomes from ``--junitxml``; every value a test ``.save()``s,
   recorded by ``capture.py`` (a pytest plugin) for comparison.
"""

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

VERSION = "0.4.11"
SDIST = f"nnsight-{VERSION}.tar.gz"
# sha256 of the sdist PyPI serves (pip checks it against the index; this pins it).
SDIST_SHA256 = "887acfdad2c92a1babe26503261d1e0b67fa4cc5357f4b2e29099c6da199f5cb"
REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "nnsight-sdist"
# Files taken from the sdist: path in the run directory -> path in the sdist.
FILES = {
    "pytest.ini": f"nnsight-{VERSION}/pytest.ini",
    "conftest.py": f"nnsight-{VERSION}/conftest.py",
    "tests/__init__.py": f"nnsight-{VERSION}/tests/__init__.py",
    "tests/test_tiny.py": f"nnsight-{VERSION}/tests/test_tiny.py",
    "tests/test_lm.py": f"nnsight-{VERSION}/tests/test_lm.py",
}
TEST_FILES = ("tests/test_tiny.py", "tests/test_lm.py")
HUB_MODEL = "openai-community/gpt2"
IMPLS = ("nnsight", "fastinterleave")

# The rewrites, all of them (applied by `adapt`, checked by `check_adapted`).
REWRITES = (
    ("import nnsight", "import fastinterleave as nnsight (fastinterleave run only)"),
    ("from nnsight import X / from nnsight.util import X",
     "from fastinterleave import X / from fastinterleave.util import X (fastinterleave run only)"),
    ("from nnsight.tracing... / nnsight.intervention... / nnsight.schema... import X",
     "removed (fastinterleave run only): nnsight's internals (graph, backends, protocols, "
     "tracing contexts, remote-request schema)"),
    ("class AssertSavedLenBackend(Backend)",
     "removed, and every `backend=AssertSavedLenBackend(N)` argument with it (both runs): a "
     "custom nnsight Backend that executes nnsight's graph itself and asserts how many of its "
     "nodes are done (graph.nodes, node.done) -- nnsight internals; fastinterleave takes no "
     "backend (it raises 'not supported'). What else it did, not injecting saved values into "
     "the caller's frame (the tests then read `proxy.value`), is kept: capture.py sets "
     "CONFIG.APP.FRAME_INJECTION = False while a test that passed it runs"),
    ("def _test_serialize(tracer)",
     "does nothing (both runs): it serializes nnsight's graph into its remote-execution "
     "request schema (RequestModel, GlobalTracingContext, tracer.graph.stack) and back -- "
     "nnsight internals; fastinterleave has no remote execution"),
    ('"openai-community/gpt2"', "the directory of a tiny local GPT-2 (both runs)"),
)
INTERNAL_MODULES = ("nnsight.tracing", "nnsight.intervention", "nnsight.schema")
INTERNAL_DEFS = ("AssertSavedLenBackend", "_test_serialize")


class SdistUnavailable(RuntimeError):
    """pip could not download the sdist (no network, no index)."""


# -- 1. the sdist ---------------------------------------------------------------------------


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fetch_sdist(cache=CACHE, timeout=600):
    """The sdist's path in the cache, downloaded with pip the first time."""
    path = Path(cache) / SDIST
    if path.exists() and _sha256(path) == SDIST_SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", f"nnsight=={VERSION}", "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SdistUnavailable(f"`{' '.join(cmd)}` ran past {timeout} s") from None
        got = Path(tmp) / SDIST
        if proc.returncode != 0 or not got.exists():
            tail = (proc.stdout + proc.stderr).strip()[-2000:]
            raise SdistUnavailable(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
        if _sha256(got) != SDIST_SHA256:
            raise RuntimeError(f"{SDIST} from pip has sha256 {_sha256(got)}, expected {SDIST_SHA256}")
        os.replace(got, path)
    return path


def read_sources(sdist):
    """The files of FILES, as text, by their run-directory paths."""
    with tarfile.open(sdist) as tar:
        return {name: tar.extractfile(member).read().decode() for name, member in FILES.items()}


# -- 2. the rewrites ------------------------------------------------------------------------


def _is_internal(module):
    return any(module == m or module.startswith(m + ".") for m in INTERNAL_MODULES)


def _blank_def(lines, node, keep_signature):
    """Blanks a top-level def's lines (decorators included); a function keeps a first line
    `def name(*args, **kwargs): pass`."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    for i in range(first, node.end_lineno):
        lines[i] = ""
    lines[first] = f"# removed: {node.name} (nnsight internals; see harness.REWRITES)"
    if keep_signature:
        lines[first] = f"def {node.name}(*args, **kwargs): pass  # nnsight internals (see harness.REWRITES)"


_BACKEND_ARG = (
    re.compile(r",\s*backend=AssertSavedLenBackend\(\d+\)"),  # f(x, backend=...)
    re.compile(r"backend=AssertSavedLenBackend\(\d+\)(,\s*)?"),  # f(backend=...) / f(backend=..., x)
)


def adapt(text, impl, model_dir):
    """The adapted test file (`impl`: "nnsight" or "fastinterleave"), same line count."""
    assert impl in IMPLS, impl
    tree = ast.parse(text)
    lines = text.split("\n")
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in INTERNAL_DEFS:
            _blank_def(lines, node, keep_signature=isinstance(node, ast.FunctionDef))
    for node in ast.walk(tree):
        if impl != "fastinterleave" or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        i = node.lineno - 1
        assert node.end_lineno == node.lineno, ("one-line imports only", lines[i])
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            if "nnsight" in names:
                assert names == ["nnsight"] and node.names[0].asname is None, lines[i]
                lines[i] = lines[i].replace("import nnsight", "import fastinterleave as nnsight")
            else:
                assert not any(n.startswith("nnsight.") for n in names), lines[i]
        elif node.module and (node.module == "nnsight" or node.module.startswith("nnsight.")):
            if _is_internal(node.module):
                lines[i] = "# removed (nnsight internals): " + lines[i]
            else:
                lines[i] = lines[i].replace(f"from {node.module} ", f"from fast{node.module.replace('nnsight', 'interleave', 1)} ", 1)
    out = []
    for line in lines:
        for pattern in _BACKEND_ARG:
            line = pattern.sub("", line)
        out.append(line.replace(repr(HUB_MODEL).replace("'", '"'), f'"{model_dir}"'))
    return "\n".join(out)


class _Normalize(ast.NodeTransformer):
    """The documented rewrites, on the original's tree (for check_adapted)."""

    def __init__(self, impl, model_dir):
        self.impl, self.model_dir = impl, str(model_dir)

    def visit_Call(self, node):
        self.generic_visit(node)
        node.keywords = [k for k in node.keywords
                         if not (k.arg == "backend" and isinstance(k.value, ast.Call)
                                 and getattr(k.value.func, "id", None) == "AssertSavedLenBackend")]
        return node

    def visit_Constant(self, node):
        if node.value == HUB_MODEL:
            return ast.copy_location(ast.Constant(self.model_dir), node)
        return node

    def visit_ImportFrom(self, node):
        if self.impl == "fastinterleave" and node.module and node.module.startswith("nnsight."):
            node.module = "fastinterleave." + node.module[len("nnsight."):]
        return node


def check_adapted(original, adapted, impl, model_dir):
    """Raises AssertionError unless `adapted` differs from `original` only by REWRITES."""
    assert original.count("\n") == adapted.count("\n"), "a rewrite changed the line count"
    names = {n.id for n in ast.walk(ast.parse(adapted)) if isinstance(n, ast.Name)}
    assert "AssertSavedLenBackend" not in names, "a backend=AssertSavedLenBackend(...) is left"
    if impl == "fastinterleave":
        assert not re.search(r"^\s*(import nnsight|from nnsight[ .])", adapted, re.M), "an nnsight import is left"
    before = {n.name: n for n in ast.parse(original).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    after = {n.name: n for n in ast.parse(adapted).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert set(before) - set(INTERNAL_DEFS) == set(after) - set(INTERNAL_DEFS), "definitions differ"
    normalize = _Normalize(impl, model_dir)
    for name, node in before.items():
        if name in INTERNAL_DEFS:
            continue
        want = normalize.visit(node)
        got = after[name]
        assert ast.dump(want) == ast.dump(got), f"the rewrites changed {name} beyond what REWRITES says"
        assert _lines(want) == _lines(got), f"the rewrites moved lines of {name}"


def _lines(node):
    return [(type(n).__name__, getattr(n, "lineno", None)) for n in ast.walk(node)]


# -- 3. the stand-in model ------------------------------------------------------------------

# Text the tokenizer is trained on: the tests' prompts and a few sentences, so that each
# word is one token ("Madison Square Garden is located in the city of" and
# "_ _ _ _ _ _ _ _ _" are 9 tokens each, as with GPT-2's tokenizer: test_embeddings_set2
# swaps the first one's embeddings into the second).
CORPUS = [
    "Madison Square Garden is located in the city of New York City",
    "_ _ _ _ _ _ _ _ _ New York City",
    "The Eiffel Tower is in the city of Paris",
    "Hello world. Hello World. Hello fish, a b.",
    "The cat sat on the mat in the middle of the city centre.",
    "A dog ran to a tower, located in a garden by the square.",
]
EOS = "<|endoftext|>"


def build_tiny_gpt2(directory, seed=0):
    """Writes the tiny GPT-2 (random weights) and its tokenizer to `directory`."""
    import warnings

    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(CORPUS * 4, trainer)
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tk, bos_token=EOS, eos_token=EOS, unk_token=EOS,
            model_input_names=["input_ids", "attention_mask"])
        for prompt in ("Madison Square Garden is located in the city of", "_ _ _ _ _ _ _ _ _"):
            assert len(tokenizer(prompt)["input_ids"]) == 9, (prompt, tokenizer.tokenize(prompt))
        eos = tk.token_to_id(EOS)
        config = transformers.GPT2Config(
            vocab_size=tk.get_vocab_size(), n_positions=64, n_embd=768, n_layer=8, n_head=12,
            n_inner=128, bos_token_id=eos, eos_token_id=eos,
        )
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config).eval()
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return Path(directory)


# -- 4. the runs ----------------------------------------------------------------------------


@dataclass
class Outcome:
    outcome: str  # passed / failed / error / skipped
    message: str = ""  # the exception's one-line message (pytest's junit "message")
    details: str = ""  # the traceback
    values: object = None  # what capture.py recorded: [saved value, ...] or None


@dataclass
class Run:
    impl: str
    directory: Path
    returncode: int
    seconds: float
    output: str
    tests: dict = field(default_factory=dict)  # "test_lm::test_save" -> Outcome
    collection_errors: dict = field(default_factory=dict)  # junit name -> message


def uses_custom_backend(sources):
    """The tests ("module::test") that pass backend=AssertSavedLenBackend(...)."""
    names = set()
    for name in TEST_FILES:
        module = Path(name).stem
        for node in ast.parse(sources[name]).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                if "AssertSavedLenBackend" in ast.unparse(node):
                    names.add(f"{module}::{node.name}")
    return names


def write_suite(sources, impl, directory, model_dir):
    """The adapted run directory of `impl`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "no_injection.txt").write_text("\n".join(sorted(uses_custom_backend(sources))) + "\n")
    for name, text in sources.items():
        if name in TEST_FILES:
            adapted = adapt(text, impl, model_dir)
            check_adapted(text, adapted, impl, model_dir)
            text = adapted
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    shutil.copy(Path(__file__).with_name("capture.py"), directory / "_nnsight_suite_capture.py")
    return directory


def _command():
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "_nnsight_suite_capture",
            "-c", "pytest.ini", "--rootdir", ".", "--device", "cpu", "--junitxml", "junit.xml",
            "-vv", "--tb=short", *TEST_FILES]  # -vv: whole strings in assertion messages


def _env(impl, directory):
    # No PYTEST_* (options of the outer run) and no FASTINTERLEAVE_* (the outer suite's modes,
    # e.g. FASTINTERLEAVE_NO_FALLBACK: nnsight's tests need the Python fallback).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "FASTINTERLEAVE_"))}
    env.update(NNSIGHT_SUITE_IMPL=impl, NNSIGHT_SUITE_VALUES=str(Path(directory) / "values"),
               NNSIGHT_SUITE_NO_INJECTION=str(Path(directory) / "no_injection.txt"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _parse(run):
    import torch

    root = ET.parse(run.directory / "junit.xml").getroot()
    for case in root.iter("testcase"):
        module = case.get("classname", "").rpartition(".")[2]
        name = case.get("name", "").split("[")[0]
        if not module:  # a collection error: classname "", name "tests.test_lm"
            err = case.find("error")
            run.collection_errors[case.get("name")] = "" if err is None else (err.get("message") or "")
            continue
        key = f"{module}::{name}"
        outcome = Outcome("passed")
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = Outcome({"failure": "failed"}.get(tag, tag), el.get("message") or "", el.text or "")
                break
        values = run.directory / "values" / f"{key.replace('::', '__')}.pt"
        if values.exists():
            outcome.values = torch.load(values, weights_only=False)
        run.tests[key] = outcome
    return run


def run(sdist, workdir, impls=IMPLS, timeout=600):
    """Writes the model and the adapted suites under `workdir`, runs them (at once) and
    returns {impl: Run}."""
    workdir = Path(workdir)
    model_dir = build_tiny_gpt2(workdir / "tiny-gpt2")
    sources = read_sources(sdist)
    procs = {}
    for impl in impls:
        directory = write_suite(sources, impl, workdir / impl, model_dir)
        procs[impl] = (directory, time.monotonic(), subprocess.Popen(
            _command(), cwd=directory, env=_env(impl, directory), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    runs = {}
    for impl, (directory, start, proc) in procs.items():
        try:
            output, _ = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            raise RuntimeError(f"the {impl} run of nnsight's tests ran past {timeout} s:\n{output[-5000:]}")
        runs[impl] = Run(impl, directory, proc.returncode, time.monotonic() - start, output)
        if not (directory / "junit.xml").exists():
            raise RuntimeError(f"the {impl} run of nnsight's tests wrote no report (exit "
                               f"{proc.returncode}):\n{output[-5000:]}")
        _parse(runs[impl])
    return runs


# -- comparing saved values -----------------------------------------------------------------


def values_differ(a, b, rtol=1e-4, atol=1e-5, path="saved"):
    """None if the recorded values `a` (nnsight) and `b` (fastinterleave) match, else why not."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if a.is_floating_point():
            ok = torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
        else:
            ok = torch.equal(a, b)
        return None if ok else f"{path}: values differ (max |diff| {(a.double() - b.double()).abs().max().item():.3g})"
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            why = values_differ(x, y, rtol, atol, f"{path}[{i}]")
            if why:
                return why
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            why = values_differ(a[k], b[k], rtol, atol, f"{path}[{k!r}]")
            if why:
                return why
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def normalize_message(message):
    """A failure message with what differs between runs (addresses, run directories) masked."""
    message = re.sub(r"0x[0-9a-fA-F]+", "0x…", message)
    return re.sub(r"/\S*/(nnsight|fastinterleave)/", "<run>/", message).strip()
