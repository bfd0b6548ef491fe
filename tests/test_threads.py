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
