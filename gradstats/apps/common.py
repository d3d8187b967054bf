"""What the commands share and the command line needs without importing them: the usage and
configuration errors, argparse value types, optional-dependency checks, number formatting and
strict JSON output. Imports nothing heavy (no torch)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import textwrap
from collections.abc import Callable
from typing import Any

__all__ = ["UsageError", "ConfigError", "MissingDependency", "DEMO_EXTRA", "PLOT_EXTRA",
           "positive_int", "positive_float", "unit_interval", "require", "num", "sig", "interval",
           "ratio", "wrap", "finite", "write_json"]

DEMO_EXTRA = "pip install 'gradstats[demo]'"
PLOT_EXTRA = "pip install 'gradstats[plot]'"


class UsageError(ValueError):
    """Bad command-line input found after parsing; reported like an argparse error (status 2)."""


class ConfigError(ValueError):
    """A configuration field out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


class MissingDependency(ImportError):
    """An optional dependency of a command is not installed."""


def require(module: str, purpose: str, hint: str) -> None:
    """Raises :class:`MissingDependency` (``purpose needs module: hint``) unless ``module`` can
    be imported; imports nothing, so it is cheap to call before any work starts."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependency(f"{purpose} needs {module}: {hint}")


def _argtype(name: str, convert: Callable[[str], Any], ok: Callable[[Any], bool],
             what: str) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)``, refused with "must be ``what``" unless ``ok``."""

    def parse(text: str) -> Any:
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    parse.__name__ = parse.__qualname__ = name
    return parse


#: argparse types: an integer >= 1; a finite real > 0; a real in [0, 1)
positive_int = _argtype("positive_int", int, lambda v: v >= 1, "a positive integer")
positive_float = _argtype("positive_float", float, lambda v: 0.0 < v < math.inf,
                          "a positive finite number")
unit_interval = _argtype("unit_interval", float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def num(x: float | None, digits: int = 4) -> str:
    """``x`` to ``digits`` significant figures, ``n/a`` for None or non-finite."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}"


def sig(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures without exponent notation (1140, not
    1.14e+03), ``n/a`` for None or non-finite."""
    if x is None or not math.isfinite(x):
        return "n/a"
    r = float(f"{x:.{digits}g}")
    return f"{r:.0f}" if abs(r) >= 10 ** (digits - 1) else f"{r:g}"


def interval(lo: float | None, hi: float | None, digits: int = 4) -> str:
    """``[lo, hi]`` of a positive quantity; ``n/a`` when either end is missing or non-finite,
    and ``not resolved (lower end <= 0)`` rather than a negative lower end."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    if lo <= 0:
        return "not resolved (lower end <= 0)"
    return f"[{num(lo, digits)}, {num(hi, digits)}]"


def wrap(text: str, first: str, rest: str, width: int = 96) -> list[str]:
    """``text`` as lines of at most ``width`` characters, the first indented by ``first``, the
    others by ``rest``."""
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest,
                         break_on_hyphens=False)


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (in nested dicts, lists, tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(obj: dict[str, Any], path: str) -> None:
    """Strict JSON (non-finite floats become null)."""
    with open(path, "w") as fh:
        json.dump(finite(obj), fh, indent=1, allow_nan=False)
        fh.write("\n")


def ratio(a: float | None, b: float | None) -> float:
    """``a / b``, nan when either is missing or non-finite or ``b == 0``."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.nan
    return a / b
