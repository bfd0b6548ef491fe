"""Invokes of different lengths each give what they give alone.

LanguageModel batches invokes by padding them on the left to the longest; a model that
numbers positions 0..length-1 (GPT-2's absolute position embeddings, Llama's rotary ones)
would see a padded invoke's tokens at shifted positions. LanguageModel then passes
``position_ids``: each invoke's solo-run positions (its own padding included, as a plain
run of its own tokenization has it). nnsight 0.4.11 passes none: a shorter invoke's
logits there differ from its solo run (GPT-2; Llama's rotary embeddings are relative, so
only rounding changes there).

References: the plain transformers model run on each invoke's input alone, HF generate on
each prompt alone. Runs under transformers 4.x and 5.x (tests/test_tf5.py)."""

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
from fastinterleave import LanguageModel

from test_language import TOL, _TK, encode, hf_generate, make_lm, make_tokenizer, plain_logits

transformers = pytest.importorskip("transformers")

PROMPTS = ["the cat", "the big red cat sat on the mat", "a small blue dog ran"]


def make_llama(seed=0):
    """A tiny Llama (rotary positions), random weights."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=_TK.get_vocab_size() + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=_TK.token_to_id("[PAD]"), eos_token_id=_TK.token_to_id("[EOS]"),
        bos_token_id=_TK.token_to_id("[EOS]"),
    )
    return transformers.LlamaForCausalLM(config).eval()


MAKERS = {"gpt2": make_lm, "llama": make_llama}


@pytest.fixture(params=sorted(MAKERS))
def net(request):
    return MAKERS[request.param]()


@pytest.fixture
def tok():
    return make_tokenizer()


def solo(net, tok, prompts):
    """Logits of `prompts` (one prompt or an invoke's list) run alone, as the tokenizer gives them."""
    return plain_logits(net, **tok(prompts, return_tensors="pt", padding=True))


def test_invokes_of_different_lengths_equal_their_solo_runs(net, tok):
    model = LanguageModel(net, tokenizer=tok)
    with model.trace() as tracer:
        last, full = [], []
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                last.append(model.lm_head.output[:, -1].save())
                full.append(model.lm_head.output.save())
        inputs = model.inputs.save()
    assert inputs[1]["input_ids"].shape[1] == 8  # one batch, padded to the longest
    for prompt, got_last, got in zip(PROMPTS, last, full):
        expected = solo(net, tok, prompt)
        n = expected.shape[1]
        assert_close(got_last.value, expected[:, -1], **TOL)
        assert_close(got.value[:, -n:], expected, **TOL)


def test_positions_passed_to_the_model(tok):
    """The positions each row runs with: its invoke's solo positions, 0 on the padding."""
    net = make_lm()
    seen = {}
    handle = net.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    model = LanguageModel(net, tokenizer=tok)
    try:
        with model.trace() as tracer:
            with tracer.invoke("the cat"):
                pass
            with tracer.invoke(["the big red cat sat", "a dog"]):
                pass
    finally:
        handle.remove()
    assert seen["position_ids"].tolist() == [[0, 0, 0, 0, 1], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert seen["attention_mask"].tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_an_invoke_of_several_prompts_gives_its_solo_run(net, tok):
    """An invoke's own padding stays as a plain run of its tokenization has it (nnsight
    0.4.11 and plain transformers give the same there); the padding batching adds does not
    shift it."""
    model = LanguageModel(net, tokenizer=tok)
    group = ["a dog", "the cat sat"]
    with model.trace() as tracer:
        with tracer.invoke(group):
            got = model.lm_head.output.save()
        with tracer.invoke("the big red cat sat on the mat"):
            pass
    expected = solo(net, tok, group)
    real = tok(group, return_tensors="pt", padding=True)["attention_mask"].bool()
    assert real.tolist() == [[False, True, True], [True, True, True]]
    assert_close(got[:, -expected.shape[1]:][real], expected[real], **TOL)  # its tokens (not its padding)


def test_equal_lengths_get_no_position_ids(tok):
    """Nothing padded on the left by batching: the model call is the plain one."""
    model = LanguageModel(make_lm(), tokenizer=tok)
    with model.trace() as tracer:
        with tracer.invoke("the cat sat"):
            pass
        with tracer.invoke("a dog ran"):
            pass
        inputs = model.inputs.save()
    assert "position_ids" not in inputs[1]


def test_right_padding_needs_no_positions(net):
    tok = make_tokenizer(padding_side="right")
    model = LanguageModel(net, tokenizer=tok)
    with model.trace() as tracer:
        outs = []
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                outs.append(model.lm_head.output.save())
        inputs = model.inputs.save()
    assert "position_ids" not in inputs[1]
    for prompt, got in zip(PROMPTS, outs):
        expected = solo(net, tok, prompt)
        assert_close(got.value[:, : expected.shape[1]], expected, **TOL)


def test_generate_invokes_of_different_lengths(net, tok):
    """generate: step 0's logits and the new tokens of each invoke equal its solo generate
    (HF generate numbers each row from its first token; positions LanguageModel made for
    the forward are not passed to it)."""
    model = LanguageModel(net, tokenizer=tok)
    with model.generate(max_new_tokens=3) as tracer:
        first, tokens = [], []
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                first.append(model.lm_head.output[:, -1].save())
                tokens.append(model.generator.output.save())
    for prompt, got_first, got in zip(PROMPTS, first, tokens):
        enc = encode(tok, prompt)
        assert_close(got_first.value, plain_logits(net, **enc)[:, -1], **TOL)
        alone = hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 3)
        assert torch.equal(got.value[:, -3:], alone[:, -3:])


def test_given_position_ids_are_kept(tok):
    """An invoke's own position_ids run as given (padded with 0 by batching); the invoke
    beside it gets its solo positions."""
    net = make_lm()
    model = LanguageModel(net, tokenizer=tok)
    enc = encode(tok, "a dog ran")
    custom = torch.tensor([[5, 6, 7]])
    with model.trace() as tracer:
        with tracer.invoke({**enc, "position_ids": custom}):
            given = model.lm_head.output.save()
        with tracer.invoke("the big red cat sat on the mat"):
            other = model.lm_head.output.save()
        inputs = model.inputs.save()
    assert inputs[1]["position_ids"].tolist() == [list(range(8))]
    assert_close(given[:, -3:], plain_logits(net, **enc, position_ids=custom), **TOL)
    assert_close(other, solo(net, tok, "the big red cat sat on the mat"), **TOL)
    # One invoke, and position_ids as a keyword of the model call: passed as they are.
    with model.trace("a dog ran", position_ids=custom):
        alone = model.lm_head.output.save()
    assert_close(alone, plain_logits(net, **enc, position_ids=custom), **TOL)
    with model.trace(input_ids=enc["input_ids"], position_ids=custom):
        keyword = model.lm_head.output.save()
    assert_close(keyword, plain_logits(net, input_ids=enc["input_ids"], position_ids=custom), **TOL)


class NoPositions(torch.nn.Module):
    """A causal LM whose forward takes no position_ids (a masked running mean of embeddings)."""

    def __init__(self, vocab=32, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = self.embed(input_ids) * mask[..., None]
        mean = h.cumsum(1) / mask.cumsum(1).clamp(min=1)[..., None]
        return self.head(mean)


def test_a_model_without_position_ids_gets_none(tok):
    net = NoPositions()
    model = LanguageModel(net, tokenizer=tok)
    with model.trace() as tracer:
        outs = []
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                outs.append(model.head.output[:, -1].save())
        inputs = model.inputs.save()
    assert "position_ids" not in inputs[1]
    for prompt, got in zip(PROMPTS, outs):
        with torch.no_grad():
            expected = net(**encode(tok, prompt))[:, -1]
        assert_close(got.value, expected, **TOL)


# -- NNsight: invokes whose tensors cannot be concatenated ------------------------------------------


def test_plain_nnsight_invokes_of_mismatched_shapes_name_them():
    net = torch.nn.Linear(5, 2)
    model = nnsight.NNsight(net)
    with pytest.raises(ValueError) as err:
        with model.trace() as tracer:
            with tracer.invoke(torch.rand(1, 5)):
                pass
            with tracer.invoke(torch.rand(2, 5)):
                pass
            with tracer.invoke(torch.rand(2, 6)):
                pass
    message = str(err.value)
    assert "positional input 0" in message
    assert "invoke 0: (1, 5)" in message and "invoke 1: (2, 5)" in message and "invoke 2: (2, 6)" in message


def test_plain_nnsight_mismatched_keyword_input_is_named():
    class Two(torch.nn.Module):
        def forward(self, x, y=None):
            return x + y

    model = nnsight.NNsight(Two())
    with pytest.raises(ValueError, match=r"input 'y'.*invoke 0: \(1, 3\).*invoke 1: \(1, 4\)"):
        with model.trace() as tracer:
            with tracer.invoke(torch.rand(1, 3), y=torch.rand(1, 3)):
                pass
            with tracer.invoke(torch.rand(1, 3), y=torch.rand(1, 4)):
                pass


def test_subclass_batch_folding_names_the_mismatch():
    """A subclass whose _batch calls NNsight._batch (the pairwise fold) gets the same kind of error."""

    class Folding(nnsight.NNsight):
        def _batch(self, batched_inputs, *args, **kwargs):
            return super()._batch(batched_inputs, *args, **kwargs)

    model = Folding(torch.nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"the invokes before: \(1, 5\).*the next invoke: \(1, 6\)"):
        with model.trace() as tracer:
            with tracer.invoke(torch.rand(1, 5)):
                pass
            with tracer.invoke(torch.rand(1, 6)):
                pass


def test_differs_from_nnsight_which_shifts_positions(tok):
    """The documented difference (rule 2 of DESIGN.md's contract): nnsight 0.4.11 passes no
    positions, so GPT-2 sees a left-padded invoke's tokens at shifted positions; its value is
    the solo run's at those positions. fastinterleave gives the solo run."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nnsight_ref = pytest.importorskip("nnsight", reason="nnsight 0.4.11 not installed (bash scripts/setup.sh)")
    nnsight_ref.DEFAULT_PATCHER.__exit__(None, None, None)  # its import-time torch patches: only while it runs

    def run(ns):
        model = ns.LanguageModel(make_lm(), tokenizer=make_tokenizer())
        with model.trace() as tracer:
            with tracer.invoke("the cat"):
                short = model.lm_head.output.save()
            with tracer.invoke("the big red cat sat on the mat"):
                pass
        return short.value if hasattr(short, "value") else short

    nnsight_ref.DEFAULT_PATCHER.__enter__()
    try:
        theirs = run(nnsight_ref)
    finally:
        nnsight_ref.DEFAULT_PATCHER.__exit__(None, None, None)
    ours = run(nnsight)
    net, enc = make_lm(), encode(tok, "the cat")
    alone = plain_logits(net, **enc)
    shifted = plain_logits(net, **enc, position_ids=torch.tensor([[6, 7]]))
    assert_close(ours[:, -2:], alone, **TOL)
    assert_close(theirs[:, -2:], shifted, **TOL)
    assert not torch.allclose(theirs[:, -2:], alone, **TOL)
