"""Values on a GPT-2-shaped LM (``conftest.make_gpt2``: 2 layers, 32 dims, random weights).

Every expected value is computed with plain PyTorch: forward hooks registered by hand
(the ``hooks`` fixture) on the same model, or submodules called directly.
"""

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
from conftest import assert_hooks_idle

pytest.importorskip("transformers")

T = 8  # sequence length


def logits_of(net, ids):
    with torch.no_grad():
        return net(ids).logits


def assert_unchanged(net, ids, expected_logits):
    assert_hooks_idle(net)
    assert_close(logits_of(net, ids), expected_logits, rtol=0, atol=0)


def record(hooks, module, store, key, index=None):
    """A plain hook keeping a detached copy of the output (or of output[index])."""

    def fn(o):
        v = o if index is None else o[index]
        store[key] = v.detach().clone()

    hooks.output(module, fn)


@pytest.fixture
def ids(device):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 100, (1, T), generator=g).to(device)


@pytest.fixture
def ids8(device):
    g = torch.Generator().manual_seed(4)
    return torch.randint(0, 100, (8, T), generator=g).to(device)


# -- saves ------------------------------------------------------------------------------------


def test_block_output_save(gpt2, ids, hooks):
    model = nnsight.NNsight(gpt2)
    ref = {}
    for i in range(2):
        record(hooks, gpt2.transformer.h[i], ref, f"h{i}", 0)
    hooks.output(gpt2.transformer.h[0], lambda o: ref.__setitem__("key0", o[1][0].detach().clone()))
    logits = logits_of(gpt2, ids)
    hooks.remove()

    with model.trace(ids):
        h0 = model.transformer.h[0].output[0].save()
        h1 = model.transformer.h[-1].output[0].save()
        whole = model.transformer.h[0].output.save()
    assert_close(h0, ref["h0"])
    assert_close(h1, ref["h1"])
    assert isinstance(whole, tuple) and len(whole) == 2
    assert_close(whole[0], ref["h0"])
    assert_close(whole[1][0], ref["key0"])
    assert_unchanged(gpt2, ids, logits)


def test_logits_model_output(gpt2, ids):
    model = nnsight.NNsight(gpt2)
    logits = logits_of(gpt2, ids)
    with model.trace(ids) as tracer:
        lg = model.output.logits.save()
        lg_key = model.output["logits"].save()
        lg_idx = model.output[0].save()
        out = model.output.save()
        last = model.output.logits[:, -1].argmax(-1).save()
    assert_close(lg, logits)
    assert_close(lg_key, logits)
    assert_close(lg_idx, logits)
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions"
    assert_close(out.logits, logits)
    assert_close(tracer.output.logits, logits)
    assert torch.equal(last, logits[:, -1].argmax(-1))
    assert_unchanged(gpt2, ids, logits)


def test_wte_output(gpt2, ids):
    model = nnsight.NNsight(gpt2)
    logits = logits_of(gpt2, ids)
    with torch.no_grad():
        emb = gpt2.transformer.wte(ids)
    with model.trace(ids):
        e = model.transformer.wte.output.save()
        e_in = model.transformer.wte.input.save()
    assert_close(e, emb)
    assert torch.equal(e_in, ids)
    assert_unchanged(gpt2, ids, logits)


def test_attn_mlp_ln_outputs(gpt2, ids, hooks):
    model = nnsight.NNsight(gpt2)
    ref = {}
    block = gpt2.transformer.h[0]
    record(hooks, block.attn, ref, "attn", 0)
    record(hooks, block.mlp, ref, "mlp")
    record(hooks, block.ln_1, ref, "ln_1")
    record(hooks, block.mlp.c_fc, ref, "c_fc")
    hooks.pre(block.mlp, lambda a: ref.__setitem__("mlp_in", a[0].detach().clone()))
    logits = logits_of(gpt2, ids)
    hooks.remove()

    with model.trace(ids):
        attn = model.transformer.h[0].attn.output[0].save()
        mlp = model.transformer.h[0].mlp.output.save()
        ln1 = model.transformer.h[0].ln_1.output.save()
        cfc = model.transformer.h[0].mlp.c_fc.output.save()
        mlp_in = model.transformer.h[0].mlp.input.save()
    assert_close(attn, ref["attn"])
    assert_close(mlp, ref["mlp"])
    assert_close(ln1, ref["ln_1"])
    assert_close(cfc, ref["c_fc"])
    assert_close(mlp_in, ref["mlp_in"])
    # the MLP called directly on its own input gives its output
    with torch.no_grad():
        assert_close(block.mlp(ref["mlp_in"]), mlp)
    assert_unchanged(gpt2, ids, logits)


# -- edits and swaps ------------------------------------------------------------------------------


def test_zero_one_position_in_one_layer(gpt2, ids, hooks):
    model = nnsight.NNsight(gpt2)
    logits = logits_of(gpt2, ids)

    def edit(o):
        o[0][:, 3] = 0

    ref = {}
    hooks.output(gpt2.transformer.h[0], edit)
    record(hooks, gpt2.transformer.h[1], ref, "h1", 0)
    ref["logits"] = logits_of(gpt2, ids)
    hooks.remove()

    with model.trace(ids):
        model.transformer.h[0].output[0][:, 3] = 0
        h0 = model.transformer.h[0].output[0].save()
        h1 = model.transformer.h[1].output[0].save()
        lg = model.output.logits.save()
    assert (h0[:, 3] == 0).all()
    assert_close(h1, ref["h1"])
    assert_close(lg, ref["logits"])
    assert not torch.allclose(lg, logits)
    assert_unchanged(gpt2, ids, logits)


def test_block_output_swap_tuple(gpt2, ids, hooks):
    """Swap a block's tuple output with `(new, *rest)`."""
    model = nnsight.NNsight(gpt2)
    logits = logits_of(gpt2, ids)

    ref = {}

    def swap(o):
        ref["n"] = len(o)
        return (o[0] * 0.5, *o[1:])

    hooks.output(gpt2.transformer.h[0], swap)
    record(hooks, gpt2.transformer.h[0], ref, "h0", 0)
    ref["logits"] = logits_of(gpt2, ids)
    hooks.remove()

    n = ref["n"]
    with model.trace(ids):
        out = model.transformer.h[0].output
        rest = [out[i] for i in range(1, n)]
        model.transformer.h[0].output = (out[0] * 0.5, *rest)
        h0 = model.transformer.h[0].output[0].save()
        lg = model.output.logits.save()
    assert_close(h0, ref["h0"])
    assert_close(lg, ref["logits"])
    assert_unchanged(gpt2, ids, logits)


def test_block_output_swap_constant(gpt2, ids, hooks, device):
    model = nnsight.NNsight(gpt2)
    logits = logits_of(gpt2, ids)
    torch.manual_seed(5)
    new = torch.randn(1, T, 32, device=device)

    ref = {}
    hooks.output(gpt2.transformer.h[1], lambda o: (new, *o[1:]))
    ref["logits"] = logits_of(gpt2, ids)
    hooks.remove()
    with torch.no_grad():
        # after the last block: ln_f then the LM head
        direct = gpt2.lm_head(gpt2.transformer.ln_f(new))
    assert_close(ref["logits"], direct)

    with model.trace(ids):
        out = model.transformer.h[1].output
        model.transformer.h[1].output = (new, out[1])
        lg = model.output.logits.save()
    assert_close(lg, direct)
    assert_unchanged(gpt2, ids, logits)


def test_saved_before_swap_keeps_content(gpt2, ids, hooks):
    model = nnsight.NNsight(gpt2)
    logits = logits_of(gpt2, ids)
    ref = {}
    record(hooks, gpt2.transformer.h[0], ref, "h0", 0)
    logits_of(gpt2, ids)
    hooks.remove()

    with model.trace(ids):
        before = model.transformer.h[0].output[0].save()
        out = model.transformer.h[0].output
        model.transformer.h[0].output = (torch.zeros_like(out[0]), out[1])
        after = model.transformer.h[0].output[0].save()
    assert_close(before, ref["h0"])
    assert_close(after, torch.zeros_like(ref["h0"]))
    assert_unchanged(gpt2, ids, logits)


def test_wte_edit(gpt2, ids, hooks):
    model = nnsight.NNsight(gpt2)
    logits = logits_of(gpt2, ids)

    def edit(o):
        o[:, 2:4] = 1.0

    hooks.output(gpt2.transformer.wte, edit)
    expected = logits_of(gpt2, ids)
    hooks.remove()

    with model.trace(ids):
        model.transformer.wte.output[:, 2:4] = 1.0
        lg = model.output.logits.save()
    assert_close(lg, expected)
    assert_unchanged(gpt2, ids, logits)


def test_mlp_output_swap(gpt2, ids, hooks):
    model = nnsight.NNsight(gpt2)
    logits = logits_of(gpt2, ids)
    hooks.output(gpt2.transformer.h[1].mlp, lambda o: torch.zeros_like(o))
    expected = logits_of(gpt2, ids)
    hooks.remove()

    with model.trace(ids):
        model.transformer.h[1].mlp.output = torch.zeros_like(model.transformer.h[1].mlp.output)
        lg = model.output.logits.save()
    assert_close(lg, expected)
    assert_unchanged(gpt2, ids, logits)


def test_attn_output_edit(gpt2, ids, hooks):
    model = nnsight.NNsight(gpt2)
    logits = logits_of(gpt2, ids)

    def edit(o):
        o[0][:, :, :16] = 0

    hooks.output(gpt2.transformer.h[0].attn, edit)
    expected = logits_of(gpt2, ids)
    hooks.remove()

    with model.trace(ids):
        model.transformer.h[0].attn.output[0][:, :, :16] = 0
        lg = model.output.logits.save()
    assert_close(lg, expected)
    assert_unchanged(gpt2, ids, logits)


def test_out_of_order_logits_before_edit(gpt2, ids, hooks):
    model = nnsight.NNsight(gpt2)
    logits = logits_of(gpt2, ids)

    def edit(o):
        o[0][:, -1] = 0

    hooks.output(gpt2.transformer.h[0], edit)
    expected = logits_of(gpt2, ids)
    hooks.remove()

    with model.trace(ids):
        lg = model.output.logits.save()
        model.transformer.h[0].output[0][:, -1] = 0
    assert_close(lg, expected)
    assert_unchanged(gpt2, ids, logits)


# -- several invokes ------------------------------------------------------------------------------


def test_clean_to_corrupted_patch(gpt2, device, hooks):
    model = nnsight.NNsight(gpt2)
    g = torch.Generator().manual_seed(6)
    clean = torch.randint(0, 100, (1, T), generator=g).to(device)
    corrupted = clean.clone()
    corrupted[0, 2] = (clean[0, 2] + 17) % 100
    batch = torch.cat([clean, corrupted])
    logits = logits_of(gpt2, batch)

    ref = {}
    record(hooks, gpt2.transformer.h[0], ref, "clean_h0", 0)
    ref["clean_logits"] = logits_of(gpt2, clean)
    hooks.remove()

    def patch(o):
        o[0][:, 5] = ref["clean_h0"][:, 5]

    hooks.output(gpt2.transformer.h[0], patch)
    ref["patched_logits"] = logits_of(gpt2, corrupted)
    hooks.remove()

    with model.trace() as tracer:
        with tracer.invoke(clean):
            clean_pos = model.transformer.h[0].output[0][:, 5]
            lg_clean = model.output.logits.save()
        with tracer.invoke(corrupted):
            model.transformer.h[0].output[0][:, 5] = clean_pos
            lg_patched = model.output.logits.save()
    assert lg_clean.shape == (1, T, 100)
    assert lg_patched.shape == (1, T, 100)
    assert_close(lg_clean, ref["clean_logits"], rtol=1e-4, atol=1e-5)
    assert_close(lg_patched, ref["patched_logits"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref["patched_logits"], logits[1:2], rtol=1e-4, atol=1e-5)
    assert_unchanged(gpt2, batch, logits)


def test_two_invokes_per_invoke_values(gpt2, ids8, hooks):
    """Per-invoke block outputs, attention outputs and logits are the rows of one batched run."""
    model = nnsight.NNsight(gpt2)
    a, b = ids8[0:1], ids8[1:2]
    batch = torch.cat([a, b])
    ref = {}
    record(hooks, gpt2.transformer.h[1], ref, "h1", 0)
    record(hooks, gpt2.transformer.h[0].attn, ref, "attn", 0)
    logits = logits_of(gpt2, batch)
    hooks.remove()

    with model.trace() as tracer:
        with tracer.invoke(a) as inv0:
            h1_0 = model.transformer.h[1].output[0].save()
            at_0 = model.transformer.h[0].attn.output[0].save()
            lg_0 = model.output.logits.save()
        with tracer.invoke(b) as inv1:
            h1_1 = model.transformer.h[1].output[0].save()
            at_1 = model.transformer.h[0].attn.output[0].save()
            lg_1 = model.output.logits.save()
    assert inv0.batch_size == 1 and inv1.batch_size == 1
    assert torch.equal(inv1.inputs[0][0], b)
    assert_close(h1_0, ref["h1"][0:1])
    assert_close(h1_1, ref["h1"][1:2])
    assert_close(at_0, ref["attn"][0:1])
    assert_close(at_1, ref["attn"][1:2])
    assert_close(lg_0, logits[0:1])
    assert_close(lg_1, logits[1:2])
    assert_unchanged(gpt2, batch, logits)


def test_eight_invokes_patched_positions(gpt2, ids8, hooks):
    """Invoke i zeroes position i of block 0 and scales block 1's output: one batched plain run."""
    model = nnsight.NNsight(gpt2)
    logits = logits_of(gpt2, ids8)

    def edit0(o):
        for i in range(8):
            o[0][i, i] = 0

    def edit1(o):
        scale = torch.arange(1.0, 9.0, device=o[0].device).view(8, 1, 1)
        return (o[0] * scale, *o[1:])

    ref = {}
    hooks.output(gpt2.transformer.h[0], edit0)
    hooks.output(gpt2.transformer.h[1], edit1)
    record(hooks, gpt2.transformer.h[0], ref, "h0", 0)
    ref["logits"] = logits_of(gpt2, ids8)
    hooks.remove()

    h0s, lgs = [], []
    with model.trace() as tracer:
        for i in range(8):
            with tracer.invoke(ids8[i : i + 1]):
                model.transformer.h[0].output[0][:, i] = 0
                h0s.append(model.transformer.h[0].output[0].save())
                out1 = model.transformer.h[1].output
                model.transformer.h[1].output = (out1[0] * float(i + 1), out1[1])
                lgs.append(model.output.logits.save())
    for i in range(8):
        assert_close(h0s[i].value, ref["h0"][i : i + 1])
        assert_close(lgs[i].value, ref["logits"][i : i + 1], rtol=1e-4, atol=1e-5)
    assert_close(tracer.output.logits, ref["logits"], rtol=1e-4, atol=1e-5)
    assert_unchanged(gpt2, ids8, logits)


def test_eight_invokes_clean_patch_sweep(gpt2, device, hooks):
    """One clean invoke, then 7 corrupted invokes each patching a different position from it."""
    model = nnsight.NNsight(gpt2)
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, 100, (1, T), generator=g).to(device)
    corrupted = clean.clone()
    corrupted[0, 0] = (clean[0, 0] + 1) % 100
    batch = torch.cat([clean] + [corrupted] * 7)
    logits = logits_of(gpt2, batch)

    ref = {}
    record(hooks, gpt2.transformer.h[1], ref, "clean_h1", 0)
    logits_of(gpt2, clean)
    hooks.remove()

    def patch(o):
        for row in range(1, 8):
            pos = row - 1
            o[0][row, pos] = ref["clean_h1"][0, pos]

    hooks.output(gpt2.transformer.h[1], patch)
    expected = logits_of(gpt2, batch)
    hooks.remove()

    lgs = []
    with model.trace() as tracer:
        with tracer.invoke(clean):
            clean_h1 = model.transformer.h[1].output[0]
            # the slices are taken here, before this invoke's later access (model.output):
            # taken inside the corrupted invokes they would be ready only after it
            clean_cols = [clean_h1[:, pos] for pos in range(7)]
            lgs.append(model.output.logits.save())
        for pos in range(7):
            with tracer.invoke(corrupted):
                model.transformer.h[1].output[0][:, pos] = clean_cols[pos]
                lgs.append(model.output.logits.save())
    for row in range(8):
        assert_close(lgs[row].value, expected[row : row + 1], rtol=1e-4, atol=1e-5)
    assert_unchanged(gpt2, batch, logits)


def test_invoke_batch3_and_batch1(gpt2, ids8, hooks):
    model = nnsight.NNsight(gpt2)
    a, b = ids8[0:3], ids8[3:4]
    batch = torch.cat([a, b])
    ref = {}
    record(hooks, gpt2.transformer.wte, ref, "wte")
    logits = logits_of(gpt2, batch)
    hooks.remove()

    with model.trace() as tracer:
        with tracer.invoke(a) as inv0:
            e0 = model.transformer.wte.output.save()
            lg0 = model.output.logits.save()
        with tracer.invoke(b) as inv1:
            e1 = model.transformer.wte.output.save()
            lg1 = model.output.logits.save()
    assert (inv0.batch_size, inv1.batch_size) == (3, 1)
    assert_close(e0, ref["wte"][0:3])
    assert_close(e1, ref["wte"][3:4])
    assert_close(lg0, logits[0:3])
    assert_close(lg1, logits[3:4])
    assert_unchanged(gpt2, batch, logits)


# -- module calls ----------------------------------------------------------------------------------


@pytest.mark.python_fallback
def test_adhoc_lm_head_call(gpt2, ids, hooks):
    """Logit lens: `lm_head(ln_f(h[0].output[0]))` called inside the trace."""
    model = nnsight.NNsight(gpt2)
    ref = {}
    record(hooks, gpt2.transformer.h[0], ref, "h0", 0)
    logits = logits_of(gpt2, ids)
    hooks.remove()

    with model.trace(ids):
        lens = model.lm_head(model.transformer.ln_f(model.transformer.h[0].output[0])).save()
        lg = model.output.logits.save()
    with torch.no_grad():
        assert_close(lens, gpt2.lm_head(gpt2.transformer.ln_f(ref["h0"])))
    assert_close(lg, logits)
    assert_unchanged(gpt2, ids, logits)


def test_parameter_read(gpt2, ids):
    model = nnsight.NNsight(gpt2)
    logits = logits_of(gpt2, ids)
    w_before = gpt2.transformer.wte.weight.detach().clone()
    with model.trace(ids):
        w = model.transformer.wte.weight.save()
        w2 = model.transformer.wte.weight
        w2[:] = 0
        lg = model.output.logits.save()
    assert_close(w, w_before)
    assert_close(gpt2.transformer.wte.weight.detach(), w_before, rtol=0, atol=0)
    assert_close(lg, logits)
    assert_unchanged(gpt2, ids, logits)
