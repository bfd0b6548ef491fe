"""Parity with nnsight 0.4.11, the release whose API fastinterleave replaces.

Each scenario is written once, as a function of the library module (`ns`), and runs
twice in this process: with the real nnsight 0.4.11 and with fastinterleave, each on a
fresh copy of the same model (same seed). The values must be the same (DESIGN.md, the
API contract, rule 1).

Where nnsight 0.4.11 silently does something other than what the code says, the
contract (rule 2) makes fastinterleave raise or do what the code says; those cases
are the `test_differs_*` tests at the end, each asserting the documented difference.

nnsight 0.4.11 is installed into .venv by scripts/setup.sh (--no-deps plus
requirements-parity.txt). Under CI (CI set) a missing nnsight fails this module
loudly; elsewhere the module is skipped.
"""

import os
import warnings
from collections import OrderedDict

import pytest
import torch
from torch.testing import assert_close

import fastinterleave

if os.environ.get("CI"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nnsight  # CI's .venv holds nnsight 0.4.11 (scripts/setup.sh): no silent skip
else:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nnsight = pytest.importorskip("nnsight", reason="nnsight 0.4.11 not installed (bash scripts/setup.sh)")

transformers = pytest.importorskip("transformers")

assert nnsight.__version__ == "0.4.11", nnsight.__version__

# Importing nnsight 0.4.11 patches torch for the whole process (FakeTensor.__bool__ always
# True, autocast on "meta"). Undone here, and redone only while nnsight runs, so that
# nothing changes for fastinterleave or the test modules that run after this one.
nnsight.DEFAULT_PATCHER.__exit__(None, None, None)


def ref(fn, *args, **kwargs):
    """fn(*args, **kwargs) with nnsight 0.4.11's import-time patches in place."""
    nnsight.DEFAULT_PATCHER.__enter__()
    try:
        return fn(*args, **kwargs)
    finally:
        nnsight.DEFAULT_PATCHER.__exit__(None, None, None)
assert transformers.__version__.startswith("4."), transformers.__version__

LIBS = {"nnsight": nnsight, "fastinterleave": fastinterleave}


@pytest.fixture(autouse=True)
def _restore_tracebacklimit():
    """nnsight 0.4.11 sets sys.tracebacklimit = 0 on its errors and leaves it set."""
    import sys

    before = getattr(sys, "tracebacklimit", None)
    yield
    if before is None:
        if hasattr(sys, "tracebacklimit"):
            del sys.tracebacklimit
    else:
        sys.tracebacklimit = before


# -- models and inputs (each call builds a fresh, identical copy) ---------------------------------


def make_tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        OrderedDict(layer1=torch.nn.Linear(5, 10), layer2=torch.nn.Linear(10, 2))
    ).eval()


def make_x(n=1, seed=1):
    torch.manual_seed(seed)
    return torch.rand(n, 5)


class Rep(torch.nn.Module):
    """`lin` is called 3 times per forward."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, h):
        for _ in range(3):
            h = self.lin(h)
        return h


def make_rep():
    torch.manual_seed(0)
    return Rep().eval()


class KW(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(5, 5)

    def forward(self, a, b=None, scale=1.0):
        return self.inner(a) * scale


def make_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


WORDS = "the a cat dog sat on mat big red blue small ran saw".split()


def make_tokenizer(padding_side="left"):
    """A word-level tokenizer built in-process (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2}
    for i, w in enumerate(WORDS):
        vocab[w] = i + 3
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]",
        padding_side=padding_side, model_input_names=["input_ids", "attention_mask"],
    )


def make_lm_net():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=len(WORDS) + 8, n_positions=64,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def make_lm(ns, padding_side="left"):
    return ns.LanguageModel(make_lm_net(), tokenizer=make_tokenizer(padding_side))


def batch_model(ns, net):
    """nnsight 0.4.11's default `_batch` is broken for a plain NNsight (DESIGN.md): both
    sides get this same subclass, which concatenates the positional tensors on dim 0."""

    class BatchNNsight(ns.NNsight):
        def _batch(self, batched_inputs, *args, **kwargs):
            if batched_inputs is None:
                return (args, kwargs)
            bargs, bkwargs = batched_inputs
            return tuple(torch.cat([a, b], dim=0) for a, b in zip(bargs, args)), bkwargs

    return BatchNNsight(net)


def value_error(v):
    """A value after its trace: a proxy left un-injected gives its `.value`, or 'ValueError'
    when reading that raises ValueError (an unset value); anything else is itself."""
    from nnsight.tracing.graph import Proxy as NNsightProxy

    if not isinstance(v, (NNsightProxy, fastinterleave.Proxy)):
        return v
    try:
        return v.value
    except ValueError:
        return "ValueError"


# -- comparing ------------------------------------------------------------------------------------


def assert_same(got, ref, path="result"):
    """`got` (fastinterleave) has the structure and values of `ref` (nnsight 0.4.11)."""
    if isinstance(ref, (bool, int, float, str, type(None), torch.Size)):
        assert type(got) is type(ref) and got == ref, f"{path}: {got!r} != nnsight's {ref!r}"
    elif isinstance(ref, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: nnsight gives a Tensor, fastinterleave {type(got)!r}"
        assert got.shape == ref.shape, f"{path}: shape {tuple(got.shape)} != nnsight's {tuple(ref.shape)}"
        assert got.dtype == ref.dtype, f"{path}: dtype {got.dtype} != nnsight's {ref.dtype}"
        assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{path}: {m}")
    elif isinstance(ref, dict):  # also HF ModelOutput / BatchEncoding
        assert isinstance(got, dict), f"{path}: nnsight gives a {type(ref).__name__}, fastinterleave {type(got)!r}"
        assert list(got.keys()) == list(ref.keys()), f"{path}: keys {list(got)} != nnsight's {list(ref)}"
        for k in ref:
            assert_same(got[k], ref[k], f"{path}[{k!r}]")
    elif isinstance(ref, (tuple, list)):
        assert isinstance(got, (tuple, list)) and type(got) is type(ref), (
            f"{path}: nnsight gives a {type(ref).__name__}, fastinterleave {type(got)!r}"
        )
        assert len(got) == len(ref), f"{path}: length {len(got)} != nnsight's {len(ref)}"
        for i, (g, r) in enumerate(zip(got, ref)):
            assert_same(g, r, f"{path}[{i}]")
    else:
        raise AssertionError(f"{path}: nnsight gives an unexpected {type(ref)!r} (not injected?)")


SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


# -- scenarios: same code, same values (rule 1) -----------------------------------------------------


@scenario
def save(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        h1 = model.layer1.output.save()
        h2 = model.layer2.output.save()
        out = model.output.save()
        s = (model.layer1.output.sum() * 2).save()
    return h1, h2, out, s


@scenario
def save_batch_of_3(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x(3)):
        h1 = model.layer1.output.save()
        picked = model.layer1.output[1:, 2:5].save()
        out = model.output.save()
    return h1, picked, out


@scenario
def trace_false(ns):
    return ns.NNsight(make_tiny()).trace(make_x(2), trace=False)


@scenario
def shapes_with_scan(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x(3), scan=True):
        shape = model.layer1.output.shape
        zeros = torch.zeros(model.layer1.output.shape)
        model.layer1.output = zeros + 1
        out = model.output.save()
    return shape, out


@scenario
def inplace_edit(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        before = model.layer1.output.save()  # the same value: it sees the edit
        kept = model.layer1.output.clone().save()
        model.layer1.output[:, 2:5] = 0
        model.layer1.output[:, 0] = model.layer1.output[:, 1] * 3
        after = model.layer1.output.save()
        out = model.output.save()
    return before, kept, after, out


@scenario
def inplace_edit_of_layer2_and_root(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x(2)):
        model.layer2.output[:, 1] = -1
        l2 = model.layer2.output.save()
        out = model.output.save()
    return l2, out


@scenario
def swap(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        pre = model.layer1.output.save()
        model.layer1.output = model.layer1.output * 2
        out = model.output.save()
    return pre, out


@scenario
def swap_with_a_factory_tensor(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        model.layer1.output = torch.zeros(1, 10)
        out = model.output.save()
    return out


@scenario
def read_after_swap(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        pre = model.layer1.output.save()
        model.layer1.output = model.layer1.output * 2
        y = model.layer1.output.save()  # a read recorded after the swap sees the swapped value
        out = model.layer2.output.save()
    return pre, y, out


@scenario
def swap_then_inplace_edit(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        model.layer1.output = model.layer1.output + 1
        model.layer1.output[:, 3] = 0
        y = model.layer1.output.save()
        out = model.output.save()
    return y, out


@scenario
def input_swap(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        model.layer2.input = torch.zeros(1, 10)
        out = model.layer2.output.save()
    return out


@scenario
def out_of_order_read_before_edit(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        b = model.layer2.output.save()
        model.layer1.output[:, 0] = 0
    return b


@scenario
def out_of_order_read_before_swap(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        b = model.layer2.output.save()
        model.layer1.output = model.layer1.output + 1
    return b


@scenario
def edit_recorded_before_a_later_read(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        a = model.layer1.output
        a[:, 0] = 0
        b = model.layer2.output
        s = (a.sum() + b.sum()).save()
        out = model.layer2.output.save()
    return s, out


@scenario
def list_append_and_apply_len(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        hs = []
        hs.append(model.layer2.output)
        n = ns.apply(len, hs).save()
        first = ns.apply(lambda items: items[0] * 1, hs).save()
    return n, first


@scenario
def traced_list_append(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        hs = ns.list().save()
        hs.append(model.layer1.output)
        hs.append(model.layer2.output)
        n = ns.apply(len, hs).save()
    return list(hs), n


@scenario
def save_before_stop(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()) as tracer:
        xs = model.layer1.output.save()
        tracer.stop()
        after = model.layer2.output.save()
    return xs, value_error(after)


@scenario
def input_and_inputs(ns):
    x = make_x()
    model = ns.NNsight(make_tiny())
    with model.trace(x):
        in1 = model.layer1.input.save()
        inputs1 = model.layer1.inputs.save()
        in2 = model.layer2.input.save()
        inputs2 = model.layer2.inputs.save()
        root_in = model.input.save()
    return in1, inputs1, in2, inputs2, root_in, in1 is x


@scenario
def inputs_with_trace_kwargs(ns):
    torch.manual_seed(0)
    model = ns.NNsight(KW().eval())
    with model.trace(make_x(), scale=2.0):
        root = model.inputs.save()
        inner = model.inner.inputs.save()
        out = model.output.save()
    return root, inner, out


@scenario
def input_edit(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x(2)):
        model.layer2.input[:, :5] = 0
        out = model.output.save()
    return out


@scenario
def multi_invoke(ns):
    xs = make_x(3)
    model = batch_model(ns, make_tiny())
    with model.trace() as tracer:
        with tracer.invoke(xs[0:1]) as inv0:
            h0 = model.layer1.output.save()
            o0 = model.output.save()
            in0 = model.input.save()
        with tracer.invoke(xs[1:3]) as inv1:
            model.layer1.output[:, 0] = 0
            h1 = model.layer1.output.save()
            o1 = model.layer2.output.save()
    return h0, o0, in0, h1, o1, inv0.inputs, inv0.batch_size, inv1.batch_size


@scenario
def multi_invoke_swap(ns):
    xs = make_x(2)
    model = batch_model(ns, make_tiny())
    with model.trace() as tracer:
        with tracer.invoke(xs[0:1]):
            v0 = model.layer1.output.clone().save()
            o0 = model.output.save()
        with tracer.invoke(xs[1:2]):
            v1 = model.layer1.output.clone().save()  # a clone: see test_differs_swap_write_back
            model.layer1.output = torch.zeros(1, 10)
            o1 = model.layer2.output.save()
    return v0, o0, v1, o1


@scenario
def cross_invoke_patch(ns):
    xs = make_x(2)
    model = batch_model(ns, make_tiny())
    with model.trace() as tracer:
        with tracer.invoke(xs[0:1]):
            clean = model.layer1.output[:, 2:6]
            o_clean = model.output.save()
        with tracer.invoke(xs[1:2]):
            model.layer1.output[:, 2:6] = clean
            o_patched = model.output.save()
    return o_clean, o_patched


@scenario
def cross_invoke_swap(ns):
    xs = make_x(2)
    model = batch_model(ns, make_tiny())
    with model.trace() as tracer:
        with tracer.invoke(xs[0:1]):
            clean = model.layer1.output
        with tracer.invoke(xs[1:2]):
            model.layer1.output = clean
            o = model.output.save()
    return o


@scenario
def iteration_all(ns):
    model = ns.NNsight(make_rep())
    torch.manual_seed(1)
    with model.trace(torch.rand(1, 4)):
        outs = ns.list().save()
        with model.lin.all():
            outs.append(model.lin.output)
    return list(outs)


@scenario
def iteration_iter_and_next(ns):
    model = ns.NNsight(make_rep())
    torch.manual_seed(1)
    with model.trace(torch.rand(1, 4)):
        o0 = model.lin.output.save()
        o2 = model.lin.iter[2].output.save()
        o1 = model.lin.next().output.save()
    return o0, o1, o2


@scenario
def iteration_iter_list_and_slice(ns):
    model = ns.NNsight(make_rep())
    torch.manual_seed(1)
    with model.trace(torch.rand(1, 4)):
        picked = ns.list().save()
        sliced = ns.list().save()
        with model.lin.iter[[0, 2]]:
            picked.append(model.lin.output * 1)
        with model.lin.iter[1:3]:
            sliced.append(model.lin.input * 1)
    return list(picked), list(sliced)


@scenario
def iteration_edit_one_call(ns):
    model = ns.NNsight(make_rep())
    torch.manual_seed(1)
    with model.trace(torch.rand(2, 4)):
        model.lin.iter[1].output[:, 0] = 0
        out = model.output.save()
    return out


@scenario
def gradient_read(ns):
    net = make_tiny()
    model = ns.NNsight(net)
    with model.trace(make_x(3)):
        g1 = model.layer1.output.grad.save()
        g2 = model.layer2.input.grad.save()
        norm = (model.layer1.output.grad ** 2).sum().save()
        model.output.sum().backward()
    return g1, g2, norm, net.layer1.weight.grad.clone()


@scenario
def gradient_inplace_edit(ns):
    net = make_tiny()
    model = ns.NNsight(net)
    with model.trace(make_x(3)):
        model.layer1.output.grad[:, :4] = 0
        model.output.sum().backward()
    return net.layer1.weight.grad.clone(), net.layer1.bias.grad.clone()


@scenario
def gradient_swap(ns):
    net = make_tiny()
    model = ns.NNsight(net)
    with model.trace(make_x(3)):
        h = model.layer1.output
        h.grad = h.grad * 2
        model.output.sum().backward()
    return net.layer1.weight.grad.clone(), net.layer1.bias.grad.clone()


def _branches(ns, sign):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()) as tracer:
        total = model.layer1.output.sum() * sign
        with tracer.cond(total > 0) as branch:
            model.layer1.output[:] = 1
            taken_if = (model.layer1.output * 1).save()
        with branch.else_():
            model.layer1.output[:] = 2
            taken_else = (model.layer1.output * 1).save()
        out = model.output.save()
    return value_error(taken_if), value_error(taken_else), out


@scenario
def cond_else_positive(ns):
    return _branches(ns, 1.0)


@scenario
def cond_else_negative(ns):
    return _branches(ns, -1.0)


@scenario
def cond_false_skips(ns):
    model = ns.NNsight(make_tiny())
    with model.trace(make_x()):
        with ns.cond(model.layer1.output[0, 0] > 100):
            model.layer1.output[:] = 0
        o = model.layer1.output.save()
    return o


@scenario
def session_values_flow(ns):
    x, x2 = make_x(seed=1), make_x(seed=2)
    model = ns.NNsight(make_tiny())
    with model.session():
        with model.trace(x):
            clean = model.layer1.output  # not saved
        with model.trace(x2):
            model.layer1.output = clean
            out = model.output.save()
        with model.trace(x2):
            plain = model.output.save()
    return out, plain


@scenario
def session_edits_a_saved_value(ns):
    x, x2 = make_x(seed=1), make_x(seed=2)  # not inside the session: nnsight traces torch.rand there
    model = ns.NNsight(make_tiny())
    with model.session():
        with model.trace(x):
            l1 = model.layer1.output.save()
        with model.trace(x2):
            l1[:, 2] = 5
            out = model.output.save()
    return l1, out


@scenario
def edit_then_trace(ns):
    model = ns.NNsight(make_tiny())
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    with edited.trace(make_x(2)):
        h = model.layer1.output.save()
    with model.trace(make_x(2)):
        plain = model.layer1.output.save()
    return h, plain


@scenario
def edit_inplace_and_clear(ns):
    model = ns.NNsight(make_tiny())
    with model.edit(inplace=True):
        model.layer2.output = model.layer2.output * 0
    with model.trace(make_x()):
        edited = model.output.save()
    model.clear_edits()
    with model.trace(make_x()):
        cleared = model.output.save()
    return edited, cleared


@scenario
def gpt2_tuple_outputs(ns):
    model = ns.NNsight(make_gpt2())
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with model.trace(ids):
        h0 = model.transformer.h[0].output[0].save()
        full = model.transformer.h[0].output.save()
        inputs = model.transformer.h[0].input.save()
        logits = model.output.logits.save()
    return h0, full, inputs, logits


@scenario
def gpt2_tuple_edit_and_swap(ns):
    model = ns.NNsight(make_gpt2())
    ids = torch.tensor([[1, 2, 3, 4]])
    with model.trace(ids):
        pre = model.transformer.h[-1].output[0].clone().save()
        model.transformer.h[-1].output[0][:] = 0
        post = model.transformer.h[-1].output[0].save()
        out = model.transformer.h[0].output
        model.transformer.h[0].output = (out[0] * 0.5,) + out[1:]
        logits = model.lm_head.output.save()
    return pre, post, logits


@scenario
def gpt2_two_invokes(ns):
    model = batch_model(ns, make_gpt2())
    with model.trace() as tracer:
        with tracer.invoke(torch.tensor([[1, 2, 3, 4]])):
            clean = model.transformer.h[0].output[0][:, -1]
            l0 = model.lm_head.output.save()
        with tracer.invoke(torch.tensor([[5, 6, 7, 8]])):
            model.transformer.h[0].output[0][:, -1] = clean
            l1 = model.lm_head.output.save()
    return l0, l1


@scenario
def lm_one_string(ns):
    model = make_lm(ns)
    with model.trace("the big red cat sat") as tracer:
        emb = model.transformer.wte.output.save()
        h0 = model.transformer.h[0].output[0].save()
        logits = model.output.logits.save()
        out = model.output.save()
    return emb, h0, logits, out


@scenario
def lm_list_of_strings_one_invoke(ns):
    model = make_lm(ns)
    with model.trace(["the cat sat on the mat", "a dog"]) as tracer:
        logits = model.lm_head.output.save()
        model_logits = model.output.logits.save()
    return logits, model_logits


@scenario
def lm_edit(ns):
    model = make_lm(ns)
    with model.trace("the big red cat sat"):
        model.transformer.h[0].mlp.output[:, -1] = 0
        model.transformer.h[1].output[0][:, 1] *= 2
        logits = model.lm_head.output.save()
    return logits


@scenario
def lm_invoke_inputs(ns):
    model = make_lm(ns)
    with model.trace() as tracer:
        with tracer.invoke("the cat sat") as inv:
            model.lm_head.output.save()
    return inv.batch_size, inv.inputs[0][0]["input_ids"], inv.inputs[0][0]["attention_mask"]


@scenario
def lm_equal_length_invokes(ns):
    """Several invokes only with prompts of one length: nnsight 0.4.11 rebuilds later invokes'
    masks wrongly otherwise (see test_differs_later_invoke_masks)."""
    model = make_lm(ns)
    with model.trace() as tracer:
        with tracer.invoke("the big red cat"):
            clean = model.transformer.h[0].output[0][:, 2]
            l0 = model.lm_head.output.save()
            e0 = model.transformer.wte.output.save()
        with tracer.invoke(["a small blue dog", "the cat saw a"]):
            model.transformer.h[0].output[0][:, 2] = clean
            l1 = model.lm_head.output.save()
    return l0, e0, l1


@scenario
def lm_generate_edit_at_step_0(ns):
    model = make_lm(ns)
    with model.generate("the big red cat", max_new_tokens=3):
        mlp = model.transformer.h[0].mlp
        mlp.output[:, -1] = mlp.output[:, -1] * 4 + 1
        final = model.transformer.ln_f.output.save()
        out = model.generator.output.save()
    return final, out


@scenario
def lm_generate_steps(ns):
    model = make_lm(ns)
    with model.generate("the cat sat", max_new_tokens=3):
        s0 = model.transformer.ln_f.output.save()
        s2 = model.transformer.ln_f.iter[2].output.save()
        s1 = model.transformer.ln_f.next().output.save()
        out = model.generator.output.save()
    return s0, s1, s2, out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_values(name):
    expected = ref(SCENARIOS[name], nnsight)
    got = SCENARIOS[name](fastinterleave)
    assert_same(got, expected)


# -- documented differences (rule 2): nnsight 0.4.11 silently does something else -------------------


def test_differs_a_value_made_after_a_block_of_calls_is_made_once():
    """`sliced = nnsight.list()` recorded after a `.iter[[0, 2]]` block does not read the
    block's value, yet nnsight 0.4.11 makes it anew at the block's next call (call 2),
    after the second block appended to it: it comes back empty. fastinterleave runs
    again only what reads the block's value (DESIGN.md, rule 2: what the code says)."""

    def run(ns):
        model = ns.NNsight(make_rep())
        torch.manual_seed(1)
        x = torch.rand(1, 4)
        with model.trace(x):
            picked = ns.list().save()
            with model.lin.iter[[0, 2]]:
                picked.append(model.lin.output * 1)
            sliced = ns.list().save()
            with model.lin.iter[1:3]:
                sliced.append(model.lin.input * 1)
        return x, list(picked), list(sliced)

    _, _, nn_sliced = ref(run, nnsight)
    assert nn_sliced == []
    x, picked, sliced = run(fastinterleave)
    net = make_rep()
    inputs, outputs = [], []

    def record(module, args, output):
        inputs.append(args[0])
        outputs.append(output)

    handle = net.lin.register_forward_hook(record)
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    assert_same(picked, [outputs[0], outputs[2]])
    assert_same(sliced, [inputs[1], inputs[2]])


def test_differs_ineffective_edit_raises():
    """DESIGN.md, "Scheduling": an edit of layer1 recorded after a read of layer2 runs, in
    nnsight 0.4.11, only once layer2 fired, and changes nothing, silently (NOTES e);
    fastinterleave raises an error naming both lines."""

    def run(ns):
        model = ns.NNsight(make_tiny())
        with model.trace(make_x()):
            a = model.layer1.output
            b = model.layer2.output.save()
            a[:, 3] = 0
        return b

    with torch.no_grad():
        unedited = make_tiny()(make_x())
    assert_close(ref(run, nnsight), unedited)  # the edit never landed
    with pytest.raises(fastinterleave.InterventionError):
        run(fastinterleave)


def test_differs_edit_blocked_by_an_earlier_node_raises():
    """DESIGN.md, "Scheduling": here the edit waits behind a node that needs layer2
    (NOTES t): nnsight 0.4.11 applies it too late, silently; fastinterleave raises."""

    def run(ns):
        model = ns.NNsight(make_tiny())
        with model.trace(make_x()):
            b = model.layer2.output
            a = model.layer1.output
            (a.sum() + b.sum()).save()
            a[:, 0] = 0
            out = model.layer2.output.save()
        return out

    with torch.no_grad():
        unedited = make_tiny()(make_x())
    assert_close(ref(run, nnsight), unedited)
    with pytest.raises(fastinterleave.InterventionError):
        run(fastinterleave)


def test_differs_swap_depending_on_a_later_module_raises():
    """DESIGN.md, "Scheduling": a swap of layer1 whose value needs layer2 can never be
    applied; nnsight 0.4.11 ignores it silently (NOTES 3.2); fastinterleave raises."""

    def run(ns):
        model = ns.NNsight(make_tiny())
        with model.trace(make_x()):
            model.layer1.output = model.layer2.output.sum() * torch.ones(1, 10)
            out = model.layer2.output.save()
        return out

    with torch.no_grad():
        unedited = make_tiny()(make_x())
    assert_close(ref(run, nnsight), unedited)
    with pytest.raises(fastinterleave.InterventionError):
        run(fastinterleave)


def test_differs_iteration_that_never_happened_raises():
    """DESIGN.md, the API contract, rule 2 ("a value from an iteration that never
    happened"): nnsight 0.4.11 leaves the value unset, silently (NOTES j)."""

    def run(ns):
        model = ns.NNsight(make_tiny())
        with model.trace(make_x()):
            late = model.layer1.next().output.save()
        return late

    assert value_error(ref(run, nnsight)) == "ValueError"
    with pytest.raises(fastinterleave.InterventionError):
        run(fastinterleave)


def test_differs_swap_keeps_values_read_before_it():
    """DESIGN.md, "Batch-slice dispatch": with several invokes nnsight 0.4.11 writes a
    swap back in place, so a value saved before the swap shows the swapped data (NOTES f);
    fastinterleave keeps its content, as both do with one invoke (scenario `swap`)."""

    def run(ns):
        xs = make_x(2)
        model = batch_model(ns, make_tiny())
        with model.trace() as tracer:
            with tracer.invoke(xs[0:1]):
                v0 = model.layer1.output.save()
            with tracer.invoke(xs[1:2]):
                v1 = model.layer1.output.save()
                v1c = model.layer1.output.clone().save()
                model.layer1.output = torch.zeros(1, 10)
                o1 = model.layer2.output.save()
        return v0, v1, v1c, o1

    r0, r1, r1c, ro1 = ref(run, nnsight)
    g0, g1, g1c, go1 = run(fastinterleave)
    assert torch.count_nonzero(r1) == 0  # nnsight: overwritten by the swap
    assert_same(g1, r1c)  # fastinterleave: the value layer1 gave
    assert_same(g1c, r1c)
    assert_same(g0, r0)
    assert_same(go1, ro1)


def test_differs_model_output_is_narrowed_per_invoke():
    """DESIGN.md, "Batch-slice dispatch": nnsight 0.4.11 passes an HF ModelOutput whole,
    so each invoke sees every row (NOTES 3.1); fastinterleave narrows it to the invoke's
    rows, which are nnsight's values for those rows."""

    def run(ns):
        model = make_lm(ns)
        with model.trace() as tracer:
            with tracer.invoke("the big red cat"):
                l0 = model.output.logits.save()
            with tracer.invoke("a small blue dog"):
                l1 = model.output.logits.save()
        return l0, l1

    r0, r1 = ref(run, nnsight)
    g0, g1 = run(fastinterleave)
    assert r0.shape[0] == 2 and r1.shape[0] == 2  # nnsight: the whole batch in each invoke
    assert_same(g0, r0[0:1])
    assert_same(g1, r1[1:2])


def test_differs_later_invoke_masks():
    """DESIGN.md, the contract ("left padding across invokes") and NOTES 7: nnsight 0.4.11
    rebuilds the masks of later invokes from already padded ids, so the padding of a
    later invoke gets mask 1. fastinterleave gives every row the tokenizer's own mask, and
    its logits equal the plain HF model's on that batch."""
    seen = {}

    def run(ns):
        net = make_lm_net()
        handle = net.register_forward_pre_hook(
            lambda m, a, kw: seen.__setitem__(ns.__name__, (kw["input_ids"], kw["attention_mask"])),
            with_kwargs=True,
        )
        model = ns.LanguageModel(net, tokenizer=make_tokenizer("left"))
        with model.trace() as tracer:
            with tracer.invoke("the cat"):
                pass
            with tracer.invoke(["the big red cat sat", "a dog"]):
                logits = model.lm_head.output.save()
        handle.remove()
        return net, logits

    _, _ = ref(run, nnsight)
    net, logits = run(fastinterleave)
    right = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    ids, mask = seen["nnsight"]
    assert mask.tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]  # 'a dog': padding unmasked
    ids_fi, mask_fi = seen["fastinterleave"]
    assert torch.equal(ids_fi, ids)
    assert torch.equal(mask_fi, right)
    with torch.no_grad():
        expected = net(input_ids=ids, attention_mask=right).logits[1:]
    assert_same(logits, expected)


def test_differs_default_batch_of_plain_nnsight():
    """DESIGN.md, the contract: nnsight 0.4.11's default `_batch` of a plain NNsight fails
    with several invokes (NOTES f4); fastinterleave does the evident intent, the values of
    the concatenating subclass both sides use in the scenarios above."""

    def run(model):
        xs = make_x(2)
        with model.trace() as tracer:
            with tracer.invoke(xs[0:1]):
                o0 = model.output.save()
            with tracer.invoke(xs[1:2]):
                o1 = model.output.save()
        return o0, o1

    with pytest.raises(Exception, match="expected Tensor"):
        ref(lambda: run(nnsight.NNsight(make_tiny())))
    expected = ref(lambda: run(batch_model(nnsight, make_tiny())))
    assert_same(run(fastinterleave.NNsight(make_tiny())), expected)


def test_differs_keyword_only_inputs():
    """DESIGN.md, the contract: keyword-only inputs (`model.trace(**tokenizer(...))`) make an
    implicit invoke in fastinterleave (later nnsight releases accept them); nnsight 0.4.11
    fails. The values are nnsight's for the same prompt passed positionally."""
    tok = make_tokenizer()

    def run(ns, positional):
        model = make_lm(ns)
        enc = tok("the big red cat", return_tensors="pt")
        with model.trace(enc) if positional else model.trace(**enc):
            logits = model.lm_head.output.save()
        return logits

    with pytest.raises(Exception):
        ref(run, nnsight, positional=False)
    assert_same(run(fastinterleave, positional=False), ref(run, nnsight, positional=True))
