"""The README's examples run as written (the language-model one on a small
random GPT-2 with an in-process tokenizer)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_first_example_runs():
    code = _python_blocks()[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    net, x = scope["net"], scope["x"]
    h = net[0](x)
    torch.testing.assert_close(scope["hidden"], h)
    edited = h.clone()
    edited[:, 3] = 0
    torch.testing.assert_close(scope["logits"], net[1](edited * 2))


def test_language_model_example_runs():
    from test_language import make_lm, make_tokenizer

    code = _python_blocks()[1]
    scope = {"hf_model": make_lm(), "tokenizer": make_tokenizer()}
    code = code.replace('"The Eiffel Tower is in"', '"the cat sat on the mat"').replace(
        '"The Colosseum is in"', '"a dog ran"').replace('"Hello"', '"the cat"')
    code = code.replace("transformer.h[5]", "transformer.h[1]")
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["patched"].shape[0] == 1
    assert scope["tokens"].shape[-1] == len(scope["tokenizer"]("the cat")["input_ids"]) + 5
