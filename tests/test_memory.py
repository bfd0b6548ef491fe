"""The memory contract: unsaved values are freed as soon as nothing needs them,
so a trace of many invokes costs what the plain batched forward costs; and
repeated traces leave nothing behind (no reference cycles holding tensors)."""

import gc
import json
import subprocess
import sys
import textwrap
import weakref

import torch

import fastinterleave as nnsight

from conftest import assert_hooks_idle, make_tiny

# Peak RSS rise of one workload in a fresh process (so allocator caches and
# import peaks do not blur it), measured over the RSS just before it runs.
_PEAK = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    sys.path.insert(0, "tests")
    from conftest import make_gpt2
    import fastinterleave as nnsight

    torch.set_num_threads(1)
    mode, invokes = sys.argv[1], int(sys.argv[2])
    gpt = make_gpt2(n_layer=4, n_embd=256, n_head=8, vocab_size=512)
    ids = torch.randint(0, 512, (invokes, 64), generator=torch.Generator().manual_seed(0))

    def rss_kb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() // 1024

    with torch.no_grad():
        gpt(ids[:1])  # warm up kernels and allocator
        before = rss_kb()
        if mode == "plain":
            last = gpt(ids).logits[:, -1]
        else:
            model = nnsight.NNsight(gpt)
            rows = []
            with model.trace() as tracer:
                for i in range(invokes):
                    with tracer.invoke(ids[i : i + 1]):
                        model.transformer.h[2].output[0][:, 5] = 0
                        rows.append(model.lm_head.output[:, -1].save())
            last = torch.cat([r.value for r in rows])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rise_kb": peak - before, "check": float(last.float().abs().sum())}))
    """
)


def _peak_rise(mode, invokes):
    out = subprocess.run([sys.executable, "-c", _PEAK, mode, str(invokes)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_128_invokes_cost_what_the_plain_batched_forward_costs():
    plain = _peak_rise("plain", 128)
    traced = _peak_rise("trace", 128)
    # The plain forward's activations must dominate (hundreds of MB), or the test measures noise.
    assert plain["rise_kb"] > 200_000, plain
    assert traced["rise_kb"] <= plain["rise_kb"] * 1.05, (traced, plain)


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
