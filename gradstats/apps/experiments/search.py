"""The batch-size sweep shared by the experiments: at each batch size the learning rate that
reaches the target in the fewest steps, the steps and examples it took, and the critical-batch
fit over the runs. E1 reads the fit, E2 and the Adam experiment the best learning rates, E3 the
fitted frontier, so each sweep is run once and kept (:func:`get_sweep`).

Search at batch size ``B`` (sizes in increasing order): a log grid of ``lr_factor`` spacing
centred at ``lr_center`` for the first size and, for the next, at the previous size's best
learning rate moved by the rule of thumb ``lr_ratio(rule, B, B_prev)`` (``"sgd-optimal"`` with
``B_noise = b_guess`` for SGD, ``"adam-optimal"`` with ``kappa^2 = b_guess`` for Adam). Grid
points are tried centre first, then alternately above and below; while the best is at an end the
grid is extended that way (up to ``max_extend`` points). Each learning rate is trained with every
seed (initialisation and data order; the same for every ``B`` and learning rate); the one with
the fewest steps summed over the seeds wins. A candidate is stopped once its summed steps pass
``slack`` times the best total so far (it cannot win; with ``slack > 1`` the neighbours of the
best usually finish, which the parabola needs), or when it blows up.

The best learning rate *of the run* is then refined by a parabola in ``u = log(lr)`` through
``log(total steps)`` at the best grid point and its two neighbours (when both reached the target
and the parabola opens upward), its vertex clipped to the neighbours: ``u* = u_0 + h (y_- -
y_+) / (2 (y_- - 2 y_0 + y_+))``.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ...critical import fit_critical_batch
from ...scaling import lr_ratio
from ..common import ConfigError, write_json
from ..sweep import _fit_dict, _num_threads
from .runner import Optim, train
from .tasks import TaskConfig, make_task

__all__ = [
    "SweepError",
    "SweepSpec",
    "Trial",
    "get_sweep",
    "parabola_vertex",
    "run_sweep",
    "sweep_key",
]

Log = Callable[[str], None]


class SweepError(RuntimeError):
    """No learning rate reached the target at some batch size, or the runs show no trade-off."""


@dataclass(frozen=True)
class SweepSpec:
    """One sweep: the task, the optimizer, the batch sizes (examples; sequences for text), the
    target, the seeds and the search (module docstring)."""

    task: TaskConfig
    optim: Optim
    batch_sizes: tuple[int, ...]
    target: float
    seeds: tuple[int, ...] = (0, 1)
    lr_center: float = 1.0
    b_guess: float = 100.0
    lr_factor: float = 2.0 ** 0.25
    lr_candidates: int = 3
    max_extend: int = 6
    max_steps: int = 5000
    slack: float = 1.5
    n_boot: int = 2000
    threads: int = 1

    def check(self) -> None:
        b = self.batch_sizes
        if len(b) < 2 or len(set(b)) != len(b) or min(b) < 2:
            raise ConfigError("batch_sizes", f"must be >= 2 distinct sizes >= 2, got {list(b)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", f"must be distinct and not empty, got {self.seeds}")
        if not (self.lr_factor > 1 and self.slack >= 1 and self.target > 0):
            raise ConfigError("lr_factor", "lr_factor must be > 1, slack >= 1, target > 0")
        self.task.check()

    @property
    def rule(self) -> str:
        return "sgd-optimal" if self.optim.name == "sgd" else "adam-optimal"

    def move(self, lr: float, b_from: int, b_to: int) -> float:
        """The rule-of-thumb learning rate at ``b_to`` given one at ``b_from``."""
        kw = {"b_noise": self.b_guess} if self.rule == "sgd-optimal" else \
            {"kappa2": self.b_guess}
        return lr * lr_ratio(self.rule, b_to, b_from, **kw)


def sweep_key(spec: SweepSpec) -> str:
    """A short digest of everything the sweep's result depends on (threads excluded)."""
    d = asdict(replace(spec, threads=1, n_boot=0))
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Trial:
    """One learning rate at one batch size over the seeds; ``status`` as in
    :class:`gradstats.apps.sweep.Trial`."""

    batch_size: int
    lr: float
    grid_index: int
    status: str
    steps: list[int] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.steps)


def parabola_vertex(u: tuple[float, float, float], y: tuple[float, float, float]
                    ) -> float | None:
    """Vertex of the parabola through ``(u_i, y_i)`` at equally spaced ``u``, clipped to
    ``[u_0, u_2]``; None when it does not open upward."""
    h = u[1] - u[0]
    curv = y[0] - 2.0 * y[1] + y[2]
    if not curv > 0:
        return None
    v = u[1] + h * (y[0] - y[2]) / (2.0 * curv)
    return min(max(v, u[0]), u[2])


def _search(spec: SweepSpec, task, b: int, center: float, log: Log | None
            ) -> tuple[Trial, list[Trial], float | None]:
    n = spec.lr_candidates
    trials: dict[int, Trial] = {}
    best: list[Trial | None] = [None]

    def attempt(k: int) -> None:
        lr = center * spec.lr_factor ** k
        t = Trial(b, lr, k, "reached")
        for seed in spec.seeds:
            bound = None if best[0] is None else math.floor(spec.slack * best[0].total) - t.total
            limit = spec.max_steps if bound is None else min(spec.max_steps, bound)
            if limit < 1:
                t.status = "stopped"
                break
            r = train(task, spec.optim, lr, spec.target, seed=seed, batch_size=b, limit=limit)
            t.steps.append(r.steps)
            t.examples.append(r.examples)
            t.wall_s += r.wall_s
            if not r.reached:
                t.status = r.status if r.status == "diverged" else (
                    "cap" if limit == spec.max_steps else "stopped")
                break
        trials[k] = t
        if t.status == "reached" and (best[0] is None or t.total < best[0].total):
            best[0] = t
        if log is not None:
            log(f"  B={b:<5} lr={lr:<10.4g} {t.status:<8} steps "
                f"{'+'.join(map(str, t.steps)) or '-'} ({t.wall_s:.1f} s)")

    for k in sorted(range(-((n - 1) // 2), n // 2 + 1), key=lambda k: (abs(k), -k)):
        attempt(k)
    for direction in (+1, -1):
        for _ in range(spec.max_extend):
            edge = max(trials) if direction > 0 else min(trials)
            if best[0] is not None and best[0].grid_index != edge:
                break
            if best[0] is None and direction > 0 and trials[edge].status == "diverged":
                break
            attempt(edge + direction)
    if best[0] is None:
        tried = ", ".join(f"{t.lr:.4g} ({t.status})" for t in trials.values())
        raise SweepError(f"{spec.task.name}: no learning rate reached {spec.target:g} at batch "
                         f"size {b} within {spec.max_steps} steps; tried {tried}")
    k0 = best[0].grid_index
    vertex = None
    nb = [trials.get(k0 - 1), best[0], trials.get(k0 + 1)]
    if all(t is not None and t.status == "reached" for t in nb):
        v = parabola_vertex(tuple(math.log(t.lr) for t in nb),
                            tuple(math.log(t.total) for t in nb))
        vertex = None if v is None else math.exp(v)
    return best[0], sorted(trials.values(), key=lambda t: t.lr), vertex


def run_sweep(spec: SweepSpec, log: Log | None = None) -> dict[str, Any]:
    """Runs the sweep (module docstring); returns its JSON-able result."""
    spec.check()
    task = make_task(spec.task)
    t0 = time.perf_counter()
    sizes, runs, trials = [], [], []
    with _num_threads(spec.threads):
        center, prev = spec.lr_center, None
        for b in sorted(spec.batch_sizes):
            if prev is not None:
                center = spec.move(prev[1], prev[0], b)
            if log is not None:
                log(f"{spec.task.name} {spec.optim.label}: batch size {b}, grid centre "
                    f"{center:.4g}")
            best, tried, vertex = _search(spec, task, b, center, log)
            trials += tried
            ks = [t.grid_index for t in tried]
            sizes.append({"batch_size": b, "tokens": b * task.tokens_per_example,
                          "lr": best.lr, "lr_parabola": vertex,
                          "lr_run": vertex if vertex is not None else best.lr,
                          "steps": best.steps, "mean_steps": best.total / len(best.steps),
                          "mean_examples": sum(best.examples) / len(best.examples),
                          "lr_at_grid_edge": best.grid_index in (min(ks), max(ks)),
                          "lrs_tried": len(tried)})
            runs += [{"batch_size": b, "seed": s, "steps": st, "examples": ex, "lr": best.lr,
                      "tokens": ex * task.tokens_per_example}
                     for s, st, ex in zip(spec.seeds, best.steps, best.examples)]
            prev = (b, best.lr)
    try:
        fit = fit_critical_batch([r["batch_size"] for r in runs], [r["steps"] for r in runs],
                                 n_boot=spec.n_boot, seed=0)
        fit_d = _fit_dict(fit)
    except ValueError as e:
        fit_d = {"error": f"no critical-batch fit: {e}"}
    return {"key": sweep_key(spec), "spec": asdict(spec), "task": task.describe(),
            "optimizer": spec.optim.describe(), "target": spec.target,
            "batch_sizes": sizes, "runs": runs, "trials": [asdict(t) for t in trials],
            "fit": fit_d, "wall_s": time.perf_counter() - t0, "threads": spec.threads,
            "device": f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__}


def get_sweep(spec: SweepSpec, out: str | Path, log: Log | None = None) -> dict[str, Any]:
    """The sweep's result from ``out/sweeps/`` when an identical sweep was run before, else runs
    it and saves it there (so E1, E2, the Adam experiment and E3 share it)."""
    path = Path(out) / "sweeps" / f"{spec.task.name}-{spec.optim.label}-{sweep_key(spec)}.json"
    if path.is_file():
        if log is not None:
            log(f"reusing {path}")
        return json.loads(path.read_text())
    result = run_sweep(spec, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, str(path))
    return result
