"""Loads the compiled library after checking that it was built for the torch installed now."""
from __future__ import annotations

import importlib
import os
from types import ModuleType

def load_library() -> ModuleType:
    """``gradstats._C`` (which registers the ``torch.ops.gradstats`` operators), checked against
    the installed torch first."""
    import torch

    try:
        from . import _build_config
    except ImportError as e:
        here = os.path.dirname(os.path.abspath(__file__))
        source = os.path.exists(os.path.join(os.path.dirname(here), "setup.py"))
        hint = (" You are importing the source tree at " + os.path.dirname(here) + ", which "
                "shadows an installed gradstats: run from another directory, or build here with "
                "`pip install --no-build-isolation -e .`" if source else "")
        raise ImportError(
            "gradstats is not built: install it with `pip install --no-build-isolation .` "
            "(or build in place with `python setup.py build_ext --inplace`)." + hint) from e
    built, now = _build_config.TORCH_VERSION, torch.__version__
    if built != now:
        raise ImportError(
            f"gradstats was built against torch {built} but torch {now} is installed; "
            "rebuild it against this torch: from the gradstats source directory, "
            "pip install --no-build-isolation --no-deps --force-reinstall .")
    return importlib.import_module("gradstats._C")


def build_info() -> dict:
    """The gradstats version, the torch it was built against, and whether (and for which GPU
    architectures) CUDA kernels were compiled."""
    return dict(load_library().build_info())
