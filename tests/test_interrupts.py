"""Ctrl-C at any point of a trace, an edit or a session leaves nothing behind: the
model traces normally afterwards, the garbage collector is as it was, torch's
factories are the originals, no hook is attached, no block is open.

A timer thread delivers SIGINT to the main thread at random moments while it traces
in a loop (thousands of interrupts, bounded in time)."""

import gc
import random
import signal
import threading
import time

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
from fastinterleave import _C

from conftest import assert_hooks_idle, make_tiny

FACTORIES = {name: getattr(torch, name) for name in ("zeros", "ones", "empty", "full", "rand", "arange", "tensor")}
SECONDS = 6.0


def interrupt_storm(body, seconds=SECONDS, seed=0):
    """Runs body() in a loop while another thread sends SIGINT at random moments
    (0-300 us apart). The handler raises KeyboardInterrupt only while body runs (it
    disarms itself as it raises), so the loop's own bookkeeping is never hit.
    Returns (interrupts raised, bodies completed)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    rng = random.Random(seed)
    stop = threading.Event()
    main = threading.main_thread().ident
    armed = [False]
    raised = [0]

    def handler(signum, frame):
        if armed[0]:
            armed[0] = False
            raised[0] += 1
            raise KeyboardInterrupt

    def sender():
        while not stop.is_set():
            time.sleep(rng.random() * 3e-4)
            signal.pthread_kill(main, signal.SIGINT)

    # Garbage of earlier tests (a wrapper's hook finalizer, say) is collected now, not
    # mid-storm, and other libraries' collector callbacks (hypothesis times each
    # collection) are set aside: an interrupt inside those is Python's "Exception
    # ignored", not ours to test.
    gc.collect()
    callbacks = gc.callbacks[:]
    gc.callbacks.clear()
    done = 0
    previous = signal.signal(signal.SIGINT, handler)
    thread = threading.Thread(target=sender, daemon=True)
    deadline = time.monotonic() + seconds
    thread.start()
    try:
        while time.monotonic() < deadline:
            try:
                armed[0] = True
                body()
                armed[0] = False
                done += 1
            except KeyboardInterrupt:
                pass
    finally:
        armed[0] = False
        stop.set()
        thread.join()
        signal.signal(signal.SIGINT, previous)
        gc.callbacks[:] = callbacks
    return raised[0], done


def assert_clean(model, net, gc_before):
    assert gc.isenabled() == gc_before
    for name, fn in FACTORIES.items():
        assert getattr(torch, name) is fn, name
    assert _C.context_state() == {"patch_depth": 0, "gc_depth": 0}
    assert_hooks_idle(net)
    x = torch.rand(3, 5)
    with model.trace(x):
        h = model.layer1.output.save()
        model.layer2.output[:, 0] = 7
        out = model.output.save()
    with torch.no_grad():
        want = net(x)
        want[:, 0] = 7
        assert_close(h, net.layer1(x))
        assert_close(out, want)
    with model.session():
        with model.trace(x):
            s = model.layer1.output.save()
    assert_close(s, h)


def test_interrupted_traces_leave_nothing_behind():
    net = make_tiny()
    model = nnsight.NNsight(net)
    gc_before = gc.isenabled()
    x = torch.rand(2, 5)

    def body():
        with model.trace() as tracer:
            with tracer.invoke(x):
                h = model.layer1.output
                model.layer1.output[:, 0] = torch.zeros(h.shape[0])
            with tracer.invoke(x):
                model.layer1.output[:, 1] = h[:, 1]
                model.output.save()

    sent, done = interrupt_storm(body)
    assert sent > 1000 and done > 50, (sent, done)
    assert_clean(model, net, gc_before)


def test_interrupted_sessions_and_edits_leave_nothing_behind():
    net = make_tiny()
    model = nnsight.NNsight(net)
    gc_before = gc.isenabled()
    x = torch.rand(2, 5)

    def body():
        with model.edit() as edited:
            edited.layer1.output[:, 0] = 1
        with model.session():
            with edited.trace(x):
                h = edited.layer1.output.save()
            with model.trace(x):
                model.layer1.output[:, 2] = h[:, 0]

    sent, done = interrupt_storm(body, seed=1)
    assert sent > 1000 and done > 20, (sent, done)
    assert_clean(model, net, gc_before)
