"""LanguageModel on a GPT-2-shaped LM (random weights) and a word-level tokenizer trained here.

Every expected value comes from plain transformers: the HF model called directly, HF
``generate``, and forward hooks registered by hand. Nothing is downloaded; "loading by
id" uses a directory written with ``save_pretrained``. The tests run with transformers
4.x and 5.x (a GPT-2 block returns a tuple in 4.x and a tensor in 5.x; the step-0 logits
of ``generate`` cover every position in 4.x and only the last one in 5.x), so they read
modules whose outputs are tensors in both, or ask the plain model which shape it gives.
"""

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
from fastinterleave import LanguageModel
from conftest import assert_hooks_idle

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SENTENCES = [
    "the cat sat on the mat",
    "a dog sat on a big red mat",
    "the big red cat saw a small blue dog",
    "a small dog ran to the cat",
]
PROMPTS = ["the cat", "the big red cat sat on the mat", "a dog", "a small blue dog ran"]
TOL = dict(rtol=1e-4, atol=1e-5)


# -- fixtures ---------------------------------------------------------------------------------


def train_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[UNK]"]))
    return tk


_TK = train_tokenizer()


def make_tokenizer(padding_side="left", pad=True, token_type_ids=False):
    """A PreTrainedTokenizerFast over the trained tokenizer (GPT-2's inputs: ids and mask)."""
    kwargs = dict(tokenizer_object=_TK, eos_token="[EOS]", unk_token="[UNK]", padding_side=padding_side)
    if pad:
        kwargs["pad_token"] = "[PAD]"
    kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    if token_type_ids:
        kwargs["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    return transformers.PreTrainedTokenizerFast(**kwargs)


def make_lm(device="cpu", seed=0):
    torch.manual_seed(seed)
    eos = _TK.token_to_id("[EOS]")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=_TK.get_vocab_size() + 8, n_positions=64,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=_TK.token_to_id("[PAD]"),
    )
    return transformers.GPT2LMHeadModel(config).to(device).eval()


@pytest.fixture
def net(device):
    return make_lm(device)


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def model(net, tok):
    return LanguageModel(net, tokenizer=tok)


# -- plain-HF references ------------------------------------------------------------------------


def encode(tok, prompt, device="cpu"):
    """The prompt tokenized alone (no padding)."""
    return {k: v.to(device) for k, v in tok(prompt, return_tensors="pt").items()}


def pad_by_hand(tok, prompts, device="cpu"):
    """Each prompt tokenized alone, then padded by hand to the longest, mask 0 on the padding."""
    rows = [tok(p)["input_ids"] for p in prompts]
    length = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        pad = [tok.pad_token_id] * (length - len(r))
        zeros, ones = [0] * (length - len(r)), [1] * len(r)
        if tok.padding_side == "left":
            ids.append(pad + r)
            mask.append(zeros + ones)
        else:
            ids.append(r + pad)
            mask.append(ones + zeros)
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def plain_logits(net, **inputs):
    with torch.no_grad():
        return net(**inputs).logits


def solo_logits_at(net, tok, prompt, length, device):
    """Logits of `prompt` run alone (no padding tokens at all): what its row gives in a
    batch of invokes padded to `length` (LanguageModel gives a row that batching pads on the
    left the positions of its solo run)."""
    return plain_logits(net, **encode(tok, prompt, device))


def invoke_positions(lengths, device="cpu"):
    """The position ids a batch of invokes padded on the left to the longest runs with:
    each row numbered as in its invoke's solo run (0, 1, ... over the invoke's own length),
    the padding batching adds 0 (one length per row: its invoke's)."""
    total = max(lengths)
    return torch.tensor([[0] * (total - n) + list(range(n)) for n in lengths], device=device)


def real(tok, tensor, n):
    """The positions of the `n` real tokens of a padded row (dim 0 of `tensor` is the position)."""
    return tensor[-n:] if tok.padding_side == "left" else tensor[:n]


def hf_generate(net, tok, ids, mask, n):
    with torch.no_grad():
        return net.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
        )


def keep_first(store, key):
    """A hook body keeping (a copy of) the first value it sees; it changes nothing."""

    def fn(o):
        if key not in store:
            store[key] = o.detach().clone() if isinstance(o, torch.Tensor) else o

    return fn


def block_returns_tuple(net, device):
    out = {}
    handle = net.transformer.h[0].register_forward_hook(lambda m, a, o: keep_first(out, "o")(o))
    with torch.no_grad():
        net(torch.tensor([[3, 4]], device=device))
    handle.remove()
    return isinstance(out["o"], tuple)


# -- inputs ---------------------------------------------------------------------------------------


def test_exported_like_nnsight():
    assert nnsight.LanguageModel is LanguageModel
    assert issubclass(LanguageModel, nnsight.NNsight)
    assert LanguageModel.__methods__ == {"generate": "_generate"}


def test_str_input(model, net, tok, device):
    enc = encode(tok, "the cat sat on the mat", device)
    expected = plain_logits(net, **enc)
    with model.trace("the cat sat on the mat"):
        logits = model.output.logits.save()
        head = model.lm_head.output.save()
        inputs = model.inputs.save()
    assert_close(logits, expected)
    assert_close(head, expected)
    args, kwargs = inputs
    assert args == ()
    assert set(kwargs) == {"input_ids", "attention_mask", "labels"}
    assert kwargs["labels"] is None
    assert torch.equal(kwargs["input_ids"].cpu(), enc["input_ids"].cpu())
    assert torch.equal(kwargs["attention_mask"].cpu(), enc["attention_mask"].cpu())
    assert_hooks_idle(net)


def test_list_of_str_is_padded_like_the_tokenizer(model, net, tok, device):
    prompts = ["the big red cat sat", "a dog"]
    enc = {k: v.to(device) for k, v in tok(prompts, return_tensors="pt", padding=True).items()}
    assert enc["attention_mask"][1].tolist() == [0, 0, 0, 1, 1]  # left padding
    expected = plain_logits(net, **enc)
    with model.trace(prompts) as tracer:
        head = model.lm_head.output.save()
        inputs = model.inputs.save()
    assert tracer._invokers[0].batch_size == 2
    assert_close(head, expected)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(inputs[1][key].cpu(), enc[key].cpu())


@pytest.mark.parametrize(
    "given",
    ["list_int", "list_list_int", "tensor_1d", "tensor_2d", "dict", "batch_encoding", "input_ids_kw", "tokenizer_kw"],
)
def test_token_inputs(model, net, tok, device, given):
    prompts = ["the big red cat sat", "a dog"]
    ids_a, ids_b = tok(prompts[0])["input_ids"], tok(prompts[1])["input_ids"]
    padded, mask = pad_by_hand(tok, prompts)
    single = torch.tensor([ids_a])
    if given == "list_int":
        args, kwargs, ids, m = (ids_a,), {}, single, torch.ones_like(single)
    elif given == "list_list_int":
        args, kwargs, ids, m = ([ids_a, ids_b],), {}, padded, mask
    elif given == "tensor_1d":
        args, kwargs, ids, m = (torch.tensor(ids_a),), {}, single, torch.ones_like(single)
    elif given == "tensor_2d":
        args, kwargs, ids, m = (padded,), {}, padded, torch.ones_like(padded)
    elif given == "dict":
        args, kwargs, ids, m = ({"input_ids": padded, "attention_mask": mask},), {}, padded, mask
    elif given == "batch_encoding":
        enc = tok(prompts, return_tensors="pt", padding=True)
        args, kwargs, ids, m = (enc,), {}, padded, mask
    elif given == "input_ids_kw":
        args, kwargs, ids, m = (), {"input_ids": padded, "attention_mask": mask}, padded, mask
    else:  # model.trace(**tokenizer(...))
        args, kwargs, ids, m = (), dict(tok(prompts, return_tensors="pt", padding=True)), padded, mask
    expected = plain_logits(net, input_ids=ids.to(device), attention_mask=m.to(device))
    with model.trace(*args, **kwargs):
        head = model.lm_head.output.save()
        inputs = model.inputs.save()
    assert_close(head, expected)
    assert torch.equal(inputs[1]["input_ids"].cpu(), ids)
    assert torch.equal(inputs[1]["attention_mask"].cpu(), m)


def test_trace_false_returns_the_output(model, net, tok, device):
    expected = plain_logits(net, **encode(tok, "a dog sat", device))
    out = model.trace("a dog sat", trace=False)
    assert_close(out.logits, expected)


def test_passed_tokenizer_keeps_its_padding_side_and_gets_a_pad_token(net):
    tok = make_tokenizer(padding_side="right", pad=False)
    assert tok.pad_token is None
    model = LanguageModel(net, tokenizer=tok)
    assert model.tokenizer is tok
    assert tok.padding_side == "right"
    assert tok.pad_token == tok.eos_token == "[EOS]"


# -- several invokes: one batch, every invoke's own mask -------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_invokes_of_different_lengths_keep_their_masks(net, device, padding_side):
    tok = make_tokenizer(padding_side)
    model = LanguageModel(net, tokenizer=tok)
    groups = [["the cat"], ["the big red cat sat on the mat", "a dog"], ["a small blue dog ran"]]
    with model.trace() as tracer:
        heads = []
        for group in groups:
            with tracer.invoke(group if len(group) > 1 else group[0]):
                heads.append(model.lm_head.output.save())
        inputs = model.inputs.save()
    flat = [p for g in groups for p in g]
    ids, mask = pad_by_hand(tok, flat)
    length = ids.shape[1]
    # One forward of all four rows, each with the mask of its own tokenization.
    assert [len(inv.inputs[0][0]["input_ids"]) for inv in tracer._invokers] == [1, 2, 1]
    rows = [h for head in heads for h in head.value]  # proxies in a list are not injected
    assert len(rows) == 4 and all(r.shape[0] == length for r in rows)
    # Each invoke gives what it gives alone: its own tokenization (padded within the invoke).
    solo = []
    for group in groups:
        enc = {k: v.to(device) for k, v in tok(group, return_tensors="pt", padding=True).items()}
        solo.extend(plain_logits(net, **enc))
    for row, expected in zip(rows, solo):
        assert_close(real(tok, row, expected.shape[0]), expected, **TOL)
    # The last invoke's view of the root inputs: its own row, padded to the batch.
    assert torch.equal(inputs[1]["input_ids"].cpu(), ids[3:])
    assert torch.equal(inputs[1]["attention_mask"].cpu(), mask[3:])


def test_masks_of_later_invokes_are_their_own(net, tok, device):
    """nnsight 0.4.11 gives `a dog` in the second invoke mask 1 on its padding: check that the
    values here differ from such a mask, i.e. the comparison above can see a wrong mask."""
    model = LanguageModel(net, tokenizer=tok)
    with model.trace() as tracer:
        with tracer.invoke("the cat"):
            pass
        with tracer.invoke(["the big red cat sat", "a dog"]):
            head = model.lm_head.output.save()
            inputs = model.inputs.save()
    ids, mask = pad_by_hand(tok, ["the cat", "the big red cat sat", "a dog"])
    assert inputs[1]["attention_mask"].tolist() == mask[1:].tolist()
    assert inputs[1]["attention_mask"][1].tolist() == [0, 0, 0, 1, 1]
    right = plain_logits(net, input_ids=ids.to(device), attention_mask=mask.to(device))
    wrong = plain_logits(net, input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device))
    assert_close(head[1, -2:], right[2, -2:], **TOL)
    assert not torch.allclose(head[1, -2:], wrong[2, -2:], **TOL)


def test_token_type_ids_are_padded_with_the_batch(net, device):
    """A tokenizer that returns token_type_ids (GPT-2 adds their embedding): each invoke still
    equals its prompt run alone. An invoke without them (token ids) next to one with them gets
    the tokenizer's pad type id (0), what tokenizing its text would have given."""
    tok = make_tokenizer(token_type_ids=True)
    model = LanguageModel(net, tokenizer=tok)
    assert "token_type_ids" in tok("a dog")
    ids_only = tok("a small blue dog ran")["input_ids"]
    with model.trace() as tracer:
        with tracer.invoke("a dog"):
            a = model.lm_head.output.save()
        with tracer.invoke("a small blue dog ran"):
            b = model.lm_head.output.save()
        with tracer.invoke(ids_only):
            c = model.lm_head.output.save()
        inputs = model.inputs.save()
    length = len(ids_only)
    assert_close(a[0, -2:], solo_logits_at(net, tok, "a dog", length, device)[0], **TOL)
    assert_close(b[0], solo_logits_at(net, tok, "a small blue dog ran", length, device)[0], **TOL)
    assert inputs[1]["token_type_ids"].tolist() == [[0] * length]
    ids = torch.tensor([ids_only], device=device)
    assert_close(c, plain_logits(net, input_ids=ids, token_type_ids=torch.zeros_like(ids)), **TOL)


def test_patch_between_invokes(net, tok, device, hooks):
    """Invoke 0's block-0 output at the last position replaces invoke 1's (both real tokens:
    left padding), checked against one plain forward of the same batch with a hand hook."""
    tuple_out = block_returns_tuple(net, device)
    prompts = ["the big red cat sat on the mat", "a dog"]
    ids, mask = pad_by_hand(tok, prompts, device)

    def patch(o):
        h = o[0] if tuple_out else o
        h[1, -1, :] = h[0, -1, :]

    positions = invoke_positions([len(tok(p)["input_ids"]) for p in prompts], device)
    hooks.output(net.transformer.h[0], patch)
    expected = plain_logits(net, input_ids=ids, attention_mask=mask, position_ids=positions)
    hooks.remove()
    unpatched = plain_logits(net, input_ids=ids, attention_mask=mask, position_ids=positions)

    model = LanguageModel(net, tokenizer=tok)
    with model.trace() as tracer:
        with tracer.invoke(prompts[0]):
            out = model.transformer.h[0].output
            source = (out[0] if tuple_out else out)[:, -1, :]
            l0 = model.lm_head.output.save()
        with tracer.invoke(prompts[1]):
            out = model.transformer.h[0].output
            (out[0] if tuple_out else out)[:, -1, :] = source
            l1 = model.lm_head.output.save()
    assert_close(l0[0], expected[0], **TOL)
    assert_close(l1[0, -2:], expected[1, -2:], **TOL)
    assert not torch.allclose(l1[0, -1], unpatched[1, -1], **TOL)
    assert_hooks_idle(net)


def test_swap_in_one_invoke_leaves_the_other(net, tok, device, hooks):
    prompts = ["the cat sat", "a dog"]
    ids, mask = pad_by_hand(tok, prompts, device)

    def zero_row1(o):
        o = o.clone()
        o[1] = 0
        return o

    positions = invoke_positions([len(tok(p)["input_ids"]) for p in prompts], device)
    hooks.output(net.transformer.h[1].mlp, zero_row1)
    expected = plain_logits(net, input_ids=ids, attention_mask=mask, position_ids=positions)
    hooks.remove()
    model = LanguageModel(net, tokenizer=tok)
    with model.trace() as tracer:
        with tracer.invoke(prompts[0]):
            l0 = model.lm_head.output.save()
        with tracer.invoke(prompts[1]):
            model.transformer.h[1].mlp.output = torch.zeros_like(model.transformer.h[1].mlp.output)
            l1 = model.lm_head.output.save()
    assert_close(l0[0], expected[0], **TOL)
    assert_close(l1[0, -2:], expected[1, -2:], **TOL)


# -- labels ------------------------------------------------------------------------------------------


def test_labels_pass_through(model, net, tok, device):
    enc = encode(tok, "the cat sat on the mat", device)
    with torch.no_grad():
        expected = net(**enc, labels=enc["input_ids"]).loss
    with model.trace() as tracer:
        with tracer.invoke("the cat sat on the mat", labels="the cat sat on the mat"):
            loss = model.output.loss.save()
    assert_close(loss, expected)
    with model.trace(input_ids=enc["input_ids"], labels=enc["input_ids"]):
        loss2 = model.output.loss.save()
    assert_close(loss2, expected)


def test_labels_of_invokes_of_different_lengths(model, net, tok, device):
    prompts = ["the cat sat", "a small blue dog ran to the cat"]
    ids, mask = pad_by_hand(tok, prompts, device)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        positions = invoke_positions([len(tok(p)["input_ids"]) for p in prompts], device)
        expected = net(input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions).loss
    with model.trace() as tracer:
        for p in prompts:
            with tracer.invoke(p, labels=torch.tensor([tok(p)["input_ids"]])):
                pass
        loss = model.output.loss.save()
    assert_close(loss, expected, **TOL)


# -- generate ----------------------------------------------------------------------------------------


def test_generate_output_equals_hf_generate(model, net, tok, device):
    enc = encode(tok, "the cat sat", device)
    expected = hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 3)
    with model.generate("the cat sat", max_new_tokens=3) as tracer:
        out = model.generator.output.save()
        prompt = model.generator.streamer.output.save()
        final = model.transformer.ln_f.output.save()
    assert out.shape == (1, enc["input_ids"].shape[1] + 3)
    assert torch.equal(out, expected)
    assert torch.equal(tracer.output, expected)
    # Streamer call 0 is the prompt; step 0 of the model is the prompt's forward.
    assert torch.equal(prompt, enc["input_ids"].cpu())
    with torch.no_grad():
        expected_final = net.transformer(**enc).last_hidden_state
    assert_close(final, expected_final, **TOL)
    assert_hooks_idle(net, model._generator)


def test_generate_with_invokes(model, net, tok, device):
    """Invokes of different lengths generate in one batch; each equals HF generate on the same
    (hand-padded) batch, and its new tokens those of its prompt generated alone."""
    prompts = ["the cat", "a small blue dog ran", "a dog"]
    ids, mask = pad_by_hand(tok, prompts, device)
    expected = hf_generate(net, tok, ids, mask, 3)
    with model.generate(max_new_tokens=3) as tracer:
        with tracer.invoke(prompts[0]):
            o0 = model.generator.output.save()
            s0 = model.generator.streamer.output.save()
        with tracer.invoke(prompts[1:]):
            o1 = model.generator.output.save()
    assert torch.equal(o0, expected[:1])
    assert torch.equal(o1, expected[1:])
    assert torch.equal(s0, ids[:1].cpu())
    for row, prompt in zip(expected, prompts):
        enc = encode(tok, prompt, device)
        alone = hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 3)
        assert torch.equal(row[-3:], alone[0, -3:])


def test_generate_intervention_at_step_0(model, net, tok, device, hooks):
    """An edit of the first call (the prompt's forward) only, as HF generate with a hook that
    edits its first call."""
    enc = encode(tok, "the big red cat", device)
    calls = []

    def edit(o):
        calls.append(1)
        if len(calls) == 1:
            o = o.clone()
            o[:, -1] = o[:, -1] * 4 + 1
            return o

    hooks.output(net.transformer.h[0].mlp, edit)
    seen = {}
    hooks.output(net.transformer.ln_f, keep_first(seen, "ln_f"))
    expected = hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 4)
    hooks.remove()
    unedited = hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 4)
    assert len(calls) == 4

    with model.generate("the big red cat", max_new_tokens=4):
        mlp = model.transformer.h[0].mlp
        mlp.output[:, -1] = mlp.output[:, -1] * 4 + 1
        final = model.transformer.ln_f.output.save()
        out = model.generator.output.save()
    assert torch.equal(out, expected)
    assert_close(final, seen["ln_f"], **TOL)
    with torch.no_grad():
        assert not torch.allclose(final, net.transformer(**enc).last_hidden_state, **TOL)
    assert_hooks_idle(net)


@pytest.mark.python_fallback  # nnsight.list()
def test_generate_steps_by_iteration(model, net, tok, device):
    """With iteration (`.all()` / `.iter[k]`): streamer call k>0 is step k's new token."""
    enc = encode(tok, "the cat sat", device)
    expected = hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 3)
    with model.generate("the cat sat", max_new_tokens=3):
        steps = nnsight.list().save()
        with model.generator.streamer.all():
            steps.append(model.generator.streamer.output)
        last = model.generator.streamer.iter[3].output.save()
    assert len(steps) == 4
    assert torch.equal(steps[0], enc["input_ids"].cpu())
    for k in range(1, 4):
        assert torch.equal(steps[k], expected[:, -4 + k].cpu())
    assert torch.equal(last, expected[:, -1].cpu())


def test_generate_step_k_is_call_k(model, net, tok, device, hooks):
    """`.next()` / `.iter[k]` on a module during generate: call k is step k (k=0 the prompt)."""
    enc = encode(tok, "the big red cat", device)
    calls = []
    hooks.output(net.transformer.ln_f, lambda o: calls.append(o.detach().clone()))
    expected = hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 3)
    hooks.remove()
    assert [c.shape[1] for c in calls] == [enc["input_ids"].shape[1], 1, 1]
    with model.generate("the big red cat", max_new_tokens=3):
        s0 = model.transformer.ln_f.output.save()
        s2 = model.transformer.ln_f.iter[2].output.save()
        s1 = model.transformer.ln_f.next().output.save()
        out = model.generator.output.save()
    assert torch.equal(out, expected)
    for got, want in zip((s0, s1, s2), calls):
        assert_close(got, want, **TOL)


def test_token_ids_without_a_tokenizer(net, device):
    """Like nnsight, a given model needs no tokenizer for token inputs (left padding with the
    config's pad id); text then asks for one."""
    model = LanguageModel(net)
    assert model.tokenizer is None
    a, b = [3, 4, 5, 6], [7, 8]
    pad = net.config.pad_token_id
    with model.trace() as tracer:
        with tracer.invoke(a):
            la = model.lm_head.output.save()
        with tracer.invoke(b):
            lb = model.lm_head.output.save()
        inputs = model.inputs.save()
    assert inputs[1]["input_ids"].tolist() == [[pad, pad, 7, 8]]
    assert inputs[1]["attention_mask"].tolist() == [[0, 0, 1, 1]]
    assert_close(la[0], plain_logits(net, input_ids=torch.tensor([a], device=device))[0], **TOL)
    expected_b = plain_logits(net, input_ids=torch.tensor([b], device=device))  # as alone
    assert_close(lb[0, -2:], expected_b[0], **TOL)
    with pytest.raises(ValueError, match="tokenizer"):
        with model.trace("the cat"):
            pass


# -- loading by id: meta first, weights on first use -------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    net = make_lm("cpu", seed=1)
    tok = make_tokenizer(padding_side="right")
    net.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return str(tmp_path), net


def test_load_meta_then_dispatch_on_first_trace(saved):
    path, net = saved
    model = LanguageModel(path)
    assert not model.dispatched
    assert all(p.is_meta for p in model._model.parameters())
    assert model.tokenizer.padding_side == "left"  # a tokenizer it loads pads on the left
    assert model.tokenizer.pad_token == "[PAD]"
    held = model.transformer.h[0]  # an envoy taken before the weights exist
    assert held._module.mlp.c_fc.weight.is_meta
    enc = model.tokenizer(["the cat sat", "a dog"], return_tensors="pt", padding=True)
    expected = plain_logits(net, **enc)
    with model.trace(["the cat sat", "a dog"]):
        head = model.lm_head.output.save()
    assert model.dispatched
    assert not any(p.is_meta for p in model._model.parameters())
    assert held._module is model._model.transformer.h[0]
    assert_close(head, expected, **TOL)


def test_load_dispatch_at_construction_and_generate(saved):
    path, net = saved
    model = LanguageModel(path, dispatch=True)
    assert model.dispatched
    assert not any(p.is_meta for p in model._model.parameters())
    tok = model.tokenizer
    enc = tok("the cat sat", return_tensors="pt")
    expected = hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 3)
    with model.generate("the cat sat", max_new_tokens=3):
        out = model.generator.output.save()
    assert torch.equal(out, expected)


def test_load_meta_then_dispatch_on_first_generate(saved):
    path, net = saved
    model = LanguageModel(path, tokenizer=make_tokenizer(padding_side="right"))
    assert not model.dispatched
    assert model.tokenizer.padding_side == "right"  # a passed tokenizer keeps its side
    tok = model.tokenizer
    enc = tok("a dog", return_tensors="pt")
    expected = hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 2)
    with model.generate("a dog", max_new_tokens=2):
        out = model.generator.output.save()
    assert model.dispatched
    assert torch.equal(out, expected)
