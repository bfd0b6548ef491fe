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
