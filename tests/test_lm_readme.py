"""The README's LanguageModel example computes what it says, under transformers 4.x and 5.x
(tests/test_tf5.py runs this file in .venv-tf5): checked against plain transformers runs
with hooks registered by hand, on the small random GPT-2 of test_language."""

import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from fastinterleave import LanguageModel

from test_language import TOL, encode, hf_generate, make_lm, make_tokenizer

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"
CLEAN, CORRUPTED, HELLO = "the cat sat on the mat", "a dog", "the cat"


def language_model_block():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "LanguageModel(hf_model" in b]
    return (
        block.replace('"The Eiffel Tower is in"', repr(CLEAN))
        .replace('"The Colosseum is in"', repr(CORRUPTED))
        .replace('"Hello"', repr(HELLO))
        .replace("transformer.h[5]", "transformer.h[1]")
    )


def run_with_hook(net, module, fn, call):
    handle = module.register_forward_hook(lambda m, a, o: fn(o))
    try:
        with torch.no_grad():
            return call()
    finally:
        handle.remove()


def test_readme_language_model_example_values():
    net, tok = make_lm(), make_tokenizer()
    scope = {"hf_model": net, "tokenizer": tok}
    exec(compile(language_model_block(), "README.md", "exec"), scope)

    # Patching: the clean prompt's MLP output at its last token, into the corrupted prompt's
    # last token; each prompt as if run alone.
    mlp = net.transformer.h[1].mlp
    seen = {}
    run_with_hook(net, mlp, lambda o: seen.setdefault("clean", o[:, -1].clone()), lambda: net(**encode(tok, CLEAN)))

    def patch(o):
        o = o.clone()
        o[:, -1] = seen["clean"]
        return o

    expected = run_with_hook(net, mlp, patch, lambda: net(**encode(tok, CORRUPTED)).logits[:, -1])
    assert_close(scope["patched"], expected, **TOL)

    # Generation: block 0's MLP output scaled by 0.9 at every step.
    enc = encode(tok, HELLO)
    tokens = run_with_hook(
        net, net.transformer.h[0].mlp, lambda o: o * 0.9,
        lambda: hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 5),
    )
    assert torch.equal(scope["tokens"], tokens)
    unscaled = hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 5)
    assert scope["tokens"].shape == unscaled.shape


def test_block_hidden_states_are_the_next_blocks_input():
    """The README: a block's hidden states under both versions are the next block's `.input`
    (and the last block's `ln_f.input`), whatever the block's output type."""
    net, tok = make_lm(), make_tokenizer()
    outs = []
    for block in net.transformer.h:
        block.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        net(**encode(tok, CLEAN))
    for block in net.transformer.h:
        block._forward_hooks.clear()
    model = LanguageModel(net, tokenizer=tok)
    with model.trace(CLEAN):
        h0 = model.transformer.h[1].input.save()
        h1 = model.transformer.ln_f.input.save()
    assert_close(h0, outs[0])
    assert_close(h1, outs[1])
