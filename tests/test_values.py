"""Values on the tiny MLP (``layer1 = Linear(5, 10)``, ``layer2 = Linear(10, 2)``).

Every expected value is computed with plain PyTorch: submodules called directly, or
forward hooks registered by hand (the ``hooks`` fixture). Nothing is copied from
fastinterleave's own output.
"""

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
from conftest import assert_hooks_idle


# -- helpers ----------------------------------------------------------------------------


def assert_unchanged(net, x, expected_out):
    """The model runs exactly as before: no active hooks, same output as a plain forward."""
    assert_hooks_idle(net)
    with torch.no_grad():
        assert_close(net(x), expected_out, rtol=0, atol=0)


def plain(net, x):
    """(layer1 output, model output) of a plain forward, by calling the submodules."""
    with torch.no_grad():
        h = net.layer1(x)
        return h, net.layer2(h)


@pytest.fixture
def xs(device):
    torch.manual_seed(2)
    return torch.randn(32, 5, device=device)


# -- saving -------------------------------------------------------------------------------


def test_save_one_output(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        hidden = model.layer1.output.save()
    assert isinstance(hidden, torch.Tensor)
    assert_close(hidden, h)
    assert_unchanged(tiny, x, out)


def test_save_all_outputs(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        h1 = model.layer1.output.save()
        h2 = model.layer2.output.save()
        root = model.output.save()
    assert_close(h1, h)
    assert_close(h2, out)
    assert_close(root, out)
    assert_unchanged(tiny, x, out)


def test_save_root_output_and_input(tiny, x):
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)
    with model.trace(x):
        root_out = model.output.save()
        root_in = model.input.save()
        root_inputs = model.inputs.save()
    assert_close(root_out, out)
    assert_close(root_in, x)
    args, kwargs = root_inputs
    assert len(args) == 1 and kwargs == {}
    assert_close(args[0], x)
    assert_unchanged(tiny, x, out)


def test_save_inputs_of_submodules(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        in1 = model.layer1.input.save()
        in2 = model.layer2.input.save()
        inputs2 = model.layer2.inputs.save()
    assert_close(in1, x)
    assert_close(in2, h)
    assert_close(inputs2[0][0], h)
    assert inputs2[1] == {}
    assert_unchanged(tiny, x, out)


def test_proxy_in_container_gives_value(tiny, x):
    """A proxy held elsewhere (not a top-level local) gives its value through `.value`."""
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    held = {}
    with model.trace(x):
        held["h"] = model.layer1.output.save()
        held["unsaved"] = model.layer2.output * 2
    assert_close(held["h"].value, h)
    with pytest.raises(ValueError):
        held["unsaved"].value
    assert_unchanged(tiny, x, out)


# -- in-place edits -------------------------------------------------------------------------


def _edit_case(index_fn, value):
    """A hook that does `o[index] = value` in place."""

    def fn(o):
        o[index_fn(o)] = value

    return fn


@pytest.mark.parametrize(
    "name",
    ["int", "slice_col", "slice_step", "none", "ellipsis", "tensor_idx", "list_idx", "bool_mask_const",
     "tuple_ints", "neg_int"],
)
def test_inplace_edit_indices(tiny, x, hooks, name, device):
    cols = torch.tensor([1, 3, 7], device=device)
    mask = torch.tensor([True, False] * 5, device=device)
    keys = {
        "int": (slice(None), 0),
        "slice_col": (slice(None), slice(2, 6)),
        "slice_step": (slice(None), slice(None, None, 3)),
        "none": (None, slice(None), 4),
        "ellipsis": (Ellipsis, -1),
        "tensor_idx": (slice(None), cols),
        "list_idx": (slice(None), [0, 9]),
        "bool_mask_const": (slice(None), mask),
        "tuple_ints": (0, 5),
        "neg_int": (-1, -2),
    }
    key = keys[name]
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)

    hooks.output(tiny.layer1, _edit_case(lambda o: key, 0.0))
    saved = {}
    hooks.output(tiny.layer1, lambda o: saved.__setitem__("h", o.detach().clone()))
    hooks.output(tiny.layer2, lambda o: saved.__setitem__("out", o.detach().clone()))
    with torch.no_grad():
        tiny(x)
    hooks.remove()

    with model.trace(x):
        model.layer1.output[key] = 0
        h1 = model.layer1.output.save()
        o = model.output.save()
    assert_close(h1, saved["h"])
    assert_close(o, saved["out"])
    assert not torch.equal(saved["out"], out)  # the edit changed something
    assert_unchanged(tiny, x, out)


def test_inplace_edit_bool_mask_from_proxy(tiny, x, hooks):
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)
    saved = {}

    def edit(o):
        o[o > 0] = 0
        saved["h"] = o.detach().clone()

    hooks.output(tiny.layer1, edit)
    hooks.output(tiny.layer2, lambda o: saved.__setitem__("out", o.detach().clone()))
    with torch.no_grad():
        tiny(x)
    hooks.remove()

    with model.trace(x):
        h = model.layer1.output
        h[h > 0] = 0
        h1 = model.layer1.output.save()
        o = model.output.save()
    assert (h1 <= 0).all()
    assert_close(h1, saved["h"])
    assert_close(o, saved["out"])
    assert_unchanged(tiny, x, out)


def test_inplace_edit_with_proxy_value(tiny, x, hooks):
    """`o[:, 0] = o[:, 1] * 3`: the assigned value is itself computed from the model."""
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)

    def edit(o):
        o[:, 0] = o[:, 1] * 3

    saved = {}
    hooks.output(tiny.layer1, edit)
    hooks.output(tiny.layer2, lambda o: saved.__setitem__("out", o.detach().clone()))
    with torch.no_grad():
        tiny(x)
    hooks.remove()

    with model.trace(x):
        model.layer1.output[:, 0] = model.layer1.output[:, 1] * 3
        o = model.output.save()
    assert_close(o, saved["out"])
    assert_unchanged(tiny, x, out)


def test_inplace_edit_tensor_value(tiny, x, device):
    """Assigning a tensor to a slice; the effect on layer2 is checked by calling it directly."""
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    patch = torch.arange(4.0, device=device)
    with model.trace(x):
        model.layer1.output[:, 3:7] = patch
        o = model.output.save()
    expected_h = h.clone()
    expected_h[:, 3:7] = patch
    with torch.no_grad():
        assert_close(o, tiny.layer2(expected_h))
    assert_unchanged(tiny, x, out)


def test_saved_before_inplace_edit_sees_edit(tiny, x, hooks):
    """A saved output and an in-place edit of it are the same tensor, as with plain hooks."""
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)
    saved = {}

    def save_then_edit(o):
        saved["h"] = o  # the output itself, as a hook that keeps it
        o[:, 0] = 0

    hooks.output(tiny.layer1, save_then_edit)
    with torch.no_grad():
        tiny(x)
    hooks.remove()

    with model.trace(x):
        before = model.layer1.output.save()
        model.layer1.output[:, 0] = 0
    assert_close(before, saved["h"])
    assert (before[:, 0] == 0).all()
    assert_unchanged(tiny, x, out)


def test_inplace_edit_on_layer2_output(tiny, x):
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)
    with model.trace(x):
        model.layer2.output[:, 1] = 7
        o = model.output.save()
    expected = out.clone()
    expected[:, 1] = 7
    assert_close(o, expected)
    assert_unchanged(tiny, x, out)


# -- swaps --------------------------------------------------------------------------------


def test_swap_doubles(tiny, x, hooks):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        model.layer1.output = model.layer1.output * 2
        o = model.output.save()
    with torch.no_grad():
        assert_close(o, tiny.layer2(h * 2))
    assert_unchanged(tiny, x, out)


def test_swap_zeros(tiny, x, device):
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)
    with model.trace(x):
        model.layer1.output = torch.zeros(1, 10, device=device)
        o = model.output.save()
    # layer2(0) is its bias
    assert_close(o, tiny.layer2.bias.detach().expand(1, 2))
    assert_unchanged(tiny, x, out)


def test_read_after_swap_sees_swapped_value(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        model.layer1.output = model.layer1.output * 2
        after = model.layer1.output.save()
        in2 = model.layer2.input.save()
    assert_close(after, h * 2)
    assert_close(in2, h * 2)
    assert_unchanged(tiny, x, out)


def test_saved_before_swap_keeps_content(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        before = model.layer1.output.save()
        model.layer1.output = model.layer1.output * 2
        after = model.layer1.output.save()
        o = model.output.save()
    assert_close(before, h)
    assert_close(after, h * 2)
    with torch.no_grad():
        assert_close(o, tiny.layer2(h * 2))
    assert_unchanged(tiny, x, out)


def test_saved_before_swap_keeps_content_two_invokes(tiny, xs):
    model = nnsight.NNsight(tiny)
    a, b = xs[0:1], xs[1:2]
    batch = torch.cat([a, b])
    h, out = plain(tiny, batch)
    with model.trace() as tracer:
        with tracer.invoke(a):
            before0 = model.layer1.output.save()
            model.layer1.output = model.layer1.output * 2
            after0 = model.layer1.output.save()
            o0 = model.output.save()
        with tracer.invoke(b):
            before1 = model.layer1.output.save()
            model.layer1.output = torch.zeros_like(model.layer1.output)
            after1 = model.layer1.output.save()
            o1 = model.output.save()
    assert_close(before0, h[0:1])
    assert_close(after0, h[0:1] * 2)
    assert_close(before1, h[1:2])
    assert_close(after1, torch.zeros_like(h[1:2]))
    with torch.no_grad():
        assert_close(o0, tiny.layer2(h[0:1] * 2))
        assert_close(o1, tiny.layer2(torch.zeros_like(h[1:2])))
    assert_unchanged(tiny, batch, out)


def test_swap_in_one_invoke_only_changes_its_rows(tiny, xs):
    model = nnsight.NNsight(tiny)
    a, b = xs[0:1], xs[1:2]
    batch = torch.cat([a, b])
    h, out = plain(tiny, batch)
    with model.trace() as tracer:
        with tracer.invoke(a):
            o0 = model.output.save()
        with tracer.invoke(b):
            model.layer1.output = model.layer1.output + 1
            o1 = model.output.save()
    assert_close(o0, out[0:1])
    with torch.no_grad():
        assert_close(o1, tiny.layer2(h[1:2] + 1))
    assert_unchanged(tiny, batch, out)


def test_swap_then_inplace_edit(tiny, x):
    """An in-place edit recorded after a swap lands on the swapped value."""
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        model.layer1.output = model.layer1.output * 2
        model.layer1.output[:, 0] = 0
        o = model.output.save()
    expected = h * 2
    expected[:, 0] = 0
    with torch.no_grad():
        assert_close(o, tiny.layer2(expected))
    assert_unchanged(tiny, x, out)


def test_swap_root_output(tiny, x):
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)
    with model.trace(x) as tracer:
        model.output = model.output + 10
        o = model.output.save()
    assert_close(o, out + 10)
    assert_close(tracer.output, out + 10)
    assert_unchanged(tiny, x, out)


# -- .input / .inputs -------------------------------------------------------------------------


def test_input_inplace_edit(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        model.layer2.input[:, 2] = 0
        in2 = model.layer2.input.save()
        o = model.output.save()
    expected = h.clone()
    expected[:, 2] = 0
    assert_close(in2, expected)
    with torch.no_grad():
        assert_close(o, tiny.layer2(expected))
    assert_unchanged(tiny, x, out)


def test_input_swap(tiny, x, device):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    new = torch.linspace(-1, 1, 10, device=device).unsqueeze(0)
    with model.trace(x):
        model.layer2.input = new
        o = model.output.save()
        h1 = model.layer1.output.save()
    with torch.no_grad():
        assert_close(o, tiny.layer2(new))
    assert_close(h1, h)  # layer1's own output is untouched
    assert_unchanged(tiny, x, out)


def test_input_swap_from_proxy(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        model.layer2.input = model.layer2.input * -1
        in2 = model.layer2.input.save()
        o = model.output.save()
    assert_close(in2, -h)
    with torch.no_grad():
        assert_close(o, tiny.layer2(-h))
    assert_unchanged(tiny, x, out)


def test_inputs_swap(tiny, x, device):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    t = torch.full((1, 10), 0.5, device=device)
    with model.trace(x):
        model.layer2.inputs = ((t,), {})
        o = model.output.save()
        inputs = model.layer2.inputs.save()
    with torch.no_grad():
        assert_close(o, tiny.layer2(t))
    assert_close(inputs[0][0], t)
    assert_unchanged(tiny, x, out)


def test_inputs_get_and_edit(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        first = model.layer2.inputs[0][0]
        first[:, :5] = 1
        o = model.output.save()
    expected = h.clone()
    expected[:, :5] = 1
    with torch.no_grad():
        assert_close(o, tiny.layer2(expected))
    assert_unchanged(tiny, x, out)


def test_root_input_edit(tiny, x):
    """Editing the root's input in place reaches layer1 (as a pre-hook edit would)."""
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)
    xx = x.clone()
    with model.trace(xx):
        model.input[:, 0] = 0
        o = model.output.save()
    expected_x = x.clone()
    expected_x[:, 0] = 0
    with torch.no_grad():
        assert_close(o, tiny(expected_x))
    assert_unchanged(tiny, x, out)


# -- operators, torch functions, tensor methods -------------------------------------------------


def test_arithmetic_operators(tiny, x, device):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    w = torch.randn(10, 3, device=device, generator=None)
    with model.trace(x):
        p = model.layer1.output
        r_sub = (1 - p).save()
        r_mul = (2 * p).save()
        r_div = (p / 3).save()
        r_pow = (p**2).save()
        r_matmul = (p @ w).save()
        r_neg = (-p).save()
        r_add = (p + 1.5).save()
        r_radd = (1.5 + p).save()
        r_sub2 = (p - 0.25).save()
        r_rdiv = (2 / (p + 10)).save()
        r_rpow = (2**p).save()
        r_floordiv = (p // 0.3).save()
        r_mod = (p % 0.3).save()
        r_abs = abs(p).save()
        r_pos = (+p).save()
        r_pp = (p * p + p).save()
        r_tensor_left = (w.T @ p.T).save()
        r_tensor_sub = (torch.ones_like(h) - p).save()
    assert_close(r_sub, 1 - h)
    assert_close(r_mul, 2 * h)
    assert_close(r_div, h / 3)
    assert_close(r_pow, h**2)
    assert_close(r_matmul, h @ w)
    assert_close(r_neg, -h)
    assert_close(r_add, h + 1.5)
    assert_close(r_radd, 1.5 + h)
    assert_close(r_sub2, h - 0.25)
    assert_close(r_rdiv, 2 / (h + 10))
    assert_close(r_rpow, 2**h)
    assert_close(r_floordiv, h // 0.3)
    assert_close(r_mod, h % 0.3)
    assert_close(r_abs, h.abs())
    assert_close(r_pos, h)
    assert_close(r_pp, h * h + h)
    assert_close(r_tensor_left, w.T @ h.T)
    assert_close(r_tensor_sub, 1 - h)
    assert_unchanged(tiny, x, out)


def test_comparison_and_bitwise_operators(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        p = model.layer1.output
        gt = (p > 0).save()
        ge = (p >= 0.1).save()
        lt = (p < 0).save()
        le = (p <= -0.1).save()
        eq = (p == p).save()
        ne = (p != 0).save()
        both = ((p > -0.2) & (p < 0.2)).save()
        either = ((p > 0.3) | (p < -0.3)).save()
        xor = ((p > 0) ^ (p > 0.2)).save()
        inv = (~(p > 0)).save()
    assert gt.dtype == torch.bool
    assert torch.equal(gt, h > 0)
    assert torch.equal(ge, h >= 0.1)
    assert torch.equal(lt, h < 0)
    assert torch.equal(le, h <= -0.1)
    assert torch.equal(eq, torch.ones_like(h, dtype=torch.bool))
    assert torch.equal(ne, h != 0)
    assert torch.equal(both, (h > -0.2) & (h < 0.2))
    assert torch.equal(either, (h > 0.3) | (h < -0.3))
    assert torch.equal(xor, (h > 0) ^ (h > 0.2))
    assert torch.equal(inv, ~(h > 0))
    assert_unchanged(tiny, x, out)


def test_torch_functions(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    F = torch.nn.functional
    with model.trace(x):
        p = model.layer1.output
        sm = torch.softmax(p, -1).save()
        fsm = F.softmax(p, dim=-1).save()
        cat = torch.cat([p, p], 1).save()
        stack = torch.stack([p, p * 2]).save()
        relu = F.relu(p).save()
        gelu = F.gelu(p).save()
        where = torch.where(p > 0, p, torch.zeros_like(p)).save()
        where_scalar = torch.where(p > 0, p, 0.0).save()
        tsum = torch.sum(p).save()
        tmax = torch.max(p).save()
        tanh = torch.tanh(p).save()
        mm = torch.matmul(p, p.T).save()
        clamp = torch.clamp(p, -0.1, 0.1).save()
        ln = F.layer_norm(p, (10,)).save()
    assert_close(sm, torch.softmax(h, -1))
    assert_close(fsm, torch.softmax(h, -1))
    assert_close(cat, torch.cat([h, h], 1))
    assert_close(stack, torch.stack([h, h * 2]))
    assert_close(relu, torch.relu(h))
    assert_close(gelu, F.gelu(h))
    assert_close(where, torch.where(h > 0, h, torch.zeros_like(h)))
    assert_close(where_scalar, torch.where(h > 0, h, 0.0))
    assert_close(tsum, h.sum())
    assert_close(tmax, h.max())
    assert_close(tanh, torch.tanh(h))
    assert_close(mm, h @ h.T)
    assert_close(clamp, h.clamp(-0.1, 0.1))
    assert_close(ln, F.layer_norm(h, (10,)))
    assert_unchanged(tiny, x, out)


def test_tensor_methods(tiny, xs):
    model = nnsight.NNsight(tiny)
    batch = xs[:4]
    h, out = plain(tiny, batch)
    with model.trace(batch):
        p = model.layer1.output
        s = p.sum(1).save()
        m = p.mean(dim=-1).save()
        v = p.view(1, -1).save()
        c = p.clone().save()
        am = p.argmax(-1).save()
        t = p.T.save()
        shape = p.shape.save()
        size1 = p.size(1).save()
        reshaped = p.reshape(2, 20).save()
        unsq = p.unsqueeze(0).save()
        tr = p.transpose(0, 1).save()
        dbl = p.to(torch.float64).save()
        chained = p.abs().exp().sum(dim=0, keepdim=True).save()
        dt = p.dtype.save()
    assert_close(s, h.sum(1))
    assert_close(m, h.mean(dim=-1))
    assert_close(v, h.view(1, -1))
    assert_close(c, h)
    assert torch.equal(am, h.argmax(-1))
    assert_close(t, h.T)
    assert tuple(shape) == (4, 10)
    assert size1 == 10
    assert_close(reshaped, h.reshape(2, 20))
    assert_close(unsq, h.unsqueeze(0))
    assert_close(tr, h.transpose(0, 1))
    assert dbl.dtype == torch.float64
    assert_close(dbl, h.double())
    assert_close(chained, h.abs().exp().sum(dim=0, keepdim=True))
    assert dt == torch.float32
    assert_unchanged(tiny, batch, out)


def test_named_tuple_results(tiny, xs):
    """Ops returning torch.return_types (max with dim, topk, sort) keep their field names."""
    model = nnsight.NNsight(tiny)
    batch = xs[:4]
    h, out = plain(tiny, batch)
    with model.trace(batch):
        p = model.layer1.output
        mx = p.max(dim=-1).values.save()
        topi = p.topk(3, dim=-1).indices.save()
        srt = torch.sort(p, -1).values.save()
    assert_close(mx, h.max(dim=-1).values)
    assert torch.equal(topi, h.topk(3, dim=-1).indices)
    assert_close(srt, torch.sort(h, -1).values)
    assert_unchanged(tiny, batch, out)


def test_clone_is_independent(tiny, x):
    """Editing a clone of an output does not touch the model."""
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        c = model.layer1.output.clone()
        c[:, :] = 0
        c = c.save()
        h1 = model.layer1.output.save()
        o = model.output.save()
    assert_close(c, torch.zeros_like(h))
    assert_close(h1, h)
    assert_close(o, out)
    assert_unchanged(tiny, x, out)


def test_indexing_results(tiny, xs, device):
    model = nnsight.NNsight(tiny)
    batch = xs[:3]
    h, out = plain(tiny, batch)
    idx = torch.tensor([2, 0], device=device)
    with model.trace(batch):
        p = model.layer1.output
        row = p[0].save()
        elem = p[1, 4].save()
        sl = p[:, 2:5].save()
        ell = p[..., -1].save()
        none = p[None, 1].save()
        lst = p[:, [1, 3]].save()
        tens = p[idx].save()
        masked = p[p > 0].save()
        step = p[::2, 1::3].save()
        by_argmax = p[torch.arange(3, device=device), p.argmax(-1)].save()
        half = p[:, : p.shape[1] // 2].save()
    assert_close(row, h[0])
    assert_close(elem, h[1, 4])
    assert_close(sl, h[:, 2:5])
    assert_close(ell, h[..., -1])
    assert_close(none, h[None, 1])
    assert_close(lst, h[:, [1, 3]])
    assert_close(tens, h[idx])
    assert_close(masked, h[h > 0])
    assert_close(step, h[::2, 1::3])
    assert_close(by_argmax, h.max(-1).values)
    assert_close(half, h[:, :5])
    assert_unchanged(tiny, batch, out)


def test_scalar_from_proxy(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        item = model.layer1.output[0, 3].item().save()
        n = nnsight.apply(len, model.layer1.output[0]).save()
    assert isinstance(item, float)
    assert item == pytest.approx(h[0, 3].item())
    assert n == 10
    assert_unchanged(tiny, x, out)


# -- several invokes ------------------------------------------------------------------------


def test_two_invokes_saved_rows(tiny, xs):
    model = nnsight.NNsight(tiny)
    a, b = xs[0:1], xs[1:2]
    batch = torch.cat([a, b])
    h, out = plain(tiny, batch)
    with model.trace() as tracer:
        with tracer.invoke(a) as inv0:
            h0 = model.layer1.output.save()
            o0 = model.output.save()
            in0 = model.input.save()
        with tracer.invoke(b) as inv1:
            h1 = model.layer1.output.save()
            o1 = model.output.save()
            in1 = model.layer1.input.save()
    assert inv0.batch_size == 1 and inv1.batch_size == 1
    assert_close(inv0.inputs[0][0], a)
    assert_close(inv1.inputs[0][0], b)
    assert_close(h0, h[0:1])
    assert_close(h1, h[1:2])
    assert_close(o0, out[0:1])
    assert_close(o1, out[1:2])
    assert_close(in0, a)
    assert_close(in1, b)
    assert_close(tracer.output, out)
    assert_unchanged(tiny, batch, out)


def test_two_invokes_edit_only_own_rows(tiny, xs, hooks):
    model = nnsight.NNsight(tiny)
    a, b = xs[0:1], xs[1:2]
    batch = torch.cat([a, b])
    h, out = plain(tiny, batch)

    def edit(o):
        o[1:2, 0] = 0  # invoke 1's row only
        o[1:2, 5:] = 2

    ref = {}
    hooks.output(tiny.layer1, edit)
    hooks.output(tiny.layer1, lambda o: ref.__setitem__("h", o.detach().clone()))
    with torch.no_grad():
        ref["out"] = tiny(batch)
    hooks.remove()

    with model.trace() as tracer:
        with tracer.invoke(a):
            h0 = model.layer1.output.save()
            o0 = model.output.save()
        with tracer.invoke(b):
            model.layer1.output[:, 0] = 0
            model.layer1.output[..., 5:] = 2
            h1 = model.layer1.output.save()
            o1 = model.output.save()
    assert_close(h0, h[0:1])
    assert_close(o0, out[0:1])
    assert_close(h1, ref["h"][1:2])
    assert_close(o1, ref["out"][1:2])
    assert_close(tracer.output, ref["out"])
    assert_unchanged(tiny, batch, out)


def test_two_invokes_bool_mask_per_invoke(tiny, xs, hooks):
    """A mask computed from an invoke's value indexes that invoke's rows only."""
    model = nnsight.NNsight(tiny)
    a, b = xs[0:1], xs[1:2]
    batch = torch.cat([a, b])
    _, out = plain(tiny, batch)

    def edit(o):
        row = o[0:1]
        row[row > 0] = 0

    ref = {}
    hooks.output(tiny.layer1, edit)
    with torch.no_grad():
        ref["out"] = tiny(batch)
    hooks.remove()

    with model.trace() as tracer:
        with tracer.invoke(a):
            p = model.layer1.output
            p[p > 0] = 0
        with tracer.invoke(b):
            pass
    assert_close(tracer.output, ref["out"])
    assert_unchanged(tiny, batch, out)


def test_two_invokes_input_swaps(tiny, xs, device):
    model = nnsight.NNsight(tiny)
    a, b = xs[0:1], xs[1:2]
    batch = torch.cat([a, b])
    h, out = plain(tiny, batch)
    t = torch.full((1, 10), 0.25, device=device)
    with model.trace() as tracer:
        with tracer.invoke(a):
            model.layer2.inputs = ((t,), {})
            o0 = model.output.save()
        with tracer.invoke(b):
            model.layer2.input = model.layer2.input * 3
            in1 = model.layer2.input.save()
            o1 = model.output.save()
    with torch.no_grad():
        assert_close(o0, tiny.layer2(t))
        assert_close(o1, tiny.layer2(h[1:2] * 3))
    assert_close(in1, h[1:2] * 3)
    assert_unchanged(tiny, batch, out)


def test_two_invokes_saved_view_sees_inplace_edit(tiny, xs, hooks):
    """With several invokes a saved value is the invoke's view of the batch: a later
    in-place edit of the same invoke shows in it, as with plain hooks keeping o[1:2]."""
    model = nnsight.NNsight(tiny)
    a, b = xs[0:1], xs[1:2]
    batch = torch.cat([a, b])
    _, out = plain(tiny, batch)
    ref = {}

    def save_then_edit(o):
        ref["view"] = o[1:2]
        o[1:2, 4] = 9

    hooks.output(tiny.layer1, save_then_edit)
    with torch.no_grad():
        tiny(batch)
    hooks.remove()

    with model.trace() as tracer:
        with tracer.invoke(a):
            pass
        with tracer.invoke(b):
            before = model.layer1.output.save()
            model.layer1.output[:, 4] = 9
    assert_close(before, ref["view"])
    assert_unchanged(tiny, batch, out)


def test_32_invokes_saved_rows(tiny, xs):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, xs)
    hs, outs, sizes = [], [], []
    with model.trace() as tracer:
        for i in range(32):
            with tracer.invoke(xs[i : i + 1]) as inv:
                sizes.append(inv.batch_size)
                hs.append(model.layer1.output.save())
                outs.append(model.output.save())
    assert sizes == [1] * 32
    for i in range(32):
        assert_close(hs[i].value, h[i : i + 1])
        assert_close(outs[i].value, out[i : i + 1])
    assert_close(tracer.output, out)
    assert_unchanged(tiny, xs, out)


def test_32_invokes_edits_own_rows(tiny, xs, hooks):
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, xs)

    def edit(o):
        for i in range(32):
            o[i, i % 10] = float(i)

    ref = {}
    hooks.output(tiny.layer1, edit)
    hooks.output(tiny.layer1, lambda o: ref.__setitem__("h", o.detach().clone()))
    with torch.no_grad():
        ref["out"] = tiny(xs)
    hooks.remove()

    hs, outs = [], []
    with model.trace() as tracer:
        for i in range(32):
            with tracer.invoke(xs[i : i + 1]):
                model.layer1.output[0, i % 10] = float(i)
                hs.append(model.layer1.output.save())
                outs.append(model.output.save())
    for i in range(32):
        assert_close(hs[i].value, ref["h"][i : i + 1])
        assert_close(outs[i].value, ref["out"][i : i + 1])
    assert_close(tracer.output, ref["out"])
    assert_unchanged(tiny, xs, out)


def test_32_invokes_swaps_own_rows(tiny, xs):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, xs)
    outs = []
    with model.trace() as tracer:
        for i in range(32):
            with tracer.invoke(xs[i : i + 1]):
                model.layer1.output = model.layer1.output * i
                outs.append(model.output.save())
    with torch.no_grad():
        scale = torch.arange(32.0, device=xs.device).unsqueeze(1)
        expected = tiny.layer2(h * scale)
    for i in range(32):
        assert_close(outs[i].value, expected[i : i + 1])
    assert_close(tracer.output, expected)
    assert_unchanged(tiny, xs, out)


def test_invoke_batch3_next_to_batch1(tiny, xs):
    model = nnsight.NNsight(tiny)
    a, b = xs[0:3], xs[3:4]
    batch = torch.cat([a, b])
    h, out = plain(tiny, batch)
    with model.trace() as tracer:
        with tracer.invoke(a) as inv0:
            h0 = model.layer1.output.save()
            model.layer1.output[:, 1] = -5
            o0 = model.output.save()
            s0 = model.layer1.output.shape.save()
        with tracer.invoke(b) as inv1:
            h1 = model.layer1.output.save()
            o1 = model.output.save()
    assert inv0.batch_size == 3 and inv1.batch_size == 1
    assert_close(inv0.inputs[0][0], a)
    assert_close(inv1.inputs[0][0], b)
    assert tuple(s0) == (3, 10)
    expected_h0 = h[0:3].clone()
    expected_h0[:, 1] = -5
    assert_close(h0, expected_h0)  # saved before the edit: the same tensor, edited in place
    with torch.no_grad():
        assert_close(o0, tiny.layer2(expected_h0))
    assert_close(h1, h[3:4])
    assert_close(o1, out[3:4])
    assert_unchanged(tiny, batch, out)


def test_cross_invoke_patching(tiny, xs, hooks):
    """Clean -> corrupted: a value read in invoke 0 written into the same layer in invoke 1."""
    model = nnsight.NNsight(tiny)
    clean, corrupted = xs[0:1], xs[1:2]
    batch = torch.cat([clean, corrupted])
    _, out = plain(tiny, batch)

    ref = {}
    hooks.output(tiny.layer1, lambda o: ref.__setitem__("clean_h", o.detach().clone()))
    with torch.no_grad():
        ref["clean_out"] = tiny(clean)
    hooks.remove()

    def patch(o):
        o[:, 2:6] = ref["clean_h"][:, 2:6]

    hooks.output(tiny.layer1, patch)
    with torch.no_grad():
        ref["patched_out"] = tiny(corrupted)
    hooks.remove()

    with model.trace() as tracer:
        with tracer.invoke(clean):
            clean_slice = model.layer1.output[:, 2:6]
            o_clean = model.output.save()
        with tracer.invoke(corrupted):
            model.layer1.output[:, 2:6] = clean_slice
            o_patched = model.output.save()
    assert_close(o_clean, ref["clean_out"])
    assert_close(o_patched, ref["patched_out"])
    assert not torch.allclose(ref["patched_out"], out[1:2])
    assert_unchanged(tiny, batch, out)


def test_cross_invoke_swap(tiny, xs):
    """Swap invoke 1's whole layer1 output by invoke 0's."""
    model = nnsight.NNsight(tiny)
    clean, corrupted = xs[0:1], xs[1:2]
    batch = torch.cat([clean, corrupted])
    h, out = plain(tiny, batch)
    with model.trace() as tracer:
        with tracer.invoke(clean):
            clean_h = model.layer1.output
        with tracer.invoke(corrupted):
            model.layer1.output = clean_h
            o = model.output.save()
    assert_close(o, out[0:1])
    assert_close(tracer.output, torch.cat([out[0:1], out[0:1]]))
    assert_unchanged(tiny, batch, out)


# -- scheduling -----------------------------------------------------------------------------


def test_out_of_order_read_sees_later_edit(tiny, x):
    """`b = layer2.output.save()` recorded before an edit of layer1: b reflects the edit."""
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        b = model.layer2.output.save()
        model.layer1.output[:, 0] = 0
    expected = h.clone()
    expected[:, 0] = 0
    with torch.no_grad():
        assert_close(b, tiny.layer2(expected))
    assert_unchanged(tiny, x, out)


def test_out_of_order_swap(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        b = model.layer2.output.save()
        model.layer1.output = model.layer1.output + 1
    with torch.no_grad():
        assert_close(b, tiny.layer2(h + 1))
    assert_unchanged(tiny, x, out)


def test_ineffective_edit_raises(tiny, x):
    """An edit of layer1 recorded after an access of layer2 would run only once layer2 ran
    (nnsight 0.4.11 silently changes nothing there): fastinterleave raises instead."""
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)
    with pytest.raises(nnsight.InterventionError):
        with model.trace(x):
            h = model.layer1.output
            model.layer2.output.save()
            h[:, 0] = 0
    assert_unchanged(tiny, x, out)


@pytest.mark.python_fallback
def test_list_append_program_order(tiny, x):
    """`hs.append(l2.output); n = nnsight.apply(len, hs)` gives 1 (side effects in program order)."""
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        hs = nnsight.list().save()
        hs.append(model.layer1.output)
        hs.append(model.layer2.output)
        n = nnsight.apply(len, hs).save()
    assert n == 2
    assert isinstance(hs, list) and len(hs) == 2
    assert_close(hs[0], h)
    assert_close(hs[1], out)
    assert_unchanged(tiny, x, out)


@pytest.mark.python_fallback
def test_list_append_then_len_early(tiny, x):
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)
    with model.trace(x):
        hs = nnsight.list().save()
        hs.append(model.layer2.output)
        n = nnsight.apply(len, hs).save()
    assert n == 1
    assert_close(hs[0], out)
    assert_unchanged(tiny, x, out)


@pytest.mark.python_fallback
def test_apply(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)

    def f(t, scale, shift=0.0):
        return t * scale + shift

    with model.trace(x):
        r = nnsight.apply(f, model.layer1.output, 3, shift=model.layer2.output.sum()).save()
        n = nnsight.apply(torch.linalg.vector_norm, model.layer1.output).save()
    assert_close(r, h * 3 + out.sum())
    assert_close(n, torch.linalg.vector_norm(h))
    assert_unchanged(tiny, x, out)


@pytest.mark.python_fallback
def test_apply_result_used_as_edit(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        model.layer1.output = nnsight.apply(torch.flip, model.layer1.output, [1])
        o = model.output.save()
    with torch.no_grad():
        assert_close(o, tiny.layer2(torch.flip(h, [1])))
    assert_unchanged(tiny, x, out)


# -- module calls and parameters -------------------------------------------------------------


@pytest.mark.python_fallback
def test_adhoc_module_call(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        y = model.layer2(model.layer1.output * 2).save()
        o = model.output.save()
    with torch.no_grad():
        assert_close(y, tiny.layer2(h * 2))
    assert_close(o, out)  # the ad-hoc call does not change the model's own run
    assert_unchanged(tiny, x, out)


@pytest.mark.python_fallback
def test_adhoc_module_call_does_not_fire_sites(tiny, x):
    """An ad-hoc call of layer2 is not a call of the model's layer2: its edit stays separate."""
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        model.layer2.output[:, 0] = 100
        y = model.layer2(model.layer1.output).save()
        o = model.output.save()
    with torch.no_grad():
        assert_close(y, tiny.layer2(h))
    expected = out.clone()
    expected[:, 0] = 100
    assert_close(o, expected)
    assert_unchanged(tiny, x, out)


def test_parameter_read_is_clone(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    w_before = tiny.layer1.weight.detach().clone()
    b_before = tiny.layer1.bias.detach().clone()
    with model.trace(x):
        w = model.layer1.weight.save()
        b = model.layer1.bias
        b[:] = 0
        w2 = model.layer1.weight
        w2[0, 0] = 123.0
        manual = (model.layer1.input @ model.layer1.weight.T + model.layer1.bias).save()
        o = model.output.save()
        h1 = model.layer1.output.save()
    assert_close(w, w_before)
    assert w.data_ptr() != tiny.layer1.weight.data_ptr()
    assert_close(tiny.layer1.weight.detach(), w_before, rtol=0, atol=0)
    assert_close(tiny.layer1.bias.detach(), b_before, rtol=0, atol=0)
    assert_close(manual, h)
    assert_close(h1, h)
    assert_close(o, out)
    assert_unchanged(tiny, x, out)


# -- after the trace ------------------------------------------------------------------------------


def test_eager_ops_after_trace(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    held = []
    with model.trace(x):
        model.layer1.output[:, 2] = 5
        saved = model.layer1.output.save()
        held.append(saved)
    # `saved` is the real tensor (frame injection); `held[0]` is still a proxy and evaluates eagerly
    assert isinstance(saved, torch.Tensor)
    assert bool((saved[:, 2] == 5).all())
    proxy = held[0]
    assert isinstance(proxy, nnsight.Proxy)
    eq = proxy[:, 2] == 5
    assert isinstance(eq, torch.Tensor) and bool(eq.all())
    expected = h.clone()
    expected[:, 2] = 5
    assert_close(proxy * 2, expected * 2)
    assert_close(proxy.sum(1), expected.sum(1))
    assert_close(torch.relu(proxy), torch.relu(expected))
    assert_close(proxy.T, expected.T)
    assert_unchanged(tiny, x, out)


def test_model_unchanged_after_failed_run(tiny, x, device):
    """A trace that fails while running leaves no hooks and no edits behind."""
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)
    with pytest.raises(Exception):
        with model.trace(x):
            model.layer1.output[:, 0] = 0
            model.layer1.output = model.layer1.output @ torch.ones(3, 3, device=device)  # shape error
            model.output.save()
    assert_unchanged(tiny, x, out)
    with model.trace(x):
        o = model.output.save()
    assert_close(o, out)
    assert_unchanged(tiny, x, out)


def test_model_unchanged_after_exception_in_block(tiny, x):
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)
    with pytest.raises(RuntimeError, match="user error"):
        with model.trace(x):
            model.layer1.output[:, 0] = 0
            raise RuntimeError("user error")
    assert_unchanged(tiny, x, out)
    with model.trace(x):
        o = model.output.save()
    assert_close(o, out)


def test_repeated_traces_are_independent(tiny, x):
    model = nnsight.NNsight(tiny)
    h, out = plain(tiny, x)
    with model.trace(x):
        model.layer1.output[:] = 0
        o1 = model.output.save()
    with model.trace(x):
        o2 = model.output.save()
        h2 = model.layer1.output.save()
    assert_close(o1, tiny.layer2.bias.detach().expand(1, 2))
    assert_close(o2, out)
    assert_close(h2, h)
    assert_unchanged(tiny, x, out)


def test_trace_false_runs_model(tiny, x):
    model = nnsight.NNsight(tiny)
    _, out = plain(tiny, x)
    res = model.trace(x, trace=False)
    assert_close(res, out)
    assert_unchanged(tiny, x, out)
