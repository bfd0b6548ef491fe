"""Loads the C++ extension, refusing one built for another torch."""

import importlib

import torch


def load_extension():
    try:
        C = importlib.import_module("fastinterleave._C")
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "fastinterleave's C++ extension could not be loaded "
            f"({e}). Rebuild it against the installed torch ({torch.__version__}) with:\n"
            "    pip install --no-build-isolation -e ."
        ) from e
    built = C.TORCH_VERSION
    if built != torch.__version__:
        raise ImportError(
            f"fastinterleave was built against torch {built}, but torch {torch.__version__} is installed. "
            "Rebuild it with:\n    pip install --no-build-isolation -e ."
        )
    return C
