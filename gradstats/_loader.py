"""Loads the compiled library after checking that it was built for the torch installed now."""
import importlib

import torch


def load_library():
    try:
        from . import _build_config
    except ImportError as e:
        raise ImportError(
            "gradstats is not built: install it with `pip install --no-build-isolation .` "
            "(or build in place with `python setup.py build_ext --inplace`)"
        ) from e
    built, now = _build_config.TORCH_VERSION, torch.__version__
    if built != now:
        raise ImportError(
            f"gradstats was built against torch {built} but torch {now} is installed; "
            "rebuild it against this torch: "
            "pip install --no-build-isolation --no-deps --force-reinstall gradstats"
        )
    return importlib.import_module("gradstats._C")
