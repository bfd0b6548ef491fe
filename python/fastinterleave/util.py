"""Small helpers nnsight 0.4 code imports from ``nnsight.util``."""

import torch


class WrapperModule(torch.nn.Module):
    """A module that returns what it is given (its only argument, or the tuple of
    them): attached to a model and called inside a trace, its ``.output`` /
    ``.input`` expose a value (``envoy(x, hook=True)``)."""

    def forward(self, *args, **kwargs):
        return args[0] if len(args) == 1 else args
