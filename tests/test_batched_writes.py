"""Index assignments of several invokes into one site (``h[:, p] = v`` in each invoke)
give what the same writes give done one by one, in recording order, by a plain hook on
the batched forward: values, the saved reads around them, gradients and errors. (The
engine joins such writes into one indexed write; `test_one_write` checks it does.)"""

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
from conftest import assert_hooks_idle, make_gpt2, make_tiny


def batched(xs):
    return torch.cat(xs)


def hand_rows(net, module, xs, write, kind="output"):
    """The batched forward with a plain hook that runs ``write(i, rows of invoke i)``
    for each invoke in order (the same code the trace records, on tensors); returns
    the final output."""
    starts, s = [], 0
    for x in xs:
        starts.append(s)
        s += x.shape[0]

    def apply(t):
        for i, x in enumerate(xs):
            write(i, t[starts[i]:starts[i] + x.shape[0]])

    if kind == "output":
        h = module.register_forward_hook(lambda m, a, o: apply(o))
    else:
        h = module.register_forward_pre_hook(lambda m, a: apply(a[0]))
    try:
        return net(batched(xs))
    finally:
        h.remove()


def traced(net, xs, write, site="output"):
    """One trace, one invoke per input; ``write(i, h)`` records invoke i's edits."""
    model = nnsight.NNsight(net)
    outs = []
    with model.trace() as tracer:
        for i, x in enumerate(xs):
            with tracer.invoke(x):
                write(i, getattr(model.layer1 if site == "output" else model.layer2, site))
                outs.append(model.output.save())
    assert_hooks_idle(net)
    return torch.cat([o.value for o in outs])


def inputs(device, sizes=(1, 1, 1, 1, 1, 1, 1, 1)):
    torch.manual_seed(1)
    return [torch.rand(n, 5, device=device) for n in sizes]


SIZES = [(1,) * 8, (2, 1, 3, 1), (1,) * 64]


@pytest.mark.parametrize("sizes", SIZES, ids=["8x1", "mixed", "64x1"])
def test_same_number_each_invoke(device, sizes):
    net, xs = make_tiny(device), inputs(device, sizes)

    def write(i, h):
        h[:, i % 10] = 0

    got = traced(net, xs, write)
    want = hand_rows(net, net.layer1, xs, write)
    assert_close(got, want)


@pytest.mark.parametrize("sizes", SIZES, ids=["8x1", "mixed", "64x1"])
def test_numbers_and_tensors(device, sizes):
    """Each invoke writes its own value: ints, floats, bools, 0-d tensors, rows of
    another dtype, values that broadcast over the invoke's rows."""
    net, xs = make_tiny(device), inputs(device, sizes)
    torch.manual_seed(3)
    values = []
    for i, x in enumerate(xs):
        kind = i % 6
        if kind == 0:
            values.append(i)
        elif kind == 1:
            values.append(-1.5 * i)
        elif kind == 2:
            values.append(torch.tensor(7.0, device=device))
        elif kind == 3:
            values.append(torch.rand(1, device=device, dtype=torch.float64))
        elif kind == 4:
            values.append(torch.rand(x.shape[0], device=device))  # one value per row
        else:
            values.append(True)

    def write(i, h):
        h[:, (3 * i) % 10] = values[i]

    got = traced(net, xs, write)
    want = hand_rows(net, net.layer1, xs, write)
    assert_close(got, want)


def test_row_and_position_forms(device):
    """An int row, a trailing `...`, no coordinate at all, a whole-row tensor with a
    leading 1; invokes that write nothing in between."""
    net, xs = make_tiny(device), inputs(device, (2, 1, 2, 1, 3, 1))
    torch.manual_seed(4)
    rows = [torch.rand(1, 10, device=device) for _ in xs]
    forms = [
        lambda h, i: h.__setitem__((0, 4), 3.0),
        lambda h, i: h.__setitem__((-1, Ellipsis), 2.0),
        None,
        lambda h, i: h.__setitem__(slice(None), rows[i]),
        lambda h, i: h.__setitem__((1, 2), torch.tensor([5.0], device=device)),
        lambda h, i: h.__setitem__((slice(None), slice(None)), -1),
    ]

    def write(i, h):
        if forms[i] is not None:
            forms[i](h, i)

    got = traced(net, xs, write)
    want = hand_rows(net, net.layer1, xs, write)
    assert_close(got, want)


def test_input_site(device):
    net, xs = make_tiny(device), inputs(device)

    def write(i, h):
        h[:, i] = 10.0 + i

    got = traced(net, xs, write, site="input")
    want = hand_rows(net, net.layer2, xs, write, kind="pre")
    assert_close(got, want)


def test_order_within_an_invoke(device):
    """Writes of one invoke to the same place keep their order; reads between writes
    see what was written before them, not after."""
    net, xs = make_tiny(device), inputs(device, (1, 2, 1))
    model = nnsight.NNsight(net)
    sums, outs = [], []
    with model.trace() as tracer:
        for i, x in enumerate(xs):
            with tracer.invoke(x):
                h = model.layer1.output
                h[:, 0] = 1.0
                h[:, 1] = 2.0
                h[:, 0] = 3.0 + i
                sums.append(h.sum(dim=1).save())
                h[:, 2] = 100.0
                outs.append(model.output.save())
    out = torch.cat([o.value for o in outs])
    got_sums = [s.value for s in sums]

    want_sums = []

    def write(i, r):
        r[:, 0] = 1.0
        r[:, 1] = 2.0
        r[:, 0] = 3.0 + i
        want_sums.append(r.sum(dim=1).clone())
        r[:, 2] = 100.0

    want = hand_rows(net, net.layer1, xs, write)
    assert_close(out, want)
    assert_close(got_sums, want_sums)


def test_value_read_from_another_invoke(device):
    """Invoke 1 writes a view of invoke 0's rows, which invoke 0 changed just before:
    it gets the changed value, as the writes done in order give."""
    net, xs = make_tiny(device), inputs(device, (1, 1, 1))
    model = nnsight.NNsight(net)
    outs = []
    with model.trace() as tracer:
        with tracer.invoke(xs[0]):
            a = model.layer1.output[:, 1]
            model.layer1.output[:, 1] = 5.0
            outs.append(model.output.save())
        with tracer.invoke(xs[1]):
            model.layer1.output[:, 1] = a
            outs.append(model.output.save())
        with tracer.invoke(xs[2]):
            model.layer1.output[:, 1] = -5.0
            outs.append(model.output.save())
    out = torch.cat([o.value for o in outs])

    def hook(m, args, o):
        a = o[0:1, 1]
        o[0:1, 1] = 5.0
        o[1:2, 1] = a
        o[2:3, 1] = -5.0

    h = net.layer1.register_forward_hook(hook)
    try:
        want = net(batched(xs))
    finally:
        h.remove()
    assert_close(out, want)


def test_gradients(device):
    """Gradients through the patched output (to the parameters and to a value that is
    itself computed in the trace) match the writes done one by one."""
    xs = inputs(device, (1, 2, 1, 1))

    def write(i, h):
        h[:, i] = (h[:, 9] * 2.0) if i % 2 else 0.5

    def run(traced_run):
        net = make_tiny(device)
        out = traced(net, xs, write) if traced_run else hand_rows(net, net.layer1, xs, write)
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    got, got_grads = run(True)
    want, want_grads = run(False)
    assert_close(got, want)
    assert_close(got_grads, want_grads)


def test_gpt2_patching_sweep(device):
    """The activation-patching sweep: every invoke copies a clean hidden state into
    one layer at one position."""
    net = make_gpt2(device=device)
    torch.manual_seed(5)
    clean_ids = torch.randint(0, 100, (1, 6), device=device)
    corrupt = torch.randint(0, 100, (1, 6), device=device)
    clean = []
    hs = [b.register_forward_hook(lambda m, a, o: clean.append(o[0].detach().clone())) for b in net.transformer.h]
    with torch.no_grad():
        net(clean_ids)
    for h in hs:
        h.remove()
    runs = [(l, p) for l in range(2) for p in range(6)]

    model = nnsight.NNsight(net)
    saved = []
    with torch.no_grad(), model.trace() as tracer:
        for l, p in runs:
            with tracer.invoke(corrupt):
                model.transformer.h[l].output[0][:, p] = clean[l][:, p]
                saved.append(model.lm_head.output[:, -1].save())
    assert_hooks_idle(net)

    want = []
    for l, p in runs:
        def patch(m, a, o, l=l, p=p):
            o[0][:, p] = clean[l][:, p]

        h = net.transformer.h[l].register_forward_hook(patch)
        try:
            with torch.no_grad():
                want.append(net(corrupt).logits[:, -1])
        finally:
            h.remove()
    assert_close([s.value for s in saved], want, atol=1e-5, rtol=1e-5)


def test_bad_write_raises_and_leaves_nothing(device):
    """A write that does not fit its invoke's rows raises the usual indexing error,
    naming the line, among writes that would have been joined."""
    net, xs = make_tiny(device), inputs(device, (1, 1, 1))
    model = nnsight.NNsight(net)
    with pytest.raises(Exception) as info:
        with model.trace() as tracer:
            for i, x in enumerate(xs):
                with tracer.invoke(x):
                    model.layer1.output[:, 10 if i == 1 else i] = 0  # bad write
    assert "bad write" in "\n".join(getattr(info.value, "__notes__", [])), info.value
    assert_hooks_idle(net)

    with pytest.raises(Exception) as info:
        with model.trace() as tracer:
            for i, x in enumerate(xs):
                with tracer.invoke(x):
                    model.layer1.output[:, 0] = torch.zeros(3, device=device) if i == 2 else 1.0  # bad shape
    assert "bad shape" in "\n".join(getattr(info.value, "__notes__", [])), info.value
    assert_hooks_idle(net)
    # The model works afterwards.
    with model.trace(xs[0]):
        out = model.output.save()
    assert_close(out, net(xs[0]))


def test_one_write():
    """The writes of 16 invokes into layer1's output run as one index_put_, not 16
    narrowed fills."""
    net, xs = make_tiny(), inputs("cpu", (1,) * 16)
    model = nnsight.NNsight(net)

    def trace():
        with model.trace() as tracer:
            for i, x in enumerate(xs):
                with tracer.invoke(x):
                    model.layer1.output[:, i % 10] = 0

    trace()
    with torch.autograd.profiler.profile() as prof:
        trace()
    names = [e.name for e in prof.function_events]
    assert names.count("aten::index_put_") == 1, names
    assert names.count("aten::fill_") == 0, names
