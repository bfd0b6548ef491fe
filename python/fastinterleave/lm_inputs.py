"""LanguageModel inputs checked: prompts and token ids that make a model input, and a
clear error (the invoke named, raised where it is entered) for what does not.

LanguageModel takes these methods from ``InputChecks``; nnsight 0.4.11 fails on the
same mistakes deep inside the model, or runs them (a 3-D tensor, floats cast to ids)."""

import numbers
import sys

import torch

# What an invoke of a LanguageModel takes (error messages).
_ACCEPTED = (
    "a prompt (str), a list of prompts, token ids (a list of ints, a list of such lists, or a "
    "1-D / 2-D integer tensor), or a dict / BatchEncoding with 'input_ids'"
)


class TokenIdError(ValueError, IndexError):
    """A token id outside the model's vocabulary (caught as ValueError or IndexError)."""


class InputChecks:
    """Tokenizing and checking the inputs of a LanguageModel's invokes (a mixin)."""

    def _tokenize(self, inputs, _in_vocab=True, **kwargs):
        """A BatchEncoding of prompts (``str``, ``list[str]``) or token ids (padded). Inputs
        that are none of those, or that make no tokens, raise here (at the invoke's line), and
        so do ids outside the vocabulary unless `_in_vocab` is false (labels: -100 is ignored)."""
        from transformers import BatchEncoding

        if isinstance(inputs, str):
            inputs = [inputs]
        elif isinstance(inputs, torch.Tensor):
            return self._encode_ids(inputs, _in_vocab)
        elif not isinstance(inputs, (list, tuple)):
            np = sys.modules.get("numpy")
            if np is not None and isinstance(inputs, np.ndarray):
                return self._encode_ids(torch.as_tensor(inputs), _in_vocab)
            raise self._input_error(TypeError, _wrong_type(inputs))
        if len(inputs) == 0:
            raise self._input_error(ValueError, f"got an empty list, which has no tokens: a LanguageModel takes {_ACCEPTED}")
        first = inputs[0]
        if isinstance(first, str):
            for i, prompt in enumerate(inputs):
                if not isinstance(prompt, str):
                    raise self._input_error(
                        TypeError, f"a list of prompts holds only strings; item {i} is {_describe(prompt)}"
                    )
            if self.tokenizer is None:
                raise ValueError(
                    "text inputs need a tokenizer: create the LanguageModel with `tokenizer=...` "
                    "(or pass token ids / a dict of input_ids)"
                )
            kwargs.setdefault("padding", True)
            encoding = self.tokenizer(list(inputs), return_tensors="pt", **kwargs)
            self._check_prompts(encoding, inputs, _in_vocab)
            return encoding
        if _is_int(first) or isinstance(first, numbers.Number):
            inputs = [inputs]  # one sequence (of ints, or a mistake: floats are refused below)
        # Sequences of token ids: padded like tokenizer.pad would (ids and mask only).
        many = len(inputs) > 1
        rows = [self._ids_row(ids, i, many) for i, ids in enumerate(inputs)]
        length = max(len(r) for r in rows)
        pad_id = self._pad_id()
        ids = torch.stack([self._pad_row(r, length, pad_id) for r in rows])
        if _in_vocab:
            self._check_range(ids)
        mask = torch.stack([self._pad_row(torch.ones_like(r), length, 0) for r in rows])
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})

    # -- checks of an invoke's input (clear errors at the user's line, before anything runs) -

    def _encode_ids(self, ids, in_vocab=True):
        """A BatchEncoding of a tensor of token ids (1-D: one row), checked."""
        from transformers import BatchEncoding

        ids = self._checked_ids(ids, in_vocab=in_vocab)
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def _checked_ids(self, ids, name="token ids", in_vocab=True):
        """`ids` as a 2-D long tensor, or a clear error: a tensor of another dimension or
        dtype (a float tensor is never cast to ids), no tokens, ids outside the vocabulary."""
        dim = ids.dim()
        if dim == 1:
            ids = ids.unsqueeze(0)
        elif dim != 2:
            raise self._input_error(
                ValueError,
                f"{name} must be a 1-D (length) or 2-D (batch, length) tensor; got shape {tuple(ids.shape)}"
                + (" (a single token id is [id])" if dim == 0 else ""),
            )
        if ids.numel() == 0:
            raise self._input_error(
                ValueError, f"got no tokens ({name} of shape {tuple(ids.shape)}): an input needs at least one token"
            )
        dtype = ids.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            kind = "bool" if dtype == torch.bool else "complex" if dtype.is_complex else "float"
            raise self._input_error(
                TypeError,
                f"{name} must be integers; got a {kind} tensor ({dtype}), which is not cast to token ids. "
                f"Pass `ids.long()` if its values are token ids, or a prompt (str) to tokenize",
            )
        if dtype != torch.long:
            ids = ids.long()
        if in_vocab:
            self._check_range(ids)
        return ids

    def _ids_row(self, ids, i, many):
        """Row `i` of a list of token-id sequences as a 1-D long tensor, or a clear error."""
        try:
            row = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise self._input_error(
                TypeError, f"token ids must be ints; row {i} is {_describe(ids)}, which is not a sequence of ints"
            ) from e
        if row.dim() == 2 and row.shape[0] == 1:
            row = row[0]
        if row.dim() != 1:
            raise self._input_error(
                ValueError if row.dim() else TypeError,
                f"token ids are a list of ints or a list of such lists; row {i} is {_describe(ids)}",
            )
        if row.numel() == 0:
            raise self._input_error(ValueError, f"row {i} of the token ids is empty: an input needs at least one token")
        dtype = row.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            kind = "bools" if dtype == torch.bool else "non-integer numbers"
            which = f"row {i} of the token ids holds" if many else "the token ids are"
            raise self._input_error(
                TypeError, f"token ids must be ints; {which} {kind} ({_describe(ids)}), which are not cast to token ids"
            )
        return row if dtype == torch.long else row.long()

    def _check_range(self, ids):
        """Every id indexes the input embedding (an id outside it fails deep inside the model,
        on CUDA with a device-side assert). One reduction of the ids."""
        if ids.is_meta or (type(ids) is not torch.Tensor and _is_fake(ids)):
            return
        size = self._vocab_size()
        if size is None:
            return
        low, high = torch.aminmax(ids)
        if ids.device.type == "cpu":
            low, high = int(low), int(high)
        else:
            low, high = torch.stack((low, high)).tolist()  # one synchronization
        if low >= 0 and high < size:
            return
        bad = ((ids < 0) | (ids >= size)).nonzero()[0].tolist()
        where = ", ".join(map(str, bad))
        raise self._input_error(
            TokenIdError,
            f"token id {int(ids[tuple(bad)])} at input_ids[{where}] is out of range: this model's vocabulary "
            f"has {size} ids (0 to {size - 1})",
        )

    def _vocab_size(self):
        """How many ids the input embedding takes (the config's vocab_size without one)."""
        get = getattr(self._model, "get_input_embeddings", None)
        if get is not None:
            try:
                size = getattr(get(), "num_embeddings", None)
            except (NotImplementedError, AttributeError):
                size = None
            if size is not None:
                return size
        return getattr(self.config, "vocab_size", None)

    def _check_prompts(self, encoding, prompts, in_vocab=True):
        """Every prompt makes at least one token, every token an id of the model."""
        ids = encoding["input_ids"]
        if ids.shape[-1] == 0:
            empty = list(range(len(prompts)))
        elif len(prompts) > 1 and "attention_mask" in encoding:
            counts = encoding["attention_mask"].sum(-1)
            empty = [] if bool(counts.all()) else (counts == 0).nonzero().flatten().tolist()
        else:
            empty = []
        if not empty:
            if in_vocab:
                self._check_range(ids)
            return
        if len(prompts) == 1:
            which = f"prompt {prompts[0]!r} has"
        else:
            more = ", ..." if len(empty) > 3 else ""
            numbers = ", ".join(map(str, empty[:3])) + more
            shown = ", ".join(repr(prompts[i]) for i in empty[:3]) + more
            which = f"prompt{'s' if len(empty) > 1 else ''} {numbers} of the list ({shown}) {'have' if len(empty) > 1 else 'has'}"
        raise self._input_error(
            ValueError, f"{which} no tokens (the tokenizer gives none): an input needs at least one token"
        )

    def _input_error(self, kind, message):
        """`kind(message)` naming the input it is about: the trace's own input or an invoke."""
        return kind(f"{self._input_name()}: {message}")

    def _input_name(self):
        """Which input is being prepared: the trace's own, the k-th invoke, or (outside a
        trace being recorded: ``trace=False``, a session's run) just the model's."""
        try:
            tracer = self._envoy._tracer  # the trace being recorded
            if tracer is None or getattr(tracer, "_invoker", None) is not None:
                return "LanguageModel input"
            index = len(tracer._invokers)  # of the invoke being entered
            call = "generate" if getattr(tracer, "_method", None) == "_generate" else "trace"
            if index == 0 and getattr(tracer, "_implicit", None) is not None:
                return f"the input of model.{call}(...)"
            return f"the {_ordinal(index + 1)} tracer.invoke(...) of model.{call}(...)"
        except Exception:  # naming the input never hides the error itself
            return "LanguageModel input"


def _is_int(x):
    return isinstance(x, numbers.Integral) or (isinstance(x, torch.Tensor) and x.dim() == 0)


def _describe(value):
    """A short description of a wrong value: its type and (short) repr."""
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _wrong_type(value):
    message = f"got {_describe(value)}, which is not an input of a LanguageModel: it takes {_ACCEPTED}"
    if _is_int(value) and not isinstance(value, bool):
        message += f" (a single token id goes in a list: [{int(value)}])"
    return message


def _ordinal(n):
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _is_fake(tensor):
    fake = getattr(getattr(torch, "_subclasses", None), "FakeTensor", None)
    return fake is not None and isinstance(tensor, fake)
