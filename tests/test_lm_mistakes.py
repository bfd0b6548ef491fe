"""Mistaken inputs to a LanguageModel get a clear error where the user wrote them.

An empty prompt, an empty list of prompts, an invoke without input, an ``int``, a float /
bool / 3-D tensor, a list of floats, ids outside the vocabulary, a tensor without tokens:
each raises a ValueError or TypeError (a ``TokenIdError``, both a ValueError and an
IndexError, for ids outside the vocabulary) naming what is wrong and what is accepted,
when the trace / invoke is entered (the user's ``with`` line, nothing of the model run),
in ``model.trace`` and ``model.generate``. The model is left as it was: no hook attached,
and the next trace gives what the plain transformers model gives.

nnsight 0.4.11 fails on these cryptically (a reshape error deep in GPT-2 for no tokens,
"'int' object is not subscriptable", "list index out of range", "index out of range in
self" from the embedding, a float tensor refused only by the embedding), or silently runs
a 3-D tensor. Runs under transformers 4.x and 5.x (tests/test_tf5.py)."""

import traceback

import pytest
import torch
from torch.testing import assert_close

from fastinterleave import LanguageModel
from fastinterleave.language import TokenIdError
from conftest import assert_hooks_idle
from test_language import TOL, encode, hf_generate, make_lm, make_tokenizer, plain_logits

transformers = pytest.importorskip("transformers")

ACCEPTED = ("prompt (str)", "list of prompts", "token ids", "dict / BatchEncoding")


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def net(device):
    return make_lm(device)


@pytest.fixture
def model(net, tok):
    return LanguageModel(net, tokenizer=tok)


def vocab(net):
    return net.get_input_embeddings().num_embeddings


def assert_raised_at_user_line(err, *calls):
    """The error comes from the `with` line of this file that holds one of `calls`, before
    anything of the model (transformers, torch.nn) ran."""
    frames = traceback.extract_tb(err.value.__traceback__)
    mine = [f for f in frames if f.filename == __file__]
    assert mine, frames
    assert any(call in mine[-1].line for call in calls), mine[-1].line
    assert mine[-1].line.lstrip().startswith("with "), mine[-1].line
    for f in frames:
        assert "transformers" not in f.filename and "torch/nn" not in f.filename, f


def assert_message(err, *words):
    message = str(err.value)
    for word in words:
        assert word in message, (word, message)


def assert_model_works(model, net, tok, device):
    """No hook attached, no trace left open, and a normal trace gives plain HF's values."""
    assert_hooks_idle(net)
    with model.trace("the cat sat"):
        logits = model.lm_head.output.save()
    assert_close(logits, plain_logits(net, **encode(tok, "the cat sat", device)), **TOL)
    assert_hooks_idle(net)


def assert_generate_works(model, net, tok, device):
    enc = encode(tok, "the cat", device)
    with model.generate("the cat", max_new_tokens=3, do_sample=False):
        out = model.generator.output.save()
    assert torch.equal(out, hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 3))
    assert_hooks_idle(net)


# (name, the input as a function of (device, vocab size), exception, words of its message)
CASES = [
    ("empty_prompt", lambda d, v: "", ValueError, ["prompt ''", "no tokens", "at least one token"]),
    ("empty_prompts", lambda d, v: ["", ""], ValueError, ["prompts 0, 1", "('', '')", "no tokens"]),
    ("one_empty_prompt", lambda d, v: ["the cat", ""], ValueError, ["prompt 1 ", "('')", "no tokens"]),
    ("int", lambda d, v: 5, TypeError, ["got int 5", *ACCEPTED, "[5]"]),
    ("none", lambda d, v: None, TypeError, ["got NoneType None", *ACCEPTED]),
    ("empty_list", lambda d, v: [], ValueError, ["empty list", *ACCEPTED]),
    ("float_tensor", lambda d, v: torch.rand(1, 4, device=d), TypeError,
     ["must be integers", "float tensor", "torch.float32", "not cast to token ids", "ids.long()"]),
    ("bool_tensor", lambda d, v: torch.ones(1, 4, dtype=torch.bool, device=d), TypeError,
     ["must be integers", "bool tensor", "not cast to token ids"]),
    ("tensor_3d", lambda d, v: torch.ones(1, 2, 4, dtype=torch.long, device=d), ValueError,
     ["1-D (length) or 2-D (batch, length)", "shape (1, 2, 4)"]),
    ("tensor_0d", lambda d, v: torch.tensor(5, device=d), ValueError, ["1-D (length) or 2-D", "shape ()"]),
    ("list_of_floats", lambda d, v: [1.0, 2.0], TypeError, ["must be ints", "[1.0, 2.0]", "not cast to token ids"]),
    ("rows_of_floats", lambda d, v: [[1, 2], [3.5]], TypeError, ["must be ints", "row 1", "[3.5]"]),
    ("list_of_bools", lambda d, v: [True, False], TypeError, ["must be ints", "bools"]),
    ("mixed_prompts", lambda d, v: ["the cat", 3], TypeError, ["only strings", "item 1", "int 3"]),
    ("negative_id", lambda d, v: torch.tensor([[3, -1, 4]], device=d), TokenIdError,
     ["token id -1", "input_ids[0, 1]", "out of range", f"0 to "]),
    ("id_past_vocab", lambda d, v: torch.tensor([[3, 4], [5, v]], device=d), TokenIdError,
     ["token id", "input_ids[1, 1]", "out of range"]),
    ("list_id_past_vocab", lambda d, v: [3, v + 7], TokenIdError, ["input_ids[0, 1]", "out of range"]),
    ("empty_tensor", lambda d, v: torch.zeros(1, 0, dtype=torch.long, device=d), ValueError,
     ["no tokens", "shape (1, 0)", "at least one token"]),
    ("empty_batch", lambda d, v: torch.zeros(0, 3, dtype=torch.long, device=d), ValueError,
     ["no tokens", "shape (0, 3)"]),
    ("empty_row", lambda d, v: [[3, 4], []], ValueError, ["row 1", "empty"]),
    ("dict_float_ids", lambda d, v: {"input_ids": torch.rand(1, 3, device=d)}, TypeError,
     ["input_ids must be integers", "float tensor"]),
    ("dict_id_past_vocab", lambda d, v: {"input_ids": [[3, v]]}, TokenIdError, ["input_ids[0, 1]", "out of range"]),
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize("name, make, kind, words", CASES, ids=IDS)
def test_trace_input(model, net, tok, device, name, make, kind, words):
    x = make(device, vocab(net))
    with pytest.raises(kind) as err:
        with model.trace(x):
            model.lm_head.output.save()
    assert_message(err, "the input of model.trace(...)", *words)
    assert_raised_at_user_line(err, "model.trace(")
    assert_model_works(model, net, tok, device)


@pytest.mark.parametrize("name, make, kind, words", CASES, ids=IDS)
def test_invoke_input(model, net, tok, device, name, make, kind, words):
    x = make(device, vocab(net))
    with pytest.raises(kind) as err:
        with model.trace() as tracer:
            with tracer.invoke("the cat"):
                model.lm_head.output.save()
            with tracer.invoke(x):
                model.lm_head.output.save()
    assert_message(err, "the 2nd tracer.invoke(...) of model.trace(...)", *words)
    assert_raised_at_user_line(err, "tracer.invoke(x)")
    assert_model_works(model, net, tok, device)


@pytest.mark.parametrize("name, make, kind, words", CASES, ids=IDS)
def test_generate_input(model, net, tok, device, name, make, kind, words):
    x = make(device, vocab(net))
    with pytest.raises(kind) as err:
        with model.generate(x, max_new_tokens=2):
            model.generator.output.save()
    assert_message(err, "the input of model.generate(...)", *words)
    assert_raised_at_user_line(err, "model.generate(")
    assert_generate_works(model, net, tok, device)
    assert_model_works(model, net, tok, device)


def test_invoke_without_input(model, net, tok, device):
    with pytest.raises(TypeError) as err:
        with model.trace() as tracer:
            with tracer.invoke():
                model.lm_head.output.save()
    assert_message(err, "the 1st tracer.invoke(...) of model.trace(...)", "got no input", "takes one", *ACCEPTED)
    assert_raised_at_user_line(err, "tracer.invoke()")
    assert_model_works(model, net, tok, device)


def test_generate_invoke_without_input(model, net, tok, device):
    with pytest.raises(TypeError) as err:
        with model.generate(max_new_tokens=2) as tracer:
            with tracer.invoke():
                model.generator.output.save()
    assert_message(err, "tracer.invoke(...) of model.generate(...)", "got no input", *ACCEPTED)
    assert_raised_at_user_line(err, "tracer.invoke()")
    assert_generate_works(model, net, tok, device)


def test_invoke_with_two_inputs(model, net, tok, device):
    with pytest.raises(TypeError) as err:
        with model.trace() as tracer:
            with tracer.invoke("the cat", "a dog"):
                pass
    assert_message(err, "got 2 inputs", "takes one", "one list")
    assert_raised_at_user_line(err, "tracer.invoke(")
    assert_model_works(model, net, tok, device)


def test_token_id_error_is_a_value_and_an_index_error(model, net, tok, device):
    for kind in (ValueError, IndexError):
        with pytest.raises(kind, match="out of range"):
            with model.trace(torch.tensor([[vocab(net)]], device=device)):
                pass
    assert_model_works(model, net, tok, device)


def test_without_a_trace(model, net, tok, device):
    """trace=False checks the same (no invoke to name)."""
    with pytest.raises(ValueError, match="LanguageModel input: prompt '' has no tokens"):
        model.trace("", trace=False)
    with pytest.raises(TypeError, match="float tensor"):
        model.trace(torch.rand(1, 3, device=device), trace=False)
    assert_model_works(model, net, tok, device)


def test_in_a_session(model, net, tok, device):
    """A mistaken input inside a session raises at its line; the model works afterwards."""
    with pytest.raises(TypeError) as err:
        with model.session():
            with model.trace(5):
                pass
    assert_message(err, "got int 5")
    assert_raised_at_user_line(err, "model.trace(5)")
    assert_model_works(model, net, tok, device)


def test_scan(model, net, tok, device):
    with pytest.raises(TypeError, match="float tensor"):
        with model.scan(torch.rand(1, 3, device=device)):
            pass
    with pytest.raises(ValueError, match="no tokens"):
        with model.trace("", scan=True):
            pass
    assert_model_works(model, net, tok, device)


# -- valid inputs: unchanged ------------------------------------------------------------------


def test_valid_id_inputs_still_run(model, net, tok, device):
    """Integer ids of any width (numpy too, lists of 0-d tensors, rows given as (1, n)
    tensors), the first and last ids of the vocabulary: as plain HF on the same ids."""
    import numpy as np

    last = vocab(net) - 1
    ids = torch.tensor([[0, 3, last, 4]], device=device)
    expected = plain_logits(net, input_ids=ids)
    inputs = [
        ids, ids[0], ids.int(), ids.to(torch.int16), ids.cpu().numpy(), ids.cpu().numpy().astype(np.int32),
        [0, 3, last, 4], [[0, 3, last, 4]], [torch.tensor(v) for v in (0, 3, last, 4)],
        [ids.cpu()], {"input_ids": ids}, {"input_ids": [0, 3, last, 4]},
    ]
    for x in inputs:
        with model.trace(x):
            logits = model.lm_head.output.save()
        assert_close(logits, expected, **TOL)
    assert_hooks_idle(net)


def test_valid_prompts_still_run(model, net, tok, device):
    with model.trace(("the cat", "the cat")):
        logits = model.lm_head.output.save()
    expected = plain_logits(net, **encode(tok, "the cat", device))
    assert_close(logits, torch.cat([expected, expected]), **TOL)


def test_label_ids_are_not_vocabulary_checked(model, net, tok, device):
    """Labels given as a list keep -100 (ignored positions): only inputs are checked."""
    ids = torch.tensor([[3, 4, 5]], device=device)
    labels = torch.tensor([[-100, 4, 5]], device=device)
    with torch.no_grad():
        expected = net(input_ids=ids, labels=labels).loss
    with model.trace() as tracer:
        with tracer.invoke([3, 4, 5], labels=[-100, 4, 5]):
            loss = model.output.loss.save()
    assert_close(loss, expected, **TOL)
