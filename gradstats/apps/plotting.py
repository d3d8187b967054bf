"""Plotting shared by the commands: one style (colours, sizes, log axes where values span
decades, units on every axis) and the pieces the figures are made of. matplotlib is imported
inside the functions only, through its object API (no pyplot state, no display needed)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .common import require

__all__ = ["COLORS", "DPI", "B_SIMPLE_LABEL", "require_matplotlib", "new_figure",
           "positive", "log_limits", "log_axis", "log_if_decades", "noise_scale_panel",
           "steps_axis", "save"]

COLORS = {"b_simple": "tab:blue", "per_step": "tab:gray", "batch": "tab:orange",
          "loss": "tab:red", "runs": "tab:red", "lr": "tab:green", "fit": "tab:green",
          "predicted": "tab:purple"}
DPI = 120
B_SIMPLE_LABEL = "B_simple = tr(Sigma)/|G|^2 (examples)"


def require_matplotlib(purpose: str, hint: str) -> None:
    """Raises :class:`~gradstats.apps.common.MissingDependency` naming ``hint`` unless
    matplotlib is installed; call it before any work that ends in a plot."""
    require("matplotlib", purpose, hint)


def new_figure(nrows: int, ncols: int, figsize: tuple[float, float], **subplots: Any
               ) -> tuple[Any, Any]:
    """A figure on the Agg canvas (no display) and its axes, laid out without overlaps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **subplots)


def positive(v: Any) -> bool:
    """True for a finite number > 0 (None and non-finite values are not)."""
    return v is not None and math.isfinite(v) and v > 0


def log_limits(values: Sequence[float | None], pad: float = 2.0) -> tuple[float, float] | None:
    """Log-axis limits a factor ``pad`` beyond the positive finite ``values`` (None if none)."""
    v = [x for x in values if positive(x)]
    return (min(v) / pad, max(v) * pad) if v else None


def log_axis(ax: Any, axis: str = "y") -> None:
    """Log scale on ``axis`` with plain tick labels (20, 50, 100 rather than 2 x 10^1) at 1, 2
    and 5 times powers of ten; over more than three decades only the powers are labelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target = ax.yaxis if axis == "y" else ax.xaxis

    def label(v: float, _: int) -> str:
        lo, hi = sorted(target.get_view_interval())
        power = v > 0 and abs(math.log10(v) - round(math.log10(v))) < 1e-9
        return f"{v:g}" if power or (lo > 0 and hi / lo <= 1e3) else ""

    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(label))
    target.set_minor_formatter(NullFormatter())


def log_if_decades(ax: Any, values: Sequence[float | None], axis: str = "y") -> bool:
    """:func:`log_axis` when the values are positive and span a factor 10 or more."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if v and min(v) > 0 and max(v) / min(v) >= 10:
        log_axis(ax, axis)
        return True
    return False


def noise_scale_panel(ax: Any, x: Sequence[float], ema: Sequence[float | None],
                      lo: Sequence[float | None], hi: Sequence[float | None], *,
                      per_step: Sequence[float | None] | None = None,
                      extra: Sequence[float | None] = ()) -> tuple[float, float] | None:
    """Smoothed ``B_simple`` (line) with its interval (band) and, when given, the per-step
    values (grey points), on a log axis whose limits cover the line, the middle 90% of the
    points and ``extra`` (so a few huge per-step values do not squash the rest); the band is
    clipped to the limits. Returns the limits (None when nothing is positive)."""
    pts = [(a, b) for a, b in zip(x, per_step or ()) if positive(b)]
    line = [(a, b) for a, b in zip(x, ema) if positive(b)]
    seen = sorted(b for _, b in pts)
    ends = [b for _, b in line] + [v for v in extra if positive(v)]
    if seen:
        ends += [seen[len(seen) // 20], seen[-1 - len(seen) // 20]]
    lim = log_limits(ends)
    if lim is None:
        return None
    if pts:
        ax.scatter(*zip(*pts), s=3, alpha=0.25, color=COLORS["per_step"], label="per step")
    band = [(a, max(l, lim[0]), min(h, lim[1])) for a, l, h in zip(x, lo, hi)
            if l is not None and h is not None and math.isfinite(l) and math.isfinite(h)]
    if band:
        xs, ls, hs = zip(*band)
        ax.fill_between(xs, ls, hs, color=COLORS["b_simple"], alpha=0.2,
                        label="95% interval (smoothed)")
    if line:
        ax.plot(*zip(*line), color=COLORS["b_simple"], label="smoothed (EMA)")
    log_axis(ax)
    ax.set_ylim(*lim)
    ax.set_ylabel(B_SIMPLE_LABEL)
    return lim


def steps_axis(ax: Any, examples: Sequence[float], steps: Sequence[float]) -> None:
    """A second x axis on top of ``ax`` (whose x is examples seen) labelled in steps, mapped
    through the run's (examples, steps) pairs, so a changing batch size is read correctly."""
    import numpy as np

    e = np.concatenate([[0.0], np.asarray(examples, dtype=float)])
    s = np.concatenate([[0.0], np.asarray(steps, dtype=float)])
    if e.size < 3 or np.any(np.diff(e) <= 0) or np.any(np.diff(s) <= 0):
        return
    # continue the last segment far out: tick positions may lie past the data
    far = 1e6 * max(1.0, s[-1])
    e = np.append(e, e[-1] + far * (e[-1] - e[-2]) / (s[-1] - s[-2]))
    s = np.append(s, s[-1] + far)
    top = ax.secondary_xaxis("top", functions=(lambda v: np.interp(v, e, s),
                                               lambda v: np.interp(v, s, e)))
    top.set_xlabel("steps")


def save(fig: Any, path: str) -> None:
    """Writes the figure (format from the suffix, PNG resolution :data:`DPI`)."""
    fig.savefig(path, dpi=DPI)
