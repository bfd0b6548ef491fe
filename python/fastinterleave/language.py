"""LanguageModel: NNsight over a Hugging Face causal LM, with text inputs and generation.

``model = LanguageModel("path/or/id", tokenizer=...)`` as in nnsight 0.4:

- inputs per invoke: a prompt (``str``), prompts (``list[str]``), token ids (``list[int]``,
  ``list[list[int]]``, a 1-D or 2-D tensor), or a dict / ``BatchEncoding``; anything else
  (an ``int``, ``None``, a float / bool / 3-D tensor, floats, no input) raises a TypeError or
  ValueError naming the invoke when it is entered, and so does an input without tokens
  (``""``, ``["", ""]``, a ``(1, 0)`` tensor) — nnsight 0.4.11 fails on these deep inside the
  model (or runs a 3-D tensor); ids outside the input embedding raise a ``TokenIdError``
  (a ValueError and an IndexError) there too, before the model runs (one min/max of the ids);
- several invokes of different lengths are re-padded into one batch and each gives what it
  gives alone: every invoke keeps the attention mask of its own tokenization (nnsight 0.4.11
  rebuilds the mask of later invokes from already padded ids and so attends to their
  padding — fixed here), and when batching pads an invoke on the left, every invoke gets
  the ``position_ids`` of its solo run (nnsight 0.4.11 passes none, so GPT-2's absolute
  positions of a shorter invoke shift); ``generate`` numbers positions from the mask (HF);
- ``tracer.invoke(x, scan=True)``, ``model.scan(x)`` / ``scan=True`` / ``validate=True``,
  ``model.session(validate=..., scan=...)`` as in nnsight 0.4 (see scan.py); a scan of a
  model built from an id loads no weights;
- built from an id (or a local directory), the model is first made on the meta device
  from its config alone and its weights are loaded on first use (``dispatch=True``
  loads them at once);
- ``model.generate(..., max_new_tokens=N)`` is a trace of HF ``generate``;
  ``model.generator.output`` is the generated ids, ``model.generator.streamer.output``
  what HF's streamer receives (call 0: the prompt ids, call k: step k's new tokens).
"""

import inspect
import sys

import torch

from .lm_inputs import _ACCEPTED, InputChecks, TokenIdError, _describe  # noqa: F401  (TokenIdError: also here)
from .model import NNsight
from .tracer import Tracer

# Keys of a tokenizer's output that a model call takes and batching pads (in their order).
_ENCODING_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# Keywords of model.trace(...) / model.generate(...) that the tracer itself takes.
_TRACER_KEYS = ("scan", "validate", "remote", "backend")
# Keywords nnsight 0.4's tracer takes that change nothing here (errors always name the line;
# `blocking` is for remote runs): accepted and dropped, never passed to the model.
_IGNORED_KEYS = ("debug", "blocking")
# from_pretrained keywords that also apply to loading the config / making the meta model.
_CONFIG_KEYS = ("revision", "trust_remote_code", "cache_dir", "token", "local_files_only", "subfolder")
_META_KEYS = ("torch_dtype", "dtype", "attn_implementation", "trust_remote_code")


class _Passthrough(torch.nn.Module):
    """Returns its input (one argument: the argument itself), so hooks can see values."""

    def forward(self, *args, **kwargs):
        return args[0] if len(args) == 1 else args


class Streamer(_Passthrough):
    """HF generate's streamer: each ``put`` is a call of this module."""

    def put(self, *args):
        return self(*args)

    def end(self):
        pass


class Generator(_Passthrough):
    """Called once with the output of HF ``generate``; ``.streamer`` is called at every step."""

    def __init__(self):
        super().__init__()
        self.streamer = Streamer()


class LanguageTracer(Tracer):
    """A trace of a LanguageModel: keyword routing and the method it runs (forward or generate).

    Without positional inputs, ``input_ids=`` / ``attention_mask=`` / ``labels=``... make the
    implicit invoke and every other keyword goes to the model call, so
    ``model.generate(max_new_tokens=3)`` with explicit invokes works as in nnsight."""

    def __init__(self, model, *inputs, method=None, invoker_kwargs=None, **kwargs):
        tracer_kwargs = {k: kwargs.pop(k) for k in _TRACER_KEYS if k in kwargs}
        for key in _IGNORED_KEYS:
            kwargs.pop(key, None)
        invoker_kwargs = dict(invoker_kwargs or {})
        if not inputs and ("input_ids" in kwargs or "input_ids" in invoker_kwargs):
            for key in (*_ENCODING_KEYS, "labels"):
                if key in kwargs:
                    invoker_kwargs[key] = kwargs.pop(key)
        super().__init__(model, **tracer_kwargs)
        if inputs or invoker_kwargs:
            # invoker_kwargs: `scan=` for the invoke, the rest for _prepare_input (the tokenizer).
            self._implicit = self.invoke(*inputs, **invoker_kwargs)
        self._model_kwargs = kwargs
        self._method = method

    def _execute(self, keep_nodes=False):
        model = self._model
        before = model._running_method
        object.__setattr__(model, "_running_method", self._method)
        try:
            return super()._execute(keep_nodes)
        finally:
            object.__setattr__(model, "_running_method", before)


class LanguageModel(InputChecks, NNsight):
    """NNsight over a Hugging Face language model (``AutoModelForCausalLM`` by default).

    ``LanguageModel(hf_model, tokenizer=tok)`` wraps a loaded model;
    ``LanguageModel("dir_or_id", **from_pretrained_kwargs)`` loads config and tokenizer,
    builds the model on the meta device and loads the weights on first use (or at once
    with ``dispatch=True``)."""

    __methods__ = {"generate": "_generate"}

    Generator = Generator
    Streamer = Streamer

    def __init__(
        self,
        model_or_id,
        *args,
        tokenizer=None,
        config=None,
        automodel=None,
        dispatch=False,
        tokenizer_kwargs=None,
        rename=None,
        **kwargs,
    ):
        import transformers

        if automodel is None:
            automodel = transformers.AutoModelForCausalLM
        elif isinstance(automodel, str):
            automodel = getattr(transformers, automodel)
        own = {
            "automodel": automodel,
            "config": config,
            "tokenizer": tokenizer,
            "repo_id": None,
            "dispatched": True,
            "_hf_kwargs": kwargs,
            "_running_method": None,
            "_generator": Generator(),
        }
        for name, value in own.items():
            object.__setattr__(self, name, value)

        if isinstance(model_or_id, torch.nn.Module):
            model = model_or_id
            if self.config is None:
                object.__setattr__(self, "config", getattr(model, "config", None))
            # Like nnsight, no tokenizer is loaded for a given model: without `tokenizer=`,
            # inputs must be token ids or dicts (padded on the left with the config's pad id).
        else:
            repo_id = str(model_or_id)
            object.__setattr__(self, "repo_id", repo_id)
            self._load_config(repo_id)
            self._load_tokenizer(repo_id, **(tokenizer_kwargs or {}))
            if dispatch:
                model = self._load(repo_id)
            else:
                model = self._load_meta(repo_id)
                object.__setattr__(self, "dispatched", False)

        tok = self.tokenizer
        if tok is not None and getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
            tok.pad_token = tok.eos_token

        super().__init__(model, *args, rename=rename)
        # `model.generator` / `model.generator.streamer`: envoys of modules outside the HF model.
        root = self._envoy
        root._children["generator"] = type(root)(self._generator, "generator", root)

    # -- loading ---------------------------------------------------------------------------

    def _load_config(self, repo_id):
        if self.config is None:
            from transformers import AutoConfig

            kwargs = {k: v for k, v in self._hf_kwargs.items() if k in _CONFIG_KEYS}
            object.__setattr__(self, "config", AutoConfig.from_pretrained(repo_id, **kwargs))

    def _load_tokenizer(self, repo_id, **kwargs):
        """Loads the tokenizer of `repo_id`, left-padding (nnsight 0.4's default)."""
        if self.tokenizer is not None:
            return
        from transformers import AutoTokenizer

        kwargs.setdefault("padding_side", "left")
        for key in _CONFIG_KEYS:
            if key in self._hf_kwargs and key != "subfolder":
                kwargs.setdefault(key, self._hf_kwargs[key])
        tokenizer = AutoTokenizer.from_pretrained(repo_id, **kwargs)
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        object.__setattr__(self, "tokenizer", tokenizer)

    def _load_meta(self, repo_id):
        """The model made from its config on the meta device: no weights read or allocated."""
        kwargs = {k: v for k, v in self._hf_kwargs.items() if k in _META_KEYS}
        with torch.device("meta"):
            return self.automodel.from_config(self.config, **kwargs)

    def _load(self, repo_id):
        model = self.automodel.from_pretrained(repo_id, config=self.config, **self._hf_kwargs)
        return model.eval()

    def dispatch(self):
        """Loads the real weights (a no-op once loaded). Envoys, held ones included, then
        refer to the loaded modules."""
        if self.dispatched or _scanning():  # a scan runs on the meta model
            return
        model = self._load(self.repo_id)
        _rebind(self._envoy, model, skip=self._generator)
        self._envoy._hooks.remove()  # any hooks sit on the unloaded modules
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "dispatched", True)

    # -- tracing ---------------------------------------------------------------------------

    def trace(self, *inputs, trace=True, method=None, invoker_kwargs=None, **kwargs):
        """As ``NNsight.trace``; loads the weights first if they are not loaded yet."""
        self.dispatch()
        if method is not None and not callable(getattr(self, method, None)):
            raise ValueError(f"{type(self).__name__} has no method '{method}' to trace")
        if not trace:
            invoker_kwargs = dict(invoker_kwargs or {})
            invoker_kwargs.pop("scan", None)
            for key in _IGNORED_KEYS:
                kwargs.pop(key, None)
            if not inputs:
                for key in (*_ENCODING_KEYS, "labels"):
                    if key in kwargs:
                        invoker_kwargs[key] = kwargs.pop(key)
            if not inputs and not invoker_kwargs:
                raise ValueError("Can't execute on no inputs!")
            for key in _TRACER_KEYS:
                kwargs.pop(key, None)
            (args, kw), _ = self._prepare_input(*inputs, **invoker_kwargs)
            fn = getattr(self, method) if method is not None else self._forward
            return fn(*args, **{**kw, **kwargs})
        return LanguageTracer(self, *inputs, method=method, invoker_kwargs=invoker_kwargs, **kwargs)

    def scan(self, *inputs, **kwargs):
        """``with model.scan(prompt):`` records on fake tensors only (shapes while recording,
        nothing runs). The weights are not loaded: a model built from an id scans on the
        meta device."""
        method = kwargs.get("method")
        if method is not None and not callable(getattr(self, method, None)):
            raise ValueError(f"{type(self).__name__} has no method '{method}' to trace")
        kwargs.update(scan=True, validate=True)
        tracer = LanguageTracer(self, *inputs, **kwargs)
        tracer._run_model = False
        return tracer

    def generate(self, *inputs, **kwargs):
        """``with model.generate(prompt, max_new_tokens=N):`` traces HF ``generate``: module
        call k is generation step k; ``model.generator.output`` is all token ids after it."""
        return self.trace(*inputs, method="_generate", **kwargs)

    def __getattr__(self, name):
        if name == "_envoy":  # not set yet (inside __init__)
            raise AttributeError(name)
        if not name.startswith("_"):
            methods = type(self).__methods__
            if name in methods:
                method = methods[name]
                return lambda *args, **kwargs: self.trace(*args, method=method, **kwargs)
        return super().__getattr__(name)

    def _module_at(self, path):
        if path == "generator" or path.startswith("generator."):
            return self._generator.get_submodule(path[len("generator."):])
        self.dispatch()
        return super()._module_at(path)

    # -- inputs (nnsight 0.4's signatures) ---------------------------------------------------

    def _prepare_input(self, *inputs, input_ids=None, labels=None, **kwargs):
        """``((BatchEncoding,), {"labels": labels}), batch_size`` for one invoke's input."""
        from transformers import BatchEncoding

        given = {k: kwargs.pop(k) for k in _ENCODING_KEYS[1:] if k in kwargs}
        if input_ids is not None:
            if inputs:
                raise ValueError("pass the input either positionally or as input_ids=, not both")
            inputs = ({"input_ids": input_ids, **given},) if given else (input_ids,)
        elif given:
            raise ValueError(f"{', '.join(given)} given without input_ids")
        if len(inputs) != 1:
            if not inputs:
                raise self._input_error(TypeError, f"got no input; an invoke of a LanguageModel takes one: {_ACCEPTED}")
            raise self._input_error(
                TypeError,
                f"got {len(inputs)} inputs; an invoke of a LanguageModel takes one: {_ACCEPTED} "
                "(several prompts go in one list)",
            )
        (inputs,) = inputs
        if isinstance(inputs, dict):  # BatchEncoding is a UserDict, not a dict
            inputs = BatchEncoding(inputs)
        if isinstance(inputs, BatchEncoding):
            inputs = _as_tensors(inputs)
            ids = inputs["input_ids"]
            if not isinstance(ids, torch.Tensor):
                raise self._input_error(TypeError, f"'input_ids' must be token ids; got {_describe(ids)}")
            self._checked_ids(ids, "input_ids")  # (other integer widths stay as given)
        else:
            inputs = self._tokenize(inputs, **kwargs)
            if labels is not None and not isinstance(labels, torch.Tensor):
                labels = self._tokenize(labels, _in_vocab=False, **kwargs)["input_ids"]
        if isinstance(labels, torch.Tensor) and labels.dim() == 1:
            labels = labels.unsqueeze(0)
        return ((inputs,), {"labels": labels}), len(inputs["input_ids"])

    def _batch(self, batched_inputs, input, labels=None):
        """Adds one invoke to the batch: every tensor is padded (on the tokenizer's side) to
        the longest sequence, so each row keeps its own attention mask. Padding added on the
        left would shift an invoke's positions: then every invoke gets ``position_ids``, the
        ones of its solo run (its own, or 0, 1, ...), padded with 0 — each invoke gives what
        it gives alone (models whose forward takes no ``position_ids`` get none)."""
        from transformers import BatchEncoding

        if batched_inputs is None:
            return ((input,), {"labels": labels})
        (batched,), batched_kwargs = batched_inputs
        batched_labels = batched_kwargs.get("labels")
        length = max(batched["input_ids"].shape[1], input["input_ids"].shape[1])
        keys = list(batched.keys()) + [k for k in input.keys() if k not in batched]
        derived = getattr(batched, _DERIVED, "position_ids" not in batched) and "position_ids" not in input
        if (
            "position_ids" not in keys
            and self._padding_side == "left"
            and batched["input_ids"].shape[1] != input["input_ids"].shape[1]
            and self._takes_positions()
        ):
            keys.append("position_ids")
        data = {}
        for key in keys:
            a = self._fill(key, batched)
            b = self._fill(key, input).to(a.device)
            data[key] = torch.cat([self._pad(key, a, length), self._pad(key, b, length)])
        if batched_labels is not None or labels is not None:
            a = _ignore_all(batched_labels, batched["input_ids"])
            b = _ignore_all(labels, input["input_ids"]).to(a.device)
            label_length = max(length, a.shape[1], b.shape[1])
            batched_labels = torch.cat(
                [self._pad("labels", a, label_length), self._pad("labels", b, label_length)]
            )
        encoding = BatchEncoding(data)
        if derived and "position_ids" in data:
            setattr(encoding, _DERIVED, True)
        return ((encoding,), {"labels": batched_labels})

    def _takes_positions(self):
        """Whether the model's forward takes ``position_ids``."""
        forward = type(self._model).forward
        takes = _TAKES_POSITIONS.get(forward)
        if takes is None:
            try:
                takes = "position_ids" in inspect.signature(forward).parameters
            except (TypeError, ValueError):
                takes = False
            _TAKES_POSITIONS[forward] = takes
        return takes

    def _pad_id(self):
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.config, "pad_token_id", None)
        return 0 if pad is None else pad

    @property
    def _padding_side(self):
        return getattr(self.tokenizer, "padding_side", None) or "left"

    def _pad_row(self, row, length, value):
        fill = row.new_full((length - row.shape[-1],), value)
        if self._padding_side == "left":
            return torch.cat([fill, row])
        return torch.cat([row, fill])

    def _fill_value(self, key):
        if key == "input_ids":
            return self._pad_id()
        if key == "labels":
            return -100
        if key == "token_type_ids":
            return _pad_type_id(self.tokenizer)
        if key == "special_tokens_mask":
            return 1
        return 0

    def _fill(self, key, encoding):
        """`encoding[key]`, or what its absence means when other invokes have the key."""
        value = encoding.get(key)
        ids = encoding["input_ids"]
        if value is None:
            if key == "attention_mask":
                return torch.ones_like(ids)
            if key == "token_type_ids":
                return torch.full_like(ids, _pad_type_id(self.tokenizer))
            if key == "position_ids":  # what a model numbers them when run on them alone
                return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            raise ValueError(f"cannot batch these invokes: '{key}' is given for some of them but not all")
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[0] != ids.shape[0]:
            raise ValueError(f"cannot batch '{key}' across invokes: expected a (batch, length) tensor")
        return value

    def _pad(self, key, value, length):
        missing = length - value.shape[1]
        if missing <= 0:
            return value
        fill = value.new_full((value.shape[0], missing, *value.shape[2:]), self._fill_value(key))
        if self._padding_side == "left":
            return torch.cat([fill, value], dim=1)
        return torch.cat([value, fill], dim=1)

    # -- running ---------------------------------------------------------------------------

    @property
    def device(self):
        device = getattr(self._model, "device", None)
        if device is None:
            param = next(self._model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        return device

    def _execute(self, *args, **kwargs):
        method = self._running_method
        if method is not None:
            return getattr(self, method)(*args, **kwargs)
        return self._forward(*args, **kwargs)

    def _forward(self, inputs, **kwargs):
        """The model call: ``self._model(**inputs, **kwargs)`` (``labels`` included)."""
        self.dispatch()
        inputs = inputs.to(self.device)
        if getattr(inputs, _DERIVED, False) and any(kwargs.get(k) is not None for k in _CONTINUING_KEYS):
            # A cache continues earlier positions: the model counts them (from the cache).
            inputs = _without_positions(inputs)
        return self._model(**inputs, **kwargs)

    def _generate(self, inputs, max_new_tokens=1, streamer=None, **kwargs):
        """HF ``generate``; then ``self.generator(output)`` so ``model.generator.output`` is it."""
        self.dispatch()
        if kwargs.get("labels", 0) is None:
            del kwargs["labels"]
        if streamer is None and _num_beams(self._model, kwargs) == 1:
            streamer = self._generator.streamer  # HF refuses a streamer with beam search
        if "pad_token_id" not in kwargs and getattr(self._model.generation_config, "pad_token_id", None) is None:
            pad = getattr(self.tokenizer, "pad_token_id", None)
            if pad is not None:
                kwargs["pad_token_id"] = pad  # else HF warns and pads with eos
        inputs = inputs.to(self.device)
        if getattr(inputs, _DERIVED, False):
            # HF generate numbers every row from its first token (from the attention mask),
            # which is what each invoke gets generating alone; it would not extend given ones.
            inputs = _without_positions(inputs)
        if _scanning():
            return self._scan_generate(inputs, kwargs, streamer, max_new_tokens)
        output = self._model.generate(**inputs, **kwargs, streamer=streamer, max_new_tokens=max_new_tokens)
        self._generator(output)
        return output

    def _scan_generate(self, inputs, kwargs, streamer, max_new_tokens):
        """HF ``generate`` on fake tensors. Whether a step ends generation depends on data,
        which fake tensors do not have (a fake tensor is true: HF stops after the first new
        token), so the calls of that step are known and the output's length is not:
        ``model.generator`` is not called, its ``.output.shape`` stays unknown while recording."""
        from transformers.utils import logging

        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # HF's warnings about fake special tokens
        try:
            return self._model.generate(**inputs, **kwargs, streamer=streamer, max_new_tokens=max_new_tokens)
        finally:
            logging.set_verbosity(verbosity)


# Model-call keywords that continue an earlier sequence: its positions are the model's to count.
_CONTINUING_KEYS = ("past_key_values", "cache", "cache_position")
_TAKES_POSITIONS = {}  # a forward function -> whether it takes position_ids
# Set on a batched BatchEncoding whose position_ids LanguageModel made (none were given).
_DERIVED = "_fastinterleave_derived_positions"


def _without_positions(inputs):
    from transformers import BatchEncoding

    return BatchEncoding({k: v for k, v in inputs.items() if k != "position_ids"})


def _scanning():
    """Whether a scan's fake run is in progress (scan.py is imported by the first scan)."""
    scan = sys.modules.get(__package__ + ".scan")
    return scan is not None and scan.running()


def _pad_type_id(tokenizer):
    return getattr(tokenizer, "pad_token_type_id", 0) if tokenizer is not None else 0


def _as_tensors(encoding):
    """Lists become tensors and 1-D tensors one row, so invokes batch (a copy if anything changes)."""
    from transformers import BatchEncoding

    changed = {}
    for key, value in encoding.items():
        if key not in (*_ENCODING_KEYS, "labels"):
            continue
        new = torch.as_tensor(value) if isinstance(value, (list, tuple)) else value
        if isinstance(new, torch.Tensor) and new.dim() == 1:
            new = new.unsqueeze(0)
        if new is not value:
            changed[key] = new
    if "input_ids" not in encoding:
        raise ValueError("a dict / BatchEncoding input needs 'input_ids'")
    if not changed:
        return encoding
    return BatchEncoding({**encoding, **changed})


def _ignore_all(labels, ids):
    """Labels of an invoke without labels: every position ignored (-100)."""
    if labels is None:
        return torch.full_like(ids, -100)
    return labels


def _num_beams(model, kwargs):
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)


def _rebind(envoy, module, skip):
    """Points `envoy` and its children at `module` and its submodules (same structure)."""
    object.__setattr__(envoy, "_module", module)
    for name, child in envoy._children.items():
        if child._module is skip:
            continue
        sub = module._modules.get(name)
        if sub is None:
            raise RuntimeError(f"the loaded model has no submodule '{child._path}' (the meta model had one)")
        _rebind(child, sub, skip)
