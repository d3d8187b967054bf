"""The full and ``--quick`` profiles: which sweeps and reference runs each task gets.

Full profiles (``docs/experiments/README.md`` states their budgets):

* ``digits-mlp``, ``digits-cnn``: plain SGD, batch sizes 8..512 examples (7), training loss
  0.01 (the README's ``gradstats critical-batch`` target), 3 seeds (MLP) and 2 (CNN, whose
  every-step evaluation of the whole training split costs more), grid spacing ``2^(1/4)``.
* ``text``: Adam, batch sizes 4..128 sequences of 64 characters (6; 256..8192 tokens),
  validation loss 2.5 nats per character, 2 seeds, grid spacing ``2^(1/2)`` refined by the
  parabola; the same at ``beta1 = beta2 = 0`` for the Adam experiment.

Quick profiles: tiny models, three batch sizes, loose targets, two seeds on the MLP and one
elsewhere, a few seconds each (the tests).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from .measure import MeasureSpec, get_reference
from .runner import Optim
from .search import SweepSpec, get_sweep
from .tasks import TaskConfig

__all__ = ["ADAM", "SGD", "SIGN", "measure_spec", "prepare", "reference_size", "sweep_spec"]

SGD = Optim("sgd")
ADAM = Optim("adam", 0.9, 0.999)
SIGN = Optim("adam", 0.0, 0.0)

_FULL: dict[str, dict[str, Any]] = {
    "digits-mlp": dict(batch_sizes=(8, 16, 32, 64, 128, 256, 512), target=0.01, seeds=(0, 1, 2),
                       lr_center=0.22, b_guess=100.0, max_steps=5000),
    "digits-cnn": dict(batch_sizes=(8, 16, 32, 64, 128, 256, 512), target=0.01, seeds=(0, 1),
                       lr_center=0.2, b_guess=100.0, max_steps=5000),
    "text": dict(batch_sizes=(4, 8, 16, 32, 64, 128), target=2.5, seeds=(0, 1),
                 lr_center=1.5e-3, b_guess=32.0, lr_factor=2.0 ** 0.5, max_steps=1500),
}
_QUICK: dict[str, dict[str, Any]] = {
    "digits-mlp": dict(batch_sizes=(16, 64, 256), target=0.5, seeds=(0, 1), lr_center=0.5,
                       b_guess=30.0, lr_factor=2.0, lr_candidates=2, max_extend=2,
                       max_steps=150, slack=1.25, n_boot=200),
    "digits-cnn": dict(batch_sizes=(16, 64, 256), target=0.7, seeds=(0,), lr_center=0.5,
                       b_guess=30.0, lr_factor=2.0, lr_candidates=2, max_extend=2,
                       max_steps=150, slack=1.25, n_boot=200),
    "text": dict(batch_sizes=(4, 16, 64), target=3.0, seeds=(0,), lr_center=1e-2,
                 b_guess=16.0, lr_factor=2.0, lr_candidates=2, max_extend=2, max_steps=150,
                 slack=1.25, n_boot=200),
}
_QUICK_TASK = {"digits-mlp": dict(hidden=16), "digits-cnn": dict(channels=4),
               "text": dict(context=16, d=32, n_layer=1, n_head=2, eval_windows=16)}
_SIGN_LR = 0.5  # sign descent (beta = 0) takes smaller steps than Adam at the same lr


def task_config(name: str, quick: bool, corpus: str = "pinned") -> TaskConfig:
    return TaskConfig(name, corpus=corpus, **(_QUICK_TASK[name] if quick else {}))


def sweep_spec(name: str, optim: Optim, quick: bool, *, threads: int = 1,
               corpus: str = "pinned", seeds: tuple[int, ...] | None = None) -> SweepSpec:
    """The sweep of task ``name`` with ``optim`` in the chosen profile."""
    kw = dict((_QUICK if quick else _FULL)[name])
    if optim == SIGN:
        kw["lr_center"] *= _SIGN_LR
    if seeds is not None:
        kw["seeds"] = seeds
    return SweepSpec(task_config(name, quick, corpus), optim, threads=threads, **kw)


def reference_size(sweep: dict[str, Any]) -> dict[str, Any]:
    """The sweep's row of the reference batch size: the middle of the sorted sizes."""
    rows = sweep["batch_sizes"]
    return rows[(len(rows) - 1) // 2]


def measure_spec(sweep: dict[str, Any], spec: SweepSpec, quick: bool) -> MeasureSpec:
    """The reference run of a sweep: its middle batch size, the best grid learning rate there,
    seed ``spec.seeds[0]``."""
    row = reference_size(sweep)
    text = spec.task.name == "text"
    base = MeasureSpec(spec.task, spec.optim, row["batch_size"], row["lr"], spec.target,
                       row["steps"][0], seed=spec.seeds[0], max_steps=spec.max_steps,
                       threads=spec.threads, meas_batch=64 if text else 256,
                       big_batch=512 if text else 0)
    if quick:
        return replace(base, curvature_points=4, adam_points=3, big_points=4,
                       meas_batch=32, big_batch=64 if text else 0)
    return base


def prepare(name: str, optim: Optim, quick: bool, out: Any, *, threads: int = 1,
            corpus: str = "pinned", log: Any = None, reference: bool = True
            ) -> tuple[SweepSpec, dict[str, Any], dict[str, Any] | None]:
    """The sweep of ``name`` with ``optim`` and (with ``reference``) its reference run, each
    reused from ``out`` when an identical one was run before."""
    spec = sweep_spec(name, optim, quick, threads=threads, corpus=corpus)
    sw = get_sweep(spec, out, log)
    ref = get_reference(measure_spec(sw, spec, quick), out, log) if reference else None
    return spec, sw, ref
