"""Common mistakes get a clear error naming what is wrong (and the user's line), and
the model works normally afterwards. References: the plain module's own output."""

import os
import runpy

import pytest
import torch
from torch.testing import assert_close

import fastinterleave as nnsight
from fastinterleave import InterventionError

from conftest import make_tiny


@pytest.fixture
def net():
    return make_tiny()


def assert_works(model, net):
    """A normal trace right after the error: correct values, nothing left open."""
    x = torch.rand(2, 5)
    with model.trace(x):
        h = model.layer1.output.save()
        out = model.output.save()
    with torch.no_grad():
        assert_close(h, net.layer1(x))
        assert_close(out, net(x))
        assert_close(net(x), net.layer2(net.layer1(x)))


def test_an_error_quotes_the_script_as_it_is_now(tmp_path):
    """A script edited and run again in the same process (a notebook's %run): the
    error quotes its current line, not the one cached from the first run."""
    script = tmp_path / "edited.py"
    body = (
        "import torch, fastinterleave as nnsight\n"
        "from collections import OrderedDict\n"
        "net = torch.nn.Sequential(OrderedDict(layer1=torch.nn.Linear(5, 10), layer2=torch.nn.Linear(10, 2)))\n"
        "model = nnsight.NNsight(net)\n"
        "with model.trace(torch.rand(1, 5)):\n"
        "    a = model.layer1.output\n"
        "    b = model.layer2.output.save()\n"
        "    {edit}\n"
    )
    for edit in ("a[:, 3] = 0  # first version", "a[:, 4] = 1  # second version"):
        script.write_text(body.format(edit=edit))
        stat = script.stat()
        os.utime(script, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
        with pytest.raises(InterventionError) as info:
            runpy.run_path(str(script))
        assert edit in str(info.value)


@pytest.mark.parametrize("spec", [
    lambda m: m.layer1.iter[2**32 + 1],      # wrapped to call 1 in 32 bits, silently
    lambda m: m.layer1.iter[2**31 - 1],
    lambda m: m.layer1.iter[0:2**40],        # a raw "Unable to cast"
    lambda m: m.layer1.iter[[0, 2**33]],
    lambda m: m.layer1.next(2**40),
])
def test_call_indices_past_32_bits_are_refused(net, spec):
    model = nnsight.NNsight(net)
    with pytest.raises(InterventionError, match="too large"):
        with model.trace(torch.rand(1, 5)):
            spec(model).output.save()
    assert_works(model, net)


def test_a_typo_in_a_swap_is_an_attribute_error_naming_the_valid_names(net):
    model = nnsight.NNsight(net)
    with pytest.raises(AttributeError, match=r"'ouptut'.*Did you mean 'output'\?.*weight") as info:
        with model.trace(torch.rand(1, 5)):
            model.layer1.ouptut = model.layer1.output * 2
    assert "bias" in str(info.value)
    assert not hasattr(net.layer1, "ouptut")  # the user's module is untouched
    assert_works(model, net)


def test_setting_an_existing_attribute_or_a_module_inside_a_trace_still_works(net):
    model = nnsight.NNsight(net)
    with model.trace(torch.rand(1, 5)):
        model.layer1.training = False
        model.layer1.extra = torch.nn.Identity()
        model.output.save()
    assert isinstance(net.layer1.extra, torch.nn.Identity)
    assert_works(model, net)
