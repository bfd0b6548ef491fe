"""fastinterleave.sweep: sweeps against a plain loop of single traces and against
hand-written hooks; packing under a memory budget; attribution patching; Ray workers
(real processes on a local cluster, one killed mid-sweep); a results file that survives
a SIGKILL of the driver."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fastinterleave as nnsight
from conftest import make_gpt2
from fastinterleave import sweep

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TOL = dict(rtol=1e-4, atol=1e-5)
SEQ = 6
N_LAYER = 3
GOOD, BAD = [3, 7], [5, 9]  # per-example tokens of the metric (two examples)


@pytest.fixture(scope="module")
def net():
    return make_gpt2(n_layer=N_LAYER, n_embd=32, n_head=4)


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 100, (2, SEQ), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 1) % 100
    return clean, corrupted


def metric_of(logits):
    """The sweep's metric (logit_diff with per-example tokens), for the references."""
    last = logits[:, -1]
    n = len(GOOD)
    last = last.unflatten(0, (-1, n))
    ar = torch.arange(n)
    return (last[:, ar, GOOD] - last[:, ar, BAD]).reshape(-1)


# -- references: hand-written hooks and a loop of single traces -------------------------------------


def hooked(net, x, module, fn, pre=False):
    """The metric (mean over examples) of one forward of x with fn editing the site in place:
    fn(block output hidden states) or, with pre=True, fn(the module's first argument)."""
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: fn(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: fn(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            return metric_of(net(x).logits).mean().item()
    finally:
        handle.remove()


def captured(net, x, module, pre=False):
    store = {}
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: store.update(v=args[0].detach().clone()))
    else:
        handle = module.register_forward_hook(lambda m, args, out: store.update(v=out[0].detach().clone()))
    with torch.no_grad():
        net(x)
    handle.remove()
    return store["v"]


def hooks_patch_table(net, clean, corrupted):
    table = torch.zeros(N_LAYER, SEQ)
    for layer, block in enumerate(net.transformer.h):
        src = captured(net, clean, block)
        for pos in range(SEQ):
            def edit(h, pos=pos, src=src):
                h[:, pos] = src[:, pos]
            table[layer, pos] = hooked(net, corrupted, block, edit)
    return table


def traces_patch_table(net, clean, corrupted):
    """One trace per patch, written as a user would with nnsight."""
    model = nnsight.NNsight(net)
    table = torch.zeros(N_LAYER, SEQ)
    with torch.no_grad():
        for layer in range(N_LAYER):
            for pos in range(SEQ):
                with model.trace(clean):
                    src = model.transformer.h[layer].output[0][:, pos].save()
                with model.trace(corrupted):
                    model.transformer.h[layer].output[0][:, pos] = src
                    logits = model.output.logits.save()
                table[layer, pos] = metric_of(logits).mean()
    return table


def run_patch(model, pair, **kw):
    clean, corrupted = pair
    kw.setdefault("progress", False)
    return sweep.run(model, clean=clean, corrupted=corrupted, sites=sweep.Sites("transformer.h.*", positions="each"),
                     intervention=sweep.Patch(), metric=sweep.logit_diff(GOOD, BAD), **kw)


# -- exact sweeps ---------------------------------------------------------------------------------


def test_patch_sweep_equals_loop_of_traces_and_hooks(net, pair):
    result = run_patch(net, pair)
    assert result.dims == ("layer", "position")
    assert result.coords == {"layer": [0, 1, 2], "position": list(range(SEQ))}
    assert result.stats["forwards"] == 1  # everything fits one forward pass
    clean, corrupted = pair
    torch.testing.assert_close(result.values, hooks_patch_table(net, clean, corrupted), **TOL)
    torch.testing.assert_close(result.values, traces_patch_table(net, clean, corrupted), **TOL)
    with torch.no_grad():
        base = metric_of(net(corrupted).logits).mean()
        ref = metric_of(net(clean).logits).mean()
    torch.testing.assert_close(result.baseline, base, **TOL)
    torch.testing.assert_close(result.reference, ref, **TOL)
    # Patching the last position of the last block restores the clean run exactly.
    torch.testing.assert_close(result.normalized[-1, -1], torch.tensor(1.0), **TOL)


def test_any_packing_gives_the_same_values(net, pair):
    whole = run_patch(net, pair)
    for batch_size in (1, 4, 7):
        packed = run_patch(net, pair, batch_size=batch_size)
        assert packed.stats["forwards"] == -(-N_LAYER * SEQ // batch_size)
        torch.testing.assert_close(packed.values, whole.values, **TOL)
        torch.testing.assert_close(packed.baseline, whole.baseline, **TOL)


def test_per_example_values(net, pair):
    result = run_patch(net, pair, per_example=True)
    assert result.dims == ("layer", "position", "example")
    assert result.values.shape == (N_LAYER, SEQ, 2)
    assert result.baseline.shape == (2,)
    torch.testing.assert_close(result.values.mean(-1), run_patch(net, pair).values, **TOL)


@pytest.mark.parametrize("kind", ["zero", "mean", "add"])
def test_head_interventions_equal_hooks(net, pair, kind):
    """Zero / mean ablation and steering of single heads at single positions (the input of
    each attention output projection, split into heads), against forward pre-hooks."""
    _, x = pair
    positions, heads, n_heads, d = [1, -1], [0, 3], 4, 8
    steer = torch.randn(32, generator=torch.Generator().manual_seed(5))
    scales = [0.5, -2.0]
    interventions = {"zero": sweep.Zero(), "mean": sweep.Mean(), "add": sweep.Add(steer, scales=scales)}
    result = sweep.run(
        net, inputs=x, sites=sweep.Sites("transformer.h.*.attn.c_proj", positions=positions, heads=heads, on="input"),
        intervention=interventions[kind], metric=sweep.logit_diff(GOOD, BAD), batch_size=5, progress=False,
    )
    expected_dims = ("layer", "position", "head") + (("scale",) if kind == "add" else ())
    assert result.dims == expected_dims
    for layer, block in enumerate(net.transformer.h):
        proj = block.attn.c_proj
        mean = captured(net, x, proj, pre=True).reshape(-1, 32).mean(0)
        for i, pos in enumerate(positions):
            for j, head in enumerate(heads):
                cols = slice(head * d, (head + 1) * d)
                for k, scale in enumerate(scales if kind == "add" else [None]):
                    def edit(v, pos=pos, cols=cols, scale=scale):
                        if kind == "zero":
                            v[:, pos, cols] = 0
                        elif kind == "mean":
                            v[:, pos, cols] = mean[cols]
                        else:
                            v[:, pos, cols] += scale * steer[cols]
                    want = hooked(net, x, proj, edit, pre=True)
                    got = result.values[layer, i, j] if kind != "add" else result.values[layer, i, j, k]
                    torch.testing.assert_close(got, torch.tensor(want), **TOL)
    assert result.reference is None
    with torch.no_grad():
        torch.testing.assert_close(result.baseline, metric_of(net(x).logits).mean(), **TOL)


def test_whole_layer_ablation_and_language_model(pair):
    """positions=None ablates every position at once; a LanguageModel takes text."""
    from test_language import make_lm, make_tokenizer

    net = make_lm()
    model = nnsight.LanguageModel(net, tokenizer=make_tokenizer())
    prompts = ["the cat sat on the mat", "a dog sat on a big"]  # six tokens each
    result = sweep.run(model, inputs=prompts, sites=sweep.Sites("transformer.h.*.mlp"), intervention=sweep.Zero(),
                       metric=sweep.logit(4), progress=False)
    assert result.dims == ("layer",)
    ids = torch.stack([torch.tensor(model.tokenizer(p)["input_ids"]) for p in prompts])
    for layer, block in enumerate(net.transformer.h):
        h = block.mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
        with torch.no_grad():
            want = net(ids).logits[:, -1, 4].mean()
        h.remove()
        torch.testing.assert_close(result.values[layer], want, **TOL)


def test_subset_and_bad_arguments(net, pair):
    full = run_patch(net, pair)
    part = run_patch(net, pair, subset=[{"layer": 1, "position": 2}, (2, 5)])
    assert part.stats["runs"] == 2
    assert torch.isnan(part.values).sum() == N_LAYER * SEQ - 2
    torch.testing.assert_close(part.values[1, 2], full.values[1, 2], **TOL)
    torch.testing.assert_close(part.values[2, 5], full.values[2, 5], **TOL)
    clean, corrupted = pair
    with pytest.raises(sweep.SweepError, match="clean="):
        sweep.run(net, inputs=corrupted, sites=sweep.Sites("transformer.h.*"), metric=sweep.logit(1))
    with pytest.raises(sweep.SweepError, match="matches no module"):
        sweep.run(net, inputs=corrupted, sites=sweep.Sites("blocks.*"), intervention=sweep.Zero(), metric=sweep.logit(1))
    with pytest.raises(sweep.SweepError, match="outside the sequence"):
        sweep.run(net, inputs=corrupted, sites=sweep.Sites("transformer.h.*", positions=[SEQ]),
                  intervention=sweep.Zero(), metric=sweep.logit(1))


def test_readme_examples(net, pair, tmp_path, monkeypatch):
    """The README's Sweeps examples: the first runs as written, the cluster one compiles."""
    import re
    from pathlib import Path

    text = (Path(TESTS_DIR).parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "sweep" in b]
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    clean, corrupted = pair
    scope = {"model": net, "clean_ids": clean, "corrupted_ids": corrupted, "good_token": GOOD, "bad_token": BAD}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    torch.testing.assert_close(scope["result"].values, run_patch(net, pair).values, **TOL)
    assert (tmp_path / "patching.png").exists()
    compile(blocks[1], "README.md", "exec")


# -- memory budget, progress, heatmap ------------------------------------------------------------------


def test_memory_budget_is_respected():
    """The peak tensor memory of the sweep's forward passes stays under the budget."""
    net = make_gpt2(n_layer=2, n_embd=32, n_head=2, vocab_size=3000)
    x = torch.randint(0, 3000, (1, 16), generator=torch.Generator().manual_seed(0))
    sites = sweep.Sites("transformer.h.*", positions="each")
    kw = dict(inputs=x, sites=sites, intervention=sweep.Zero(), metric=sweep.logit(7), progress=False)
    first = sweep.run(net, **kw)  # probes the memory one row costs (cached from now on)
    row = first.stats["row_bytes"]
    assert row >= 16 * 3000 * 4  # at least the logits of one row
    assert first.stats["forwards"] == 1  # the default budget (half the free RAM) fits all 32 runs
    budget = 10 * row
    limited, peak = sweep.measure_peak(lambda: sweep.run(net, memory_budget=budget, **kw))
    assert limited.stats["forwards"] > 3
    assert limited.stats["max_rows"] <= 10
    assert peak <= budget, (peak, budget)
    unlimited, peak_all = sweep.measure_peak(lambda: sweep.run(net, **kw))
    assert peak_all > budget  # the measurement sees the difference
    torch.testing.assert_close(limited.values, unlimited.values, **TOL)
    with pytest.raises(sweep.SweepError, match="below what one forward pass"):
        sweep.run(net, memory_budget=row, **kw)
    assert sweep.run(net, memory_budget="1GB", **kw).stats["budget"] == 2 ** 30


def test_progress_bar(net, pair, capsys):
    run_patch(net, pair, progress=True, batch_size=6)
    err = capsys.readouterr().err
    assert f"{N_LAYER * SEQ}/{N_LAYER * SEQ}" in err and "run/s" in err


def test_heatmap_png(net, pair, tmp_path):
    result = run_patch(net, pair)
    path = tmp_path / "patching.png"
    fig = result.heatmap(path, value="normalized", labels={"position": list("abcdef")})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert len(fig.axes) == 2  # the map and its colour bar
    _, x = pair
    heads = sweep.run(net, inputs=x, sites=sweep.Sites("transformer.h.*.attn.c_proj", positions="each", heads=4,
                                                       on="input"),
                      intervention=sweep.Zero(), metric=sweep.logit(3), progress=False)
    fig = heads.heatmap(tmp_path / "heads.png")
    assert len(fig.axes) == 8  # one panel (and colour bar) per head
    top = heads.top(3)
    assert len(top) == 3 and set(top[0]) == {"layer", "position", "head", "value"}


# -- attribution patching ------------------------------------------------------------------------------


def test_attribution_equals_autograd_and_confirms_exactly(net, pair):
    clean, corrupted = pair
    attr = sweep.attribute(net, clean=clean, corrupted=corrupted, sites=sweep.Sites("transformer.h.*", positions="each"),
                           metric=sweep.logit_diff(GOOD, BAD))
    assert attr.method == "attribution" and attr.stats["backwards"] == 1
    assert all(p.grad is None for p in net.parameters())  # the model's .grad are left as they were
    # The same estimate by hand: hooks keep the block outputs, autograd gives their gradients.
    acts = {}

    def keep(layer):
        def hook(m, a, out):
            acts[layer] = out[0]
            if out[0].requires_grad:
                out[0].retain_grad()
        return hook

    handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(net.transformer.h)]
    try:
        with torch.no_grad():
            net(clean)
        src = {k: v.clone() for k, v in acts.items()}
        metric_of(net(corrupted).logits).sum().backward()
    finally:
        for h in handles:
            h.remove()
    want = torch.stack([((src[i] - acts[i]) * acts[i].grad).sum(-1).mean(0) for i in range(N_LAYER)])
    torch.testing.assert_close(attr.effect, want.detach(), **TOL)
    net.zero_grad(set_to_none=True)
    exact = run_patch(net, pair)
    confirmed = attr.confirm(4, progress=False)
    cells = attr.top(4)
    for cell in cells:
        torch.testing.assert_close(confirmed.sel(layer=cell["layer"], position=cell["position"]),
                                   exact.sel(layer=cell["layer"], position=cell["position"]), **TOL)
    assert torch.isnan(confirmed.values).sum() == N_LAYER * SEQ - 4


# -- resumability ---------------------------------------------------------------------------------------


def test_interrupted_sweep_keeps_its_chunks(net, pair, tmp_path):
    path = tmp_path / "sweep.fisweep"
    seen = []

    def stop_after_two(info):
        seen.append(info)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_patch(net, pair, batch_size=3, results=path, on_chunk=stop_after_two)
    assert sweep.load_results(path)["runs_done"] == 6
    resumed = run_patch(net, pair, batch_size=3, results=path)
    assert resumed.stats["loaded"] == 6 and resumed.stats["computed"] == N_LAYER * SEQ - 6
    fresh = run_patch(net, pair, batch_size=3)
    torch.testing.assert_close(resumed.values, fresh.values, rtol=0, atol=0)
    torch.testing.assert_close(resumed.baseline, fresh.baseline, rtol=0, atol=0)
    again = run_patch(net, pair, batch_size=3, results=path)
    assert again.stats["computed"] == 0 and again.stats["forwards"] == 0
    torch.testing.assert_close(again.values, fresh.values, rtol=0, atol=0)
    # Other arguments (here the metric) do not reuse the file.
    with pytest.raises(sweep.SweepError, match="different sweep"):
        clean, corrupted = pair
        sweep.run(net, clean=clean, corrupted=corrupted, sites=sweep.Sites("transformer.h.*", positions="each"),
                  metric=sweep.logit(3), results=path, progress=False)


DRIVER = textwrap.dedent("""
    import json, sys, time
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import make_gpt2
    from fastinterleave import sweep

    DELAY = float(sys.argv[1])

    def slow_metric(logits):
        time.sleep(DELAY)
        return logits[:, -1, 3] - logits[:, -1, 5]

    net = make_gpt2(n_layer=3, n_embd=32, n_head=4)
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 100, (1, 6), generator=g)
    corrupted = torch.randint(0, 100, (1, 6), generator=g)
    result = sweep.run(net, clean=clean, corrupted=corrupted, sites=sweep.Sites("transformer.h.*", positions="each"),
                       metric=slow_metric, batch_size=2, results=sys.argv[2], progress=False)
    torch.save(result.values, sys.argv[3])
    print(json.dumps(result.stats))
""")


def test_driver_killed_mid_sweep_resumes(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=TESTS_DIR))
    results = tmp_path / "sweep.fisweep"
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen([sys.executable, str(script), "0.25", str(results), str(tmp_path / "a.pt")],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if results.exists() and results.stat().st_size and sweep.load_results(results)["chunks"] >= 3:
                break
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            time.sleep(0.02)
        else:
            pytest.fail("the sweep wrote no chunk in time")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    before = sweep.load_results(results)
    assert 6 <= before["runs_done"] < 18, before
    rerun = subprocess.run([sys.executable, str(script), "0", str(results), str(tmp_path / "b.pt")],
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    stats = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert stats["loaded"] == before["runs_done"]
    assert stats["computed"] == 18 - before["runs_done"]
    # The same sweep, uninterrupted, in this process.
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 100, (1, 6), generator=g)
    corrupted = torch.randint(0, 100, (1, 6), generator=g)
    fresh = sweep.run(make_gpt2(n_layer=3, n_embd=32, n_head=4), clean=clean, corrupted=corrupted,
                      sites=sweep.Sites("transformer.h.*", positions="each"), metric=sweep.logit_diff(3, 5),
                      batch_size=2, progress=False)
    torch.testing.assert_close(torch.load(tmp_path / "b.pt"), fresh.values, **TOL)


# -- Ray --------------------------------------------------------------------------------------------------


def build_net():
    """The model factory each Ray worker runs."""
    return make_gpt2(n_layer=N_LAYER, n_embd=32, n_head=4)


@pytest.fixture(scope="module")
def ray_pool():
    """A local Ray cluster (3 CPUs, on 127.0.0.1 only) and two worker processes that each
    built the model once."""
    # Ray's single-machine mode: every address it uses and advertises is the loopback one.
    before = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": TESTS_DIR, "OMP_NUM_THREADS": "1"}})
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        with sweep.RayPool(build_net, num_workers=2) as pool:
            yield pool
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = before


def slow_metric(logits):
    time.sleep(0.2)
    return sweep.logit_diff(GOOD, BAD)(logits)


def test_ray_sweep_equals_local_run(ray_pool, net, pair):
    """backend="ray": workers (here started for this sweep) each build the model from the factory."""
    pids = []
    result = run_patch(None, pair, backend="ray", model_factory=build_net, num_workers=1, batch_size=4,
                       on_chunk=lambda info: pids.append(info["pid"]))
    assert result.stats["workers"] == 1 and result.stats["forwards"] == 5
    assert os.getpid() not in pids and len(set(pids)) == 1  # chunks ran in another process
    local = run_patch(net, pair, batch_size=4)
    torch.testing.assert_close(result.values, local.values, **TOL)
    torch.testing.assert_close(result.baseline, local.baseline, **TOL)
    torch.testing.assert_close(result.reference, local.reference, **TOL)
    torch.testing.assert_close(result.values, hooks_patch_table(net, *pair), **TOL)
    # A pool's workers serve several sweeps, each chunk in one of its processes.
    _, x = pair
    kw = dict(inputs=x, sites=sweep.Sites("transformer.h.*", positions=[0, 5]), intervention=sweep.Zero(),
              metric=sweep.logit(3), batch_size=1, progress=False)
    pool_pids = []
    pooled = sweep.run(None, pool=ray_pool, on_chunk=lambda info: pool_pids.append(info["pid"]), **kw)
    assert len(set(pool_pids)) == 2 and os.getpid() not in pool_pids
    torch.testing.assert_close(pooled.values, sweep.run(net, **kw).values, **TOL)


def test_ray_worker_killed_mid_sweep(ray_pool, net, pair):
    """SIGKILL one worker while it holds a chunk: the chunk is retried, nothing is lost."""
    killed = []

    def kill_first(info):
        if not killed:
            killed.append(info["pid"])
            os.kill(info["pid"], signal.SIGKILL)

    clean, corrupted = pair
    result = sweep.run(None, clean=clean, corrupted=corrupted, sites=sweep.Sites("transformer.h.*", positions="each"),
                       metric=slow_metric, pool=ray_pool, batch_size=2, on_chunk=kill_first, progress=False)
    assert killed and result.stats["retries"] >= 1
    assert not torch.isnan(result.values).any()
    local = run_patch(net, pair, batch_size=2)
    torch.testing.assert_close(result.values, local.values, **TOL)
    torch.testing.assert_close(result.baseline, local.baseline, **TOL)
