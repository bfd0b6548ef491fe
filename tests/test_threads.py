"""Threads: a trace belongs to the thread that opened it. Its hooks act only on that
thread's calls; other threads' calls of the same modules pass through untouched.
References: the same modules called without any trace, and values computed by hand."""

import threading

import torch

import fastinterleave as nnsight

from conftest import make_tiny

ROUNDS = 300


def run_threads(*targets):
    """Runs each target in its own thread; re-raises the first failure."""
    failures = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 (reported below)
                failures.append(e)

        return run

    threads = [threading.Thread(target=guarded(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive(), "a thread hung"
    if failures:
        raise failures[0]


def test_a_plain_call_on_another_thread_is_untouched_by_a_trace():
    """While one thread traces (editing layer1 in place), another calls the bare
    module: it gets the plain output every time, and the trace gets its edit."""
    net = make_tiny()
    model = nnsight.NNsight(net)
    wrong = []

    def tracing():
        for i in range(ROUNDS):
            x = torch.rand(2, 5)
            with model.trace(x):
                model.layer1.output[:] = 3.0
                out = model.output.save()
            with torch.no_grad():
                want = torch.nn.functional.linear(torch.full((2, 10), 3.0), net.layer2.weight, net.layer2.bias)
                if not torch.allclose(out, want):
                    wrong.append(("trace", i))

    def plain():
        for i in range(2 * ROUNDS):
            x = torch.rand(2, 5)
            with torch.no_grad():
                got = net(x)
                # By hand from the weights: no module call, so no hook can touch it.
                h = torch.nn.functional.linear(x, net.layer1.weight, net.layer1.bias)
                want = torch.nn.functional.linear(h, net.layer2.weight, net.layer2.bias)
            if not torch.allclose(got, want):
                wrong.append(("plain", i))

    run_threads(tracing, plain)
    assert not wrong, wrong[:10]


def test_two_threads_tracing_one_model_both_get_their_values():
    """Each thread's trace records into its own graph and its hooks serve its own
    calls: both edit layer1 with their own constant and read their own rows."""
    net = make_tiny()
    model = nnsight.NNsight(net)
    wrong = []

    def tracing(k):
        def run():
            for i in range(ROUNDS):
                x = torch.rand(k, 5)
                with model.trace(x):
                    before = model.layer1.output.clone().save()
                    model.layer1.output[:] = float(k)
                    out = model.output.save()
                with torch.no_grad():
                    h = torch.nn.functional.linear(x, net.layer1.weight, net.layer1.bias)
                    want = torch.nn.functional.linear(torch.full((k, 10), float(k)), net.layer2.weight, net.layer2.bias)
                if not (torch.allclose(before, h) and torch.allclose(out, want)):
                    wrong.append((k, i))

        return run

    run_threads(tracing(1), tracing(2), tracing(3))
    assert not wrong, wrong[:10]


def test_threads_recording_traces_of_two_models_never_mix_their_graphs():
    """While one thread records a trace of model A, another records one of model B:
    each operation lands in its own thread's graph (the open trace is per thread)."""
    nets = [make_tiny(seed=s) for s in (0, 1)]
    models = [nnsight.NNsight(n) for n in nets]
    wrong = []

    def recording(which):
        model, net = models[which], nets[which]

        def run():
            for i in range(ROUNDS):
                x = torch.rand(2, 5)
                with model.trace(x):
                    h = model.layer1.output
                    # Many recorded operations: a thread switch lands among them.
                    for _ in range(20):
                        h = h * 1.0 + 0.0
                    total = h.sum(dim=1).save()
                    zeros = torch.zeros(h.shape).save()
                with torch.no_grad():
                    if not torch.allclose(total, net.layer1(x).sum(dim=1)) or zeros.shape != (2, 10):
                        wrong.append((which, i))

        return run

    run_threads(recording(0), recording(1))
    assert not wrong, wrong[:10]


def test_torch_factories_work_unchanged_on_other_threads_during_a_trace():
    net = make_tiny()
    model = nnsight.NNsight(net)
    inside = threading.Event()
    release = threading.Event()
    seen = {}

    def other():
        inside.wait(30)
        seen["zeros"] = torch.zeros(2, 3)
        seen["arange"] = torch.arange(4)
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    with model.trace(torch.rand(1, 5)):
        inside.set()
        assert release.wait(30)
        model.output.save()
    thread.join()
    assert type(seen["zeros"]) is torch.Tensor and torch.equal(seen["zeros"], torch.zeros(2, 3))
    assert torch.equal(seen["arange"], torch.arange(4))


def test_a_trace_in_an_asyncio_task_is_its_own():
    """Two tasks of one event loop, each recording a trace of its model with an
    await inside the block: the open trace is per task (a ContextVar)."""
    import asyncio

    nets = [make_tiny(seed=s) for s in (0, 1)]
    models = [nnsight.NNsight(n) for n in nets]

    async def task(which):
        model = models[which]
        x = torch.rand(2, 5)
        with model.trace(x):
            h = model.layer1.output * 1.0
            await asyncio.sleep(0)  # the other task records here
            total = (h + 0.0).sum().save()
        with torch.no_grad():
            return torch.allclose(total, nets[which].layer1(x).sum())

    async def main():
        return await asyncio.gather(task(0), task(1))

    assert asyncio.run(main()) == [True, True]
