"""Values after the trace, as nnsight 0.4.11 users read them.

- An unset value (never saved, or skipped by stop()) raises nnsight's
  ``ValueError("Accessing value before it's been set.")``, from ``.value`` and from
  ``print(p)`` / ``repr(p)`` (nnsight 0.4.11 raises the same there), followed by our
  detail naming the line.
- Saved proxies held in containers (where frame injection does not reach) act as their
  values: ``int(p)``, ``float(p)``, ``p.__index__()``, formatting, comparisons, ``bool``,
  ``len``, iteration, ``in``, copies and pickles (``torch.save`` of a dict of them).
  nnsight 0.4.11 returns its proxies there too; of these it supports ``int`` of an integer
  value, ``__index__``, comparisons, ``len`` and ``torch.save``, and fails on
  formatting, ``float``, ``bool``, iteration and ``pickle`` / ``copy`` (a
  RecursionError). While recording, copying or pickling a proxy stays a TypeError
  (tests/test_errors.py).
- ``session.stop()`` outside any loop ends the session normally (nnsight 0.4.11: the
  steps after it do not run, the values saved before are kept); inside a loop it leaves
  the loop.

References: plain torch values.
"""

import copy
import io
import pickle

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(1, 5)


UNSET = "Accessing value before it's been set."


def test_an_unsaved_value_raises_nnsights_error_with_our_detail(model, x):
    with model.trace(x):
        unsaved = model.layer1.output * 2
    with pytest.raises(ValueError) as info:
        unsaved.value
    message = str(info.value)
    assert message.startswith(UNSET)
    assert "not saved" in message and "unsaved = model.layer1.output * 2" in message
    for show in (print, repr, str):
        with pytest.raises(ValueError, match=UNSET):
            show(unsaved)


def test_a_value_skipped_by_stop_raises_nnsights_error(net, model, x):
    with model.trace(x) as tracer:
        a = model.layer1.output.save()
        tracer.stop()
        b = model.layer2.output.save()
    assert_close(a, net.layer1(x))
    with pytest.raises(ValueError, match=UNSET) as info:
        print(b)
    assert "never set" in str(info.value)


def test_while_recording_the_value_is_not_there_yet(model, x):
    with model.trace(x):
        h = model.layer1.output
        with pytest.raises(ValueError, match=UNSET):
            h.value
        assert "recording" in repr(h)


@pytest.fixture
def cache(net, model, x):
    net.requires_grad_(False)  # (float() of a tensor that requires grad warns)
    cache = {}
    with model.trace(x):
        h = model.layer1.output
        cache["sum"] = h.sum().save()
        cache["argmax"] = h.argmax().save()
        cache["count"] = nnsight.int(3).save()
        cache["hidden"] = h.save()
        cache["names"] = nnsight.list(["a", "b"]).save()
    return cache


@pytest.mark.python_fallback  # nnsight.int / nnsight.list
def test_saved_proxies_in_a_dict_act_as_their_values(net, x, cache):
    ref = net.layer1(x)
    s, i, n, h, names = (cache[k] for k in ("sum", "argmax", "count", "hidden", "names"))
    assert isinstance(s, nnsight.Proxy)  # held in a dict: not replaced by the frame injection
    assert int(n) == 3 and int(s) == int(ref.sum())
    assert float(s) == pytest.approx(ref.sum().item())
    items = list(range(10))
    assert items[i] == ref.argmax().item() and i.__index__() == ref.argmax().item()
    assert list(range(n)) == [0, 1, 2]
    assert f"{s:.3f}" == f"{ref.sum().item():.3f}" and f"{n:03d}" == "003"
    assert str(s) == str(ref.sum()) and repr(h) == repr(ref)
    assert bool(n == 3) and (s < 1e6) and not (s > 1e6)
    assert bool(n) and n
    assert len(h) == 1 and len(names) == 2
    assert list(names) == ["a", "b"] and "b" in names
    assert_close(next(iter(h)), ref[0])
    assert_close(torch.as_tensor(h.detach().numpy()), ref)


@pytest.mark.python_fallback  # nnsight.int / nnsight.list
def test_copies_and_pickles_after_the_trace_are_of_the_value(net, x, cache):
    ref = net.layer1(x)
    h = cache["hidden"]
    assert_close(copy.copy(cache["sum"]), ref.sum())
    assert copy.deepcopy(cache["names"]) == ["a", "b"]
    assert copy.deepcopy(cache["names"]) is not cache["names"].value
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = pickle.loads(pickle.dumps(cache["count"], protocol))
        assert loaded == 3 and type(loaded) is int
        assert pickle.loads(pickle.dumps(cache["names"], protocol)) == ["a", "b"]
    buffer = io.BytesIO()
    torch.save(cache, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    assert set(back) == set(cache)
    assert_close(back["hidden"], ref.detach())
    assert type(back["hidden"]) is torch.Tensor and back["names"] == ["a", "b"]
    # The plain weights-only loader reads it too: nothing of fastinterleave is in the file.
    buffer.seek(0)
    plain = {k: v for k, v in cache.items() if k in ("hidden", "sum")}
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    buffer.seek(0)
    assert_close(torch.load(buffer, weights_only=True)["hidden"], ref.detach())
    assert_close(h.clone(), ref)  # an operation after the trace is on the value


def test_session_stop_outside_a_loop_ends_the_session(net, model, x):
    with model.session() as session:
        with model.trace(x):
            first = model.layer1.output.sum().save()
        session.stop()
        with model.trace(x):
            second = model.layer2.output.sum().save()
    assert_close(first, net.layer1(x).sum())
    with pytest.raises(ValueError, match=UNSET):
        second.value


@pytest.mark.python_fallback  # nnsight.list
def test_session_stop_inside_a_loop_leaves_the_loop(model):
    with model.session() as session:
        seen = nnsight.list().save()
        with session.iter([1, 2, 3]) as item:
            seen.append(item)
            session.stop()
        seen.append(10)
    assert seen == [1, 10]


@pytest.mark.python_fallback  # nnsight.list
def test_session_stop_in_a_branch_of_a_loop(model):
    with model.session() as session:
        seen = nnsight.list().save()
        with session.iter([1, 2, 3, 4]) as item:
            seen.append(item)
            with session.cond(item == 2):
                session.stop()
        seen.append(10)
    assert seen == [1, 2, 10]
