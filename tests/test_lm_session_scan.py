"""LanguageModel in sessions, nnsight 0.4's invoke / session keywords, and scanning a
LanguageModel (shapes while recording, on fake tensors).

References are plain transformers runs (hooks registered by hand) and the shapes a plain
run gives. What nnsight 0.4.11 does is said in each test; these run under transformers 4.x
and 5.x (tests/test_tf5.py runs them again in .venv-tf5)."""

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
from fastinterleave import LanguageModel

from test_language import TOL, encode, hf_generate, make_lm, make_tokenizer, plain_logits

transformers = pytest.importorskip("transformers")


@pytest.fixture
def net():
    return make_lm()


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def model(net, tok):
    return LanguageModel(net, tokenizer=tok)


def shapes(value):
    """The shapes of a plain value, in the same containers (None and other items as they are)."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if type(value) in (tuple, list):
        return type(value)(shapes(v) for v in value)
    if isinstance(value, dict):
        return {k: shapes(v) for k, v in value.items()}
    return value


def plain_outputs(net, module, **inputs):
    """What `module` gives (its first call) in a plain run of `net` on `inputs`."""
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            net(**inputs)
    finally:
        handle.remove()
    return seen[0]


# -- item 7: sessions and keywords -------------------------------------------------------------


def test_language_model_in_a_session(model, net, tok, hooks):
    """A value of one trace patched into the next, without .save() (nnsight 0.4.11 does this;
    fastinterleave failed with "_execute() got an unexpected keyword argument 'keep_nodes'")."""
    source = encode(tok, "the big red cat sat")
    target = encode(tok, "a dog ran")
    mlp = net.transformer.h[0].mlp
    clean = plain_outputs(net, mlp, **source)[:, -1]

    def patch(o):
        o = o.clone()
        o[:, -1] = clean
        return o

    hooks.output(mlp, patch)
    expected = plain_logits(net, **target)
    hooks.remove()

    with model.session() as session:
        with model.trace("the big red cat sat"):
            h = model.transformer.h[0].mlp.output[:, -1]
        with model.trace("a dog ran"):
            model.transformer.h[0].mlp.output[:, -1] = h
            logits = model.lm_head.output.save()
    assert_close(logits, expected, **TOL)


def test_session_loop_over_prompts(model, net, tok):
    prompts = ["the cat", "a small blue dog ran"]
    with model.session() as session:
        results = nnsight.list().save()
        with session.iter(prompts) as prompt:
            with model.trace(prompt):
                results.append(model.lm_head.output[:, -1])
    for prompt, got in zip(prompts, results):
        assert_close(got, plain_logits(net, **encode(tok, prompt))[:, -1], **TOL)


@pytest.mark.parametrize("scan", [False, True])
def test_invoke_scan_keyword_is_not_passed_to_the_tokenizer(model, net, tok, scan):
    """nnsight 0.4's Invoker takes `scan` itself; the other keywords go to _prepare_input."""
    with model.trace() as tracer:
        with tracer.invoke("the cat sat", scan=scan):
            shape = model.lm_head.output.shape
            logits = model.lm_head.output.save()
    assert_close(logits, plain_logits(net, **encode(tok, "the cat sat")))
    if scan:
        assert shape == logits.shape and type(shape) is torch.Size
    else:
        assert isinstance(shape, nnsight.Proxy)


def test_tokenizer_keywords_still_reach_the_tokenizer(model, net, tok):
    with model.trace() as tracer:
        with tracer.invoke("the cat sat", scan=False, padding="max_length", max_length=6):
            inputs = model.inputs.save()
            logits = model.lm_head.output.save()
    assert inputs[1]["input_ids"].shape == (1, 6)
    enc = tok("the cat sat", return_tensors="pt", padding="max_length", max_length=6)
    assert_close(logits, plain_logits(net, **enc))


def test_invoker_kwargs_scan_of_the_implicit_invoke(model, net, tok):
    """`model.trace(x, invoker_kwargs={"scan": True})` (nnsight 0.4's route to the invoke)."""
    with model.trace("the cat sat", invoker_kwargs={"scan": True}):
        shape = model.lm_head.output.shape
    assert shape == (1, 3, net.config.vocab_size)


def test_invoke_scan_on_plain_nnsight():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 10), torch.nn.Linear(10, 2))
    model = nnsight.NNsight(net)
    x, y = torch.rand(3, 5), torch.rand(4, 5)
    with model.trace() as tracer:
        with tracer.invoke(x, scan=True):
            scanned = model[0].output.shape
        with tracer.invoke(y):
            unscanned = model[0].output.shape
            out = model.output.save()
    assert scanned == (3, 10)
    assert isinstance(unscanned, nnsight.Proxy)
    assert_close(out, net(y))
    with model.trace(validate=True) as tracer:  # scan=False opts one invoke out
        with tracer.invoke(x, scan=False):
            assert isinstance(model[0].output.shape, nnsight.Proxy)
        with tracer.invoke(y):
            assert model[0].output.shape == (4, 10)


def test_session_takes_nnsight_keywords(model, net, tok):
    """nnsight 0.4.11: `session(backend=None, remote=False, blocking=True, validate=False,
    debug=None)` (LanguageModel). `scan=` is an extension (nnsight raises TypeError): it and
    `validate=True` apply to every trace inside."""
    expected = plain_logits(net, **encode(tok, "the cat sat"))
    for kwargs in ({"validate": True}, {"scan": True}, {"debug": True}, {"blocking": True}):
        with model.session(**kwargs):
            with model.trace("the cat sat"):
                shape = model.lm_head.output.shape
                logits = model.lm_head.output.save()
        assert_close(logits, expected)
        if kwargs.keys() & {"validate", "scan"}:
            assert shape == expected.shape
        else:
            assert isinstance(shape, nnsight.Proxy)
    with pytest.raises(NotImplementedError, match="not supported"):
        model.session(remote=True)


def test_session_validate_raises_at_the_users_line(model):
    with pytest.raises(IndexError) as err:
        with model.session(validate=True):
            with model.trace("the cat sat"):
                model.lm_head.output[:, 10].save()
    assert any("model.lm_head.output[:, 10]" in str(f.statement) for f in err.traceback)


def test_debug_and_blocking_do_not_reach_the_model(model, net, tok):
    with model.trace("the cat sat", debug=True, blocking=True):
        inputs = model.inputs.save()
        logits = model.lm_head.output.save()
    assert set(inputs[1]) == {"input_ids", "attention_mask", "labels"}
    assert_close(logits, plain_logits(net, **encode(tok, "the cat sat")))
    out = model.trace("the cat sat", trace=False, debug=True, invoker_kwargs={"scan": True})
    assert_close(out.logits, plain_logits(net, **encode(tok, "the cat sat")))


# -- item 8: scanning a LanguageModel ----------------------------------------------------------------


def test_model_scan_gives_a_plain_runs_shapes(model, net, tok):
    """`.shape` of a tuple output is the tuple of its shapes (as nnsight 0.4.11), of a tensor
    output its shape; a GPT-2 block gives a tuple under transformers 4.x, a tensor under 5.x."""
    enc = encode(tok, "the cat sat")
    ran = []
    handle = net.transformer.h[0].register_forward_hook(lambda m, a, o: ran.append(type(o[0] if isinstance(o, tuple) else o).__name__))
    try:
        with model.scan("the cat sat"):
            block = model.transformer.h[0].output.shape
            block_dtype = model.transformer.h[0].output.dtype
            mlp = model.transformer.h[0].mlp.output.shape
            head = model.lm_head.output.shape
            first = model.transformer.h[0].input.shape
    finally:
        handle.remove()
    assert ran == ["FakeTensor"]  # nothing ran on real tensors
    plain_block = plain_outputs(net, net.transformer.h[0], **enc)
    assert block == shapes(plain_block)
    if isinstance(plain_block, tuple):
        assert type(block) is tuple and block[0] == (1, 3, 32) and block_dtype[0] == torch.float32
    else:
        assert block == (1, 3, 32) and block_dtype == torch.float32
    assert mlp == (1, 3, 32) and first == (1, 3, 32)
    assert head == plain_logits(net, **enc).shape


@pytest.mark.parametrize("flag", ["scan", "validate"])
def test_trace_with_scan_or_validate(model, net, tok, flag):
    prompts = ["the big red cat sat", "a dog"]
    with model.trace(prompts, **{flag: True}):
        shape = model.lm_head.output.shape
        last = model.lm_head.output[:, -1].save()
    assert shape == (2, 5, net.config.vocab_size)
    assert_close(last, plain_logits(net, **tok(prompts, return_tensors="pt", padding=True))[:, -1])


def test_scan_with_invokes_of_different_lengths(model, tok):
    """Each invoke is scanned on its own input (as nnsight 0.4.11)."""
    with model.trace(scan=True) as tracer:
        with tracer.invoke("the cat"):
            short = model.lm_head.output.shape
        with tracer.invoke("the big red cat sat on the mat"):
            long = model.lm_head.output.shape
    assert short[1] == 2 and long[1] == len(tok("the big red cat sat on the mat")["input_ids"]) == 8


def test_data_dependent_ops_under_validate(model, net, tok):
    """`nonzero()` has a size that depends on data: while recording it is unknown (a proxy,
    not an error); the value is known when the model runs. (nnsight 0.4.11 gives an unbacked
    SymInt `u0` while recording, which cannot be saved.)"""
    with model.trace("the cat sat", validate=True):
        hits = (model.lm_head.output > 0).nonzero()
        count = hits.shape[0]
        assert isinstance(count, nnsight.Proxy)
        count = count.save()
        firsts = hits[:, 0].save()
        positive = (model.lm_head.output > 0).sum().save()
    expected = (plain_logits(net, **encode(tok, "the cat sat")) > 0).nonzero()
    assert count == expected.shape[0] == positive
    assert torch.equal(firsts, expected[:, 0])


def test_item_under_validate_is_not_an_error(model, net, tok):
    with model.trace("the cat sat", validate=True):
        top = model.lm_head.output[0, -1].argmax().item()
        top = nnsight.apply(int, top).save()
    assert top == plain_logits(net, **encode(tok, "the cat sat"))[0, -1].argmax().item()


def test_validate_still_raises_shape_errors(model):
    with pytest.raises(IndexError):
        with model.trace("the cat sat", validate=True):
            model.lm_head.output[:, 3].save()


def test_scan_of_a_model_loaded_by_id_loads_no_weights(tmp_path):
    """As nnsight 0.4.11: scanning runs on the meta model; the weights load on the first run."""
    net = make_lm(seed=2)
    net.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    model = LanguageModel(str(tmp_path))
    with model.scan(["the cat sat", "a dog"]):
        mlp = model.transformer.h[1].mlp.output.shape
        head = model.lm_head.output.shape
    assert not model.dispatched
    assert mlp == (2, 3, 32) and head == (2, 3, net.config.vocab_size)
    with model.trace("the cat sat", scan=True):
        logits = model.lm_head.output.save()
    assert model.dispatched
    assert_close(logits, plain_logits(net, **encode(model.tokenizer, "the cat sat")), **TOL)


def test_generate_with_scan(model, net, tok):
    """The prompt's forward (call 0) is scanned; the generated length depends on data (an
    end-of-sequence token stops it), so `generator.output.shape` is unknown while recording.
    (nnsight 0.4.11 gives a wrong one there: its fake generate stops after one token.)"""
    enc = encode(tok, "the cat sat")
    expected = hf_generate(net, tok, enc["input_ids"], enc["attention_mask"], 3)
    with model.generate("the cat sat", max_new_tokens=3, scan=True):
        mlp = model.transformer.h[0].mlp.output.shape
        length = model.generator.output.shape
        assert isinstance(length, nnsight.Proxy)
        out = model.generator.output.save()
    assert mlp == (1, 3, 32)
    assert torch.equal(out, expected)


def test_scan_does_not_leave_fake_truth_patched(model):
    from torch._subclasses.fake_tensor import FakeTensor

    before = FakeTensor.__bool__
    with model.scan("the cat sat"):
        pass
    assert FakeTensor.__bool__ is before


def test_tuple_shape_on_plain_nnsight():
    """`.shape` / `.dtype` / `.device` of a tuple-valued output: the same tuple of each
    tensor's attribute, other items as they are (nnsight 0.4.11's util.apply)."""

    class Pair(torch.nn.Module):
        def forward(self, x):
            return x * 2, (x.sum(-1), None)

    net = torch.nn.Sequential(torch.nn.Linear(4, 6), Pair())
    model = nnsight.NNsight(net)
    with model.scan(torch.rand(2, 4)):
        shape = model[1].output.shape
        dtype = model[1].output.dtype
        device = model[1].output.device
        inputs = model[1].inputs.shape
    assert shape == (torch.Size([2, 6]), (torch.Size([2]), None))
    assert dtype == (torch.float32, (torch.float32, None))
    assert device == (torch.device("cpu"), (torch.device("cpu"), None))
    assert inputs == ((torch.Size([2, 6]),), {})
