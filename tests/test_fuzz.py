"""Fuzz: hypothesis-generated intervention programs against plain PyTorch hooks.

A program is data: invokes (each with its own batch rows), and in each invoke a list of
operations on module sites — saves of `.output` / `.input` (a copy or the value itself),
in-place edits of a slice (`= c`, `*= c`), swaps (`m.output = m.output * c + d`), reads
kept in a variable and used by a later invoke's (or the same invoke's) edit (clean →
corrupted patching), iteration-specific accesses (`.iter[k]`, `.next()`, `with .all()`)
on a module called three times per forward, and `tracer.stop()`. It runs twice: rendered
as Python source and executed under fastinterleave, and interpreted by the reference
below — forward hooks and pre-hooks registered by hand on a second copy of the model,
running each site's operations in program order on that invoke's rows of the batch.
Every saved value is compared; a value saved after a stop must be unset (ValueError).

Programs are restricted to those whose meaning is unambiguous: within an invoke, the
sites accessed are in forward order; a patch reads a site at or before the one it
edits; a stop is in the last invoke, after its access of the latest site accessed before
the stop (in any invoke), and followed only by accesses of later sites. A second test
appends an invoke that reads a site, accesses a later one, then edits the value read (a
dead edit) and expects `InterventionError`. Reproducers of the bugs the fuzzing found
(fixed) are at the end.

Sizes: FASTINTERLEAVE_FUZZ=ci (default; bounded, derandomized) or =nightly (5000
examples per test, random); FASTINTERLEAVE_FUZZ_EXAMPLES=N overrides the count.
"""

import itertools
import linecache
import os
import tempfile
from typing import NamedTuple, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from torch.testing import assert_close

import fastinterleave as nnsight
from conftest import assert_hooks_idle, loop_with, make_gpt2, make_loop, make_tiny
from fastinterleave import InterventionError


# -- settings -------------------------------------------------------------------------------

# Hypothesis keeps caches (and, unless disabled, its example database) in ./.hypothesis:
# keep them out of the repository.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "fastinterleave-hypothesis"))

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,  # nothing written into the repository
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "nightly",
    max_examples=5000,
    deadline=None,
    database=None,
    print_blob=True,  # a failure prints @reproduce_failure(...) to replay it
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = os.environ.get("FASTINTERLEAVE_FUZZ", "ci")
if PROFILE not in ("ci", "nightly"):
    raise ValueError(f"FASTINTERLEAVE_FUZZ={PROFILE!r}: expected 'ci' or 'nightly'")


def fuzz_settings(ci_examples):
    """The profile's settings; in CI, `ci_examples` examples (the models differ in cost)."""
    examples = os.environ.get("FASTINTERLEAVE_FUZZ_EXAMPLES")
    if examples:
        n = int(examples)
    elif PROFILE == "ci":
        n = ci_examples
    else:
        n = settings.get_profile("nightly").max_examples
    return settings(settings.get_profile(PROFILE), max_examples=n)


# -- models and their sites -----------------------------------------------------------------


class Site(NamedTuple):
    name: str  # label, e.g. "layer1.output", "lin.output@1"
    pos: int  # forward order
    path: str  # module path ("" is the root)
    envoy: str  # its envoy expression in the program
    kind: str  # "input" | "output"
    call: int  # which call of the module
    proj: bool  # the value is output[0] (a GPT-2 block's tuple)
    width: int  # last dimension
    repeated: bool  # the module is called several times (the iteration API applies)


def _sites(rows):
    return [Site(name, pos, *rest) for pos, (name, *rest) in enumerate(rows)]


class Spec(NamedTuple):
    name: str
    make: object  # () -> module (called twice: the traced copy and the reference copy)
    sites: list
    seq: int  # positions per row (0: 2-D values)
    make_input: object  # (rows, generator) -> tensor
    dead: list  # (edited site, later site): the edit after the access is dead


TINY_SITES = _sites([
    ("layer1.input", "layer1", "model.layer1", "input", 0, False, 5, False),
    ("layer1.output", "layer1", "model.layer1", "output", 0, False, 10, False),
    ("layer2.input", "layer2", "model.layer2", "input", 0, False, 10, False),
    ("layer2.output", "layer2", "model.layer2", "output", 0, False, 2, False),
    ("output", "", "model", "output", 0, False, 2, False),
])

LOOP_SITES = _sites(
    [row for k in range(3) for row in (
        (f"lin.input@{k}", "lin", "model.lin", "input", k, False, 4, True),
        (f"lin.output@{k}", "lin", "model.lin", "output", k, False, 4, True),
    )]
    + [
        ("out.input", "out", "model.out", "input", 0, False, 4, False),
        ("out.output", "out", "model.out", "output", 0, False, 1, False),
        ("output", "", "model", "output", 0, False, 1, False),
    ]
)

E = 32  # make_gpt2's width
GPT2_SITES = _sites(
    [row for k in range(2) for row in (
        (f"h{k}.input", f"transformer.h.{k}", f"model.transformer.h[{k}]", "input", 0, False, E, False),
        (f"h{k}.mlp.output", f"transformer.h.{k}.mlp", f"model.transformer.h[{k}].mlp", "output", 0,
         False, E, False),
        (f"h{k}.output[0]", f"transformer.h.{k}", f"model.transformer.h[{k}]", "output", 0, True, E,
         False),
    )]
    + [
        ("ln_f.output", "transformer.ln_f", "model.transformer.ln_f", "output", 0, False, E, False),
        ("lm_head.output", "lm_head", "model.lm_head", "output", 0, False, 100, False),
    ]
)


def _dead(sites, pairs):
    by = {s.name: s for s in sites}
    return [(by[a], by[b]) for a, b in pairs]


SPECS = {
    "tiny": Spec(
        "tiny", lambda: make_tiny(), TINY_SITES, 0,
        lambda n, g: torch.rand(n, 5, generator=g),
        _dead(TINY_SITES, [("layer1.input", "layer1.output"), ("layer1.input", "layer2.output"),
                           ("layer1.output", "layer2.output"), ("layer2.input", "layer2.output")]),
    ),
    "loop": Spec(
        "loop", make_loop, LOOP_SITES, 0,
        lambda n, g: torch.rand(n, 4, generator=g),
        _dead(LOOP_SITES, [("lin.input@0", "lin.output@0"), ("lin.output@0", "lin.output@1"),
                           ("lin.input@1", "lin.output@2"), ("lin.output@1", "out.output"),
                           ("lin.output@2", "out.output"), ("out.input", "out.output")]),
    ),
    "gpt2": Spec(
        "gpt2", lambda: make_gpt2(), GPT2_SITES, 4,
        lambda n, g: torch.randint(0, 100, (n, 4), generator=g),
        _dead(GPT2_SITES, [("h0.input", "h0.mlp.output"), ("h0.mlp.output", "h0.output[0]"),
                           ("h0.output[0]", "h1.mlp.output"), ("h0.mlp.output", "h1.output[0]"),
                           ("h1.input", "h1.output[0]"), ("h1.output[0]", "lm_head.output"),
                           ("ln_f.output", "lm_head.output")]),
    ),
}


# -- programs -------------------------------------------------------------------------------


class Op(NamedTuple):
    """One operation. kind: save | read | edit | swap | patch | all | stop."""

    kind: str
    site: Optional[Site] = None
    via: str = ""  # "iter" (.iter[k]) or "next" (.next() to call k) on a repeated module
    index: tuple = ()  # the edited slice: ("col", j) | ("pos", p) | ("pj", p, j)
    mode: str = ""  # edit: "set" | "mul"; save: "clone" | "raw"
    c: float = 0.0
    d: float = 0.0
    var: int = -1  # read: the variable it binds; patch: the one it reads; edit: the one edited
    src_row: Optional[int] = None  # patch: the source row (None: all rows, as many as the target)
    src_index: tuple = ()  # patch: the slice read from the variable (same form as `index`)

    def __repr__(self):
        fields = [f"{k}={v!r}" for k, v in self._asdict().items()
                  if k not in ("kind", "site") and v != Op._field_defaults[k]]
        site = [self.site.name] if self.site else []
        return f"{self.kind}({', '.join(site + fields)})"

    def first(self):
        return self.site.pos

    def last(self, spec):
        if self.kind == "all":
            return max(s.pos for s in spec.sites if s.path == self.site.path and s.kind == "output")
        return self.site.pos


class Program(NamedTuple):
    spec: str
    rows: tuple  # batch rows of each invoke
    invokes: tuple  # one tuple of Ops per invoke
    implicit: bool  # a single invoke written as model.trace(x)
    seed: int

    def ops(self):
        """(invoke, op) in program order."""
        return [(i, op) for i, ops in enumerate(self.invokes) for op in ops]


CONSTS = [0.0, -1.0, 0.5, 2.0, 3.25]


def _index(draw, spec, site):
    if not spec.seq:
        return ("col", draw(st.integers(0, site.width - 1)))
    if draw(st.booleans()):
        return ("pos", draw(st.integers(0, spec.seq - 1)))
    return ("pj", draw(st.integers(0, spec.seq - 1)), draw(st.integers(0, site.width - 1)))


def _same_form(draw, spec, site, index):
    """A slice of `site` of the same shape as `index` of a site of the same width."""
    if index[0] == "col":
        return ("col", draw(st.integers(0, site.width - 1)))
    if index[0] == "pos":
        return ("pos", draw(st.integers(0, spec.seq - 1)))
    return ("pj", draw(st.integers(0, spec.seq - 1)), draw(st.integers(0, site.width - 1)))


@st.composite
def programs(draw, spec, stop=True, max_invokes=3, max_ops=6):
    n_inv = draw(st.integers(1, max_invokes))
    rows = tuple(draw(st.integers(1, 3)) for _ in range(n_inv))
    implicit = n_inv == 1 and draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    variables = []  # (var, site, invoke)
    invokes = []
    final = spec.sites[-1]
    for i in range(n_inv):
        ops = []
        low = 0  # sites are accessed in forward order within an invoke
        editable = {}  # variables of this invoke still holding their site's value (no swap since)
        for _ in range(draw(st.integers(0, max_ops))):
            sites = [s for s in spec.sites if s.pos >= low]
            kinds = ["save", "read", "edit", "swap"]
            sources = [v for v in variables if v[2] <= i]
            if sources:
                kinds.append("patch")
            if any(s.repeated and s.kind == "output" and s.call == 0 for s in sites):
                kinds.append("all")
            kind = draw(st.sampled_from(kinds))
            if kind == "all":
                site = next(s for s in sites if s.repeated and s.kind == "output" and s.call == 0)
                op = Op("all", site, index=_index(draw, spec, site),
                        mode=draw(st.sampled_from(["set", "mul"])), c=draw(st.sampled_from(CONSTS)))
            else:
                if kind == "swap":
                    sites = [s for s in sites if not s.proj]
                if kind == "patch":
                    sites = [s for s in sites if any(v[1].width == s.width and v[1].pos <= s.pos
                                                     for v in sources)]
                    if not sites:
                        continue
                site = draw(st.sampled_from(sites))
                via = draw(st.sampled_from(["iter", "next"])) if site.repeated else ""
                if kind == "save":
                    op = Op("save", site, via, mode=draw(st.sampled_from(["clone", "raw"])))
                elif kind == "read":
                    op = Op("read", site, via, var=len(variables))
                    editable[len(variables)] = site
                    variables.append((len(variables), site, i))
                elif kind == "edit":
                    # Through the site, or through a variable holding it read in this
                    # invoke with no later site accessed since (else the edit is dead).
                    held = [v for v, s in editable.items() if s == site and s.pos == low]
                    var = draw(st.sampled_from([-1] + held)) if held else -1
                    op = Op("edit", site, via, _index(draw, spec, site), var=var,
                            mode=draw(st.sampled_from(["set", "mul"])), c=draw(st.sampled_from(CONSTS)))
                elif kind == "swap":
                    op = Op("swap", site, via, c=draw(st.sampled_from(CONSTS)),
                            d=draw(st.sampled_from(CONSTS)))
                    editable = {v: s for v, s in editable.items() if s != site}
                else:
                    var, src, inv = draw(st.sampled_from(
                        [v for v in sources if v[1].width == site.width and v[1].pos <= site.pos]))
                    index = _index(draw, spec, site)
                    same_rows = rows[inv] == rows[i]
                    src_row = (None if same_rows and draw(st.booleans())
                               else draw(st.integers(0, rows[inv] - 1)))
                    op = Op("patch", site, via, index, var=var, src_row=src_row,
                            src_index=_same_form(draw, spec, src, index))
            ops.append(op)
            low = op.first()
        invokes.append(ops)
    # The last invoke saves the model's output.
    invokes[-1].append(Op("save", final, mode="raw"))
    # No stop after a `with .all()` block: nodes recorded after a repeating access belong
    # to its body in nnsight 0.4.11 (a stop there ends the pass at the first call).
    if stop and not any(op.kind == "all" for ops in invokes for op in ops) and draw(st.booleans()):
        # tracer.stop() in the last invoke ends the forward pass once the sites of all
        # operations before it are reached, provided that the last invoke itself
        # accesses the latest of them before the stop: nnsight's walk (which
        # fastinterleave follows) runs a stop as soon as the nodes recorded between the
        # access that started it and the stop are done, so a stop after accesses of
        # early sites only would end the pass before earlier invokes' later sites.
        before = [op for ops in invokes[:-1] for op in ops]
        last = invokes[-1]
        spots = []
        for k in range(len(last) + 1):
            point = max((op.last(spec) for op in before + last[:k]), default=-1)
            if point != -1 and not any(op.last(spec) == point for op in last[:k]):
                continue
            if all(op.first() > point for op in last[k:]):
                spots.append(k)
        if spots:
            k = draw(st.sampled_from(spots))
            last.insert(k, Op("stop"))
    return Program(spec.name, rows, tuple(map(tuple, invokes)), implicit, seed)


# -- rendering: the program as fastinterleave code ------------------------------------------


def _slice(index):
    if index[0] == "col":
        return f"[:, {index[1]}]"
    if index[0] == "pos":
        return f"[:, {index[1]}]"
    return f"[:, {index[1]}, {index[2]}]"


def _src_slice(row, index):
    head = ":" if row is None else str(row)
    return f"[{head}, {', '.join(map(str, index[1:]))}]"


def render(program):
    """Python source of `run(model, inputs, saved)`, which records and runs the program."""
    lines = ["def run(model, inputs, saved):"]
    if program.implicit:
        lines.append("    with model.trace(inputs[0]) as tracer:")
        pad = " " * 8
    else:
        lines.append("    with model.trace() as tracer:")
        pad = " " * 12
    n = 0
    for i, ops in enumerate(program.invokes):
        if not program.implicit:
            lines.append(f"        with tracer.invoke(inputs[{i}]):")
        cursor = {}  # .next() state, per invoke

        def envoy(op):
            site = op.site
            if not site.repeated:
                return site.envoy
            if op.via == "iter":
                return f"{site.envoy}.iter[{site.call}]"
            at = cursor.get(site.path, 0)
            assert site.call >= at
            for _ in range(site.call - at):
                lines.append(f"{pad}{site.envoy}.next()")
            cursor[site.path] = site.call
            return site.envoy

        def value(op):
            e = envoy(op)
            return f"{e}.{op.site.kind}" + ("[0]" if op.site.proj else "")

        for op in ops:
            if op.kind == "stop":
                lines.append(f"{pad}tracer.stop()")
            elif op.kind == "save":
                v = value(op)
                copy = ".clone()" if op.mode == "clone" else ""
                lines.append(f'{pad}saved["s{n}"] = {v}{copy}.save()')
                n += 1
            elif op.kind == "read":
                lines.append(f"{pad}v{op.var} = {value(op)}")
            elif op.kind == "edit":
                v = value(op) if op.var == -1 else f"v{op.var}"
                eq = "=" if op.mode == "set" else "*="
                lines.append(f"{pad}{v}{_slice(op.index)} {eq} {op.c!r}")
            elif op.kind == "swap":
                e = envoy(op)
                k = op.site.kind
                lines.append(f"{pad}{e}.{k} = {e}.{k} * {op.c!r} + {op.d!r}")
            elif op.kind == "patch":
                v = value(op)
                lines.append(f"{pad}{v}{_slice(op.index)} = v{op.var}{_src_slice(op.src_row, op.src_index)}")
            elif op.kind == "all":
                eq = "=" if op.mode == "set" else "*="
                lines.append(f"{pad}with {op.site.envoy}.all():")
                lines.append(f"{pad}    {op.site.envoy}.output{_slice(op.index)} {eq} {op.c!r}")
            else:
                raise AssertionError(op)
        if not ops and not program.implicit:
            lines.append(f"{pad}pass")
    return "\n".join(lines) + "\n"


_counter = itertools.count()


def run_fastinterleave(model, program, inputs):
    source = render(program)
    note(source)
    filename = f"<fuzz program {next(_counter)}>"
    # The engine names the user's line in its errors: let it find the source.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {}
    try:
        exec(compile(source, filename, "exec"), namespace)
        saved = {}
        namespace["run"](model, [x.clone() for x in inputs], saved)
    finally:
        linecache.cache.pop(filename, None)
    return saved


# -- the reference: plain PyTorch hooks -----------------------------------------------------


class _Stop(Exception):
    pass


def _key(index):
    if index[0] == "col":
        return (slice(None), index[1])
    if index[0] == "pos":
        return (slice(None), index[1])
    return (slice(None), index[1], index[2])


def _src_key(row, index):
    return (slice(None) if row is None else row,) + tuple(index[1:])


def reference(net, program, inputs):
    """What the program computes, by hooks written here: {save name: tensor, or None if unset}.

    Each site (module, input or output, call k) runs its operations of all invokes in
    program order, each on its invoke's rows of the batch. A swap makes a new batch value
    (a copy with the invoke's rows replaced): what was read before keeps its content."""
    spec = SPECS[program.spec]
    starts = [sum(program.rows[:i]) for i in range(len(program.rows))]
    rows = [slice(s, s + n) for s, n in zip(starts, program.rows)]
    saved = {}
    names = {}
    per_site = {}  # (path, kind, call) -> [(invoke, op)]
    stop_at = None  # program index of the stop
    flat = program.ops()
    n = 0
    for j, (i, op) in enumerate(flat):
        if op.kind == "save":
            names[j] = f"s{n}"
            saved[f"s{n}"] = None
            n += 1
        if op.kind == "stop":
            stop_at = j
    stop_point = None
    if stop_at is not None:
        stop_point = max((op.last(spec) for _, op in flat[:stop_at]), default=-1)
        flat = flat[:stop_at]  # the rest is after the stop point: never reached
    for j, (i, op) in enumerate(flat):
        if op.kind == "all":
            for s in spec.sites:
                if s.path == op.site.path and s.kind == "output":
                    per_site.setdefault((s.path, s.kind, s.call), []).append((j, i, op))
        else:
            per_site.setdefault((op.site.path, op.site.kind, op.site.call), []).append((j, i, op))
    variables = {}
    pos_of = {(s.path, s.kind, s.call): s for s in spec.sites}

    def apply(key, value):
        """Runs the site's operations on the batch value; returns the (maybe new) value."""
        for j, i, op in per_site.get(key, ()):
            view = value[rows[i]]
            if op.kind == "save":
                saved[names[j]] = view.clone() if op.mode == "clone" else view
            elif op.kind == "read":
                variables[op.var] = view
            elif op.kind in ("edit", "all"):
                target = view if op.var == -1 else variables[op.var]
                if op.mode == "set":
                    target[_key(op.index)] = op.c
                else:
                    target[_key(op.index)] *= op.c
            elif op.kind == "swap":
                new = value.clone()
                new[rows[i]] = view * op.c + op.d
                value = new
            elif op.kind == "patch":
                # The right-hand side is a value (it may share memory with the target:
                # `v = m.output; m.output[:, 0] = v[0, 0]`), as the assignment means.
                view[_key(op.index)] = variables[op.var][_src_key(op.src_row, op.src_index)].clone()
            else:
                raise AssertionError(op)
        site = pos_of.get(key)
        if site is not None and site.pos == stop_point:
            raise _Stop
        return value

    calls = {}
    handles = []

    def pre_hook(path):
        def hook(module, args):
            k = calls.setdefault((path, "input"), itertools.count())
            key = (path, "input", next(k))
            if key not in pos_of:
                return None
            new = apply(key, args[0])
            if new is not args[0]:
                return (new,) + tuple(args[1:])
            return None

        return hook

    def hook(path):
        def fn(module, args, output):
            k = calls.setdefault((path, "output"), itertools.count())
            key = (path, "output", next(k))
            site = pos_of.get(key)
            if site is None:
                return None
            if site.proj:
                apply(key, output[0])  # edits only: no swaps of a tuple's element
                return None
            new = apply(key, output)
            return None if new is output else new

        return fn

    for path in {s.path for s in spec.sites}:
        module = net.get_submodule(path)
        handles.append(module.register_forward_pre_hook(pre_hook(path)))
        handles.append(module.register_forward_hook(hook(path)))
    try:
        with torch.no_grad():
            if stop_point != -1:  # a stop before any access: the model does not run
                net(torch.cat([x.clone() for x in inputs]))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return saved


# -- the tests ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of forward passes of tiny models: one intra-op thread (on a busy machine,
    two threads waiting for each other make a tiny GPT-2's forward ~50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_MODELS = {}


def models(name):
    """(fastinterleave model, reference module), built once: the same weights, two copies."""
    if name not in _MODELS:
        spec = SPECS[name]
        _MODELS[name] = (nnsight.NNsight(spec.make()), spec.make())
    return _MODELS[name]


def inputs_of(program):
    g = torch.Generator().manual_seed(program.seed)
    return [SPECS[program.spec].make_input(n, g) for n in program.rows]


def check(program):
    model, ref_net = models(program.spec)
    inputs = inputs_of(program)
    want = reference(ref_net, program, inputs)
    got = run_fastinterleave(model, program, inputs)
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        if expected is None:
            with pytest.raises(ValueError):
                got[name].value
        else:
            assert_close(got[name].value, expected, msg=lambda m: f"{name}: {m}")
    assert_hooks_idle(model._model)


@pytest.mark.parametrize("spec, examples", [("tiny", 1000), ("loop", 1000), ("gpt2", 400)])
def test_programs_match_plain_hooks(spec, examples):
    @fuzz_settings(examples)
    @given(programs(SPECS[spec]))
    def fuzz(program):
        check(program)

    fuzz()


@st.composite
def dead_edit_programs(draw, spec):
    """A valid program, then one more invoke: a read of a site, an access of a later
    site, then an edit (or swap) of the value read, which would run only after the model
    used it. (A site first accessed after a later one is not dead: that access runs at
    its own site, as in nnsight.)"""
    base = draw(programs(spec, stop=False, max_invokes=2, max_ops=4))
    edited, later = draw(st.sampled_from(spec.dead))
    n = draw(st.integers(1, 3))
    via = "iter" if edited.repeated else ""
    var = 1000
    if draw(st.booleans()):
        ops = [Op("read", edited, via, var=var)]
    else:
        ops = [Op("save", edited, via, mode="clone")]
        var = -1
    ops.append(Op("save", later, "iter" if later.repeated else "",
                  mode=draw(st.sampled_from(["clone", "raw"]))))
    if var == -1 and not edited.proj and draw(st.booleans()):
        ops.append(Op("swap", edited, via, c=2.0, d=1.0))
    else:
        ops.append(Op("edit", edited, via, _index(draw, spec, edited), var=var,
                      mode=draw(st.sampled_from(["set", "mul"])), c=draw(st.sampled_from(CONSTS))))
    return base._replace(rows=base.rows + (n,), invokes=base.invokes + (tuple(ops),), implicit=False)


@pytest.mark.parametrize("spec, examples", [("tiny", 150), ("loop", 150), ("gpt2", 150)])
def test_dead_edits_raise(spec, examples):
    @fuzz_settings(examples)
    @given(dead_edit_programs(SPECS[spec]))
    def fuzz(program):
        model, _ = models(program.spec)
        with pytest.raises(InterventionError):
            run_fastinterleave(model, program, inputs_of(program))
        assert_hooks_idle(model._model)

    fuzz()


# -- what the fuzzing found (reproducers of bugs fixed since) ---------------------------------


def _loop_with(edits, x):
    """A fresh Loop's output with `edits(call, input, output)` in a plain hook on `lin`."""
    return loop_with(make_loop(), x, edits)


def test_found_second_all_block_after_an_access_edits_every_call():
    """A second `with lin.all():` block after an access of lin edits every call (it reused
    the first block's site node, whose body did not hold the second edit)."""
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(1))
    model = nnsight.NNsight(make_loop())
    with model.trace(x):
        with model.lin.all():
            model.lin.output[:, 0] = 0.0
        v0 = model.lin.iter[0].output  # noqa: F841 (any access of lin between the blocks)
        with model.lin.all():
            model.lin.output[:, 0] = -1.0
        out = model.output.save()

    def edits(call, inp, o):
        o[:, 0] = 0.0
        o[:, 0] = -1.0

    assert_close(out, _loop_with(edits, x))


def test_found_second_all_block_after_a_later_access_is_not_dead():
    """The same after an access of a later module: not a dead edit (it raised)."""
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(1))
    model = nnsight.NNsight(make_loop())
    with model.trace(x):
        with model.lin.all():
            model.lin.output[:, 0] = 0.0
        between = model.out.output.clone().save()
        with model.lin.all():
            model.lin.output[:, 0] = -1.0
        out = model.output.save()

    def edits(call, inp, o):
        o[:, 0] = -1.0

    want = _loop_with(edits, x)
    assert_close(out, want)
    assert_close(between, want)


def test_found_edits_after_an_all_block_from_a_value_read_before_it():
    """A value read before an `.all()` block, used by edits after it: read once (the
    engine re-ran its read at every call and read a freed value: an internal assert)."""
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(1))
    model = nnsight.NNsight(make_loop())
    with model.trace(x):
        v0 = model.lin.input
        with model.lin.all():
            model.lin.output[:, 0] = 0.0
        model.lin.iter[0].output[:, 0] = v0[:, 0]
        model.lin.iter[0].output[:, 0] = v0[0, 0]
        out = model.output.save()

    def edits(call, inp, o):
        o[:, 0] = 0.0
        if call == 0:
            o[:, 0] = inp[:, 0]
            o[:, 0] = inp[0, 0]

    assert_close(out, _loop_with(edits, x))


def test_found_edit_after_an_all_block_of_a_value_read_before_it():
    """An edit of call 0 recorded after an `.all()` block runs once, at call 0 (it was
    re-run with the block at call 1 and raised as dead)."""
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(1))
    model = nnsight.NNsight(make_loop())
    with model.trace(x):
        first = model.lin.output.clone().save()
        with model.lin.all():
            model.lin.output[:, 0] = 0.0
        model.lin.iter[0].output[:, 1] = 5.0
        out = model.output.save()

    def edits(call, inp, o):
        o[:, 0] = 0.0
        if call == 0:
            o[:, 1] = 5.0

    assert_close(out, _loop_with(edits, x))
    assert_close(first, make_loop().lin(x))
