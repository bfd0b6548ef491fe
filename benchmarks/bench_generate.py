"""Workload 5: generation. 16 new tokens (greedy) from gpt2-tiny (with its KV cache), with
an edit at every step: block 1's hidden states at the last position set to 0.

  plain    HF ``generate``
  raw      HF ``generate`` with a forward hook on block 1 doing the edit (the floor)
  fi       ``fastinterleave.LanguageModel(...).generate(...)`` with ``h[1].all()``
  nnsight  0.4.11: the same code; 0.8.1: ``for _ in tracer.iter[:16]:`` around the edit

fastinterleave's LanguageModel / generate may not exist yet: then this reports
"not available" (with the reason) and still times plain and raw hooks (and nnsight).

Run alone: python benchmarks/bench_generate.py [--quick]
"""

import sys

import torch

import fastinterleave
from common import NN04, NNSIGHT, bench, gpt2, hidden

NEW = 16
PROMPT = 8


def tokenizer(vocab_size):
    """A word-level tokenizer over w0..w{n-1} built in code (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="w0", eos_token="w0", padding_side="left")


GEN_KW = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)


def generate_fns():
    """{approach: generate 16 tokens with the edit} (values checked equal), and why an
    approach is missing."""
    net = gpt2("gpt2-tiny", use_cache=True)
    tup = net.block_tuple
    tok = tokenizer(net.config.vocab_size)
    torch.manual_seed(5)
    ids = torch.randint(1, net.config.vocab_size, (1, PROMPT))
    mask = torch.ones_like(ids)
    block = net.transformer.h[1]

    def plain():
        return net.generate(input_ids=ids, attention_mask=mask, **GEN_KW)

    def edit(m, a, o):
        hidden(o, tup)[:, -1] = 0

    def raw():
        h = block.register_forward_hook(edit)
        try:
            return net.generate(input_ids=ids, attention_mask=mask, **GEN_KW)
        finally:
            h.remove()

    fns = {"plain": plain, "raw": raw}
    status = {}

    # fastinterleave, if it has LanguageModel.generate.
    fi_lm = None
    if not hasattr(fastinterleave, "LanguageModel"):
        status["fi"] = "not available: fastinterleave has no LanguageModel yet"
    else:
        try:
            fi_lm = fastinterleave.LanguageModel(net, tokenizer=tok)
            if not hasattr(fi_lm, "generate"):
                raise AttributeError("LanguageModel has no generate")
        except Exception as e:  # noqa: BLE001 - report, do not fail the suite
            status["fi"] = f"not available: {type(e).__name__}: {e}"
            fi_lm = None

    def fi_gen(m=fi_lm):
        with m.generate(ids, **GEN_KW):
            h1 = m.transformer.h[1]
            h1.all()
            hidden(h1.output, tup)[:, -1] = 0
            out = m.generator.output.save()
        return out

    if fi_lm is not None:
        fns["fi"] = fi_gen

    if NNSIGHT is not None:
        nn_lm = NNSIGHT.LanguageModel(net, tokenizer=tok)
        if NN04:

            def nn_gen(m=nn_lm):
                with m.generate(ids, **GEN_KW):
                    h1 = m.transformer.h[1]
                    h1.all()
                    hidden(h1.output, tup)[:, -1] = 0
                    out = m.generator.output.save()
                return out

        else:

            def nn_gen(m=nn_lm):
                with m.generate(ids, **GEN_KW) as tracer:
                    # Bounded: code after an unbounded `tracer.all()` loop never runs in 0.8.
                    for _ in tracer.iter[:NEW]:
                        hidden(m.transformer.h[1].output, tup)[:, -1] = 0
                    out = tracer.result.save()  # 0.8's name for model.generator.output
                return out

        fns["nnsight"] = nn_gen

    # Check values: the same tokens from every approach with the edit.
    ref = raw()
    assert ref.shape[1] == PROMPT + NEW, ref.shape
    assert not torch.equal(ref, plain()), "the edit should change the generated tokens"
    for name in [n for n in fns if n not in ("plain", "raw")]:
        try:
            got = fns[name]()
            got = getattr(got, "value", got)
            if not torch.equal(got, ref):
                raise AssertionError(f"generated {got.tolist()} != raw hooks {ref.tolist()}")
        except Exception as e:  # noqa: BLE001
            if name == "fi":
                status["fi"] = f"not available: {type(e).__name__}: {str(e)[:300]}"
                del fns["fi"]
            else:
                raise
    return fns, status


def run(quick=False):
    fns, status = generate_fns()
    res = {"times": bench(fns, reps=3 if quick else 15, warmup=1, target_s=0.0), "status": status, "new_tokens": NEW}
    t = res["times"]
    for name, r in t.items():
        r["ratio_raw"] = r["median"] / t["raw"]["median"]
        r["per_step_over_raw"] = (r["median"] - t["raw"]["median"]) / NEW
    print("  generate: " + ", ".join(f"{k} {v['median']*1e3:.2f}ms ({v['ratio_raw']:.3f}x raw)" for k, v in t.items())
          + "".join(f"; {k}: {v}" for k, v in status.items()), flush=True)
    return res


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
