"""The memory contract: unsaved values are freed as soon as nothing needs them,
so a trace of many invokes costs what the plain batched forward costs; and
repeated traces leave nothing behind (no reference cycles holding tensors)."""

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

import fastinterleave as nnsight

from conftest import assert_hooks_idle, make_tiny

# Peak RSS rise of each workload over the RSS just before it, in a fresh process
# (so import peaks do not blur it): the kernel's high-water mark is reset before
# each run (/proc/self/clear_refs). glibc's mmap threshold is fixed
# (MALLOC_MMAP_THRESHOLD_): by default it grows after large frees, and then the
# peak jitters by 8 MB steps with when blocks go back to the OS. The plain
# forward and the trace alternate twice; the least rise of each is compared.
_PEAK = textwrap.dedent(
    """
    import ctypes, gc, json, sys
    import torch
    sys.path.insert(0, "tests")
    from conftest import make_gpt2
    import fastinterleave as nnsight

    torch.set_num_threads(1)
    invokes = int(sys.argv[1])
    gpt = make_gpt2(n_layer=4, n_embd=256, n_head=8, vocab_size=512)
    ids = torch.randint(0, 512, (invokes, 64), generator=torch.Generator().manual_seed(0))
    libc = ctypes.CDLL("libc.so.6")
    model = nnsight.NNsight(gpt)

    def kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])

    def plain():
        return gpt(ids).logits[:, -1]

    def trace():
        rows = []
        with model.trace() as tracer:
            for i in range(invokes):
                with tracer.invoke(ids[i : i + 1]):
                    model.transformer.h[2].output[0][:, 5] = 0
                    rows.append(model.lm_head.output[:, -1].save())
        return torch.cat([r.value for r in rows])

    def rise(fn):
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = kib("VmRSS")
        out = fn()  # noqa: F841 (alive while the peak is read)
        return kib("VmHWM") - before

    rises = {"plain": [], "trace": []}
    with torch.no_grad():
        gpt(ids[:1])  # warm up kernels and allocator
        trace()
        for _ in range(2):
            for mode, fn in (("plain", plain), ("trace", trace)):
                rises[mode].append(rise(fn))
    print(json.dumps(rises))
    """
)


def test_128_invokes_cost_what_the_plain_batched_forward_costs():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", _PEAK, "128"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    rises = json.loads(out.stdout.strip().splitlines()[-1])
    plain, traced = min(rises["plain"]), min(rises["trace"])
    # The plain forward's activations must dominate (hundreds of MB), or the test measures noise.
    assert plain > 200_000, rises
    assert traced <= plain * 1.05, rises


def test_repeated_traces_leave_nothing_behind():
    net = make_tiny()
    model = nnsight.NNsight(net)
    x = torch.rand(4, 5)
    graphs = []
    gc.collect()
    gc.disable()  # anything kept alive only by a reference cycle would survive the loop
    try:
        for _ in range(200):
            with model.trace(x) as tracer:
                model.layer1.output[:, 0] = 0
                kept = model.layer2.output.save()
            graphs.append(weakref.ref(tracer._graph))
            graphs.append(weakref.ref(tracer))
            del tracer
        alive = sum(ref() is not None for ref in graphs[:-2])
    finally:
        gc.enable()
    assert alive == 0
    assert isinstance(kept, torch.Tensor)
    assert_hooks_idle(net)


def test_the_collector_is_paused_only_while_a_trace_runs():
    """Cyclic garbage collection pauses during a trace and resumes as it was after it,
    errors and edits included; a collector the user disabled stays disabled."""
    net = make_tiny()
    model = nnsight.NNsight(net)
    x = torch.rand(2, 5)
    assert gc.isenabled()
    seen = []
    with model.trace(x):
        seen.append(gc.isenabled())
        model.layer1.output.save()
    assert seen == [False] and gc.isenabled()
    with pytest.raises(ValueError):
        with model.trace(x):
            raise ValueError("user error while recording")
    assert gc.isenabled()
    with pytest.raises(IndexError):
        with model.trace(x):
            model.layer1.output[:, 99] = 0  # fails while the model runs
    assert gc.isenabled()
    with pytest.raises(nnsight.InterventionError):
        with model.trace():  # no inputs: fails before the model runs
            pass
    assert gc.isenabled()
    with model.edit() as edited:
        model.layer1.output[:] = 0
    assert gc.isenabled()
    gc.disable()
    try:
        with edited.trace(x):
            edited.layer2.output.save()
        assert not gc.isenabled()
    finally:
        gc.enable()
