"""``gradstats demo``: the gradient noise scale of a small MLP trained on scikit-learn's digits.

A 64 -> 128 -> 128 -> 10 GELU MLP (:func:`~gradstats.apps.models.make_mlp`) is trained with a
mean cross-entropy loss on the 8x8 handwritten digits (:func:`~gradstats.apps.data.load_digits`)
with a :class:`~gradstats.GradStatsMonitor` attached. Each step gives, in per-example loss
units, the unbiased ``tr(Sigma)``, ``|G|^2`` and ``B_simple = tr(Sigma)/|G|^2`` (in examples),
and their bias-corrected EMAs. A shuffled epoch draws each batch of ``b`` without replacement
from the ``M`` training examples, so the monitor is given ``M`` and uses
``|G|^2 = |gbar|^2 - tr(Sigma) (1/b - 1/M)``.

The report reads ``B_simple`` as a stand-in for McCandlish et al.'s (2018) ``B_noise``: for SGD
the best learning rate at batch ``B`` is ``eta*(B) = eta_max / (1 + B_noise/B)``, and reaching a
given loss takes ``S = S_min (1 + B_noise/B)`` steps and ``E = E_min (1 + B/B_noise)`` examples.
``B_simple`` grows as the loss falls, so the advice uses the progress-weighted value over the
run, ``E_min/S_min`` from :func:`gradstats.critical.predict_from_b_simple` with the smoothed
``B_simple`` of every step (what ``gradstats critical-batch`` compares with the measured
critical batch size), and shows the final value beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..critical import NoiseScalePrediction, predict_from_b_simple
from ..monitor import GradStatsMonitor, StepStats
from ..scaling import examples_for_batch, sgd_optimal_lr, steps_for_batch
from .common import (DEMO_EXTRA, ConfigError, UsageError, interval, num, positive_float,
                     positive_int, sig, unit_interval, wrap, write_json)
from .data import Data, load_digits
from .models import describe_mlp, make_mlp
from ..logs import PREFIX, open_run_log, record_of, run_log_line
from .plot import plot_run
from .plotting import require_matplotlib, save

__all__ = ["DemoConfig", "run_demo", "batch_advice", "measure_step_times", "format_report",
           "format_timing", "add_arguments", "run_cli"]

Mode = Literal["hooks", "fused", "off"]
OnStep = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, "StepStats | None"], None]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains, and how."""

    epochs: int = 6
    batch_size: int = 32
    lr: float = 0.02
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    seed: int = 0
    mode: Mode = "fused"
    beta: float = 0.99
    hidden: int = 128
    test_fraction: float = 0.2

    def check(self, n_train: int | None = None) -> None:
        """Raises :class:`~gradstats.apps.common.ConfigError` naming the first field out of
        range."""
        if self.epochs < 1:
            raise ConfigError("epochs", f"must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError("batch_size", f"must be >= 2 (tr(Sigma) needs two examples per "
                                            f"step), got {self.batch_size}")
        if n_train is not None and self.batch_size > n_train:
            raise ConfigError("batch_size", f"must be <= the {n_train} training examples, got "
                                            f"{self.batch_size}")
        if not (0.0 < self.lr < math.inf):
            raise ConfigError("lr", f"must be a positive finite number, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError("optimizer", f"must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not (0.0 <= self.momentum < 1.0):
            raise ConfigError("momentum", f"must satisfy 0 <= momentum < 1, got {self.momentum}")
        if self.mode not in ("hooks", "fused", "off"):
            raise ConfigError("mode", f"must be 'hooks', 'fused' or 'off', got {self.mode!r}")
        if not (0.0 <= self.beta < 1.0):
            raise ConfigError("beta", f"must satisfy 0 <= beta < 1, got {self.beta}")
        if self.hidden < 1:
            raise ConfigError("hidden", f"must be >= 1, got {self.hidden}")
        if not (0.0 < self.test_fraction < 1.0):
            raise ConfigError("test_fraction", f"must lie in (0, 1), got {self.test_fraction}")


def _model(cfg: DemoConfig, data: Data) -> nn.Sequential:
    return make_mlp(cfg.hidden, cfg.seed, data.x_train.shape[1], data.n_classes)


def _optimizer(cfg: DemoConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)


def _monitor(cfg: DemoConfig, model: nn.Module, n_train: int,
             mode: str | None = None) -> GradStatsMonitor | None:
    mode = mode or cfg.mode
    if mode == "off":
        return None
    return GradStatsMonitor(model, mode=mode, loss_reduction="mean", beta=cfg.beta,
                            dataset_size=n_train)


class _Progress:
    """A tqdm bar with the smoothed loss and B_simple; plain prints when tqdm is missing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.bar = total, enabled, None
        self.every = max(1, total // 10)
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit="step", desc="training", leave=False,
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, epoch: int, loss: float, b: float | None) -> None:
        if not self.enabled:
            return
        text = f"epoch {epoch}  loss {loss:.3f}  B_simple {num(b)} examples"
        if self.bar is not None:
            self.bar.update(1)
            if step % 5 == 0 or step + 1 == self.total:
                self.bar.set_postfix_str(text, refresh=False)
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            print(f"step {step + 1}/{self.total}  {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


_SUMMARY = ("b_simple_ema", "b_simple_stderr", "b_simple_lo", "b_simple_hi", "tr_sigma_ema",
            "g2_ema")


def run_demo(config: DemoConfig | None = None, *, on_step: OnStep | None = None,
             progress: bool = False, data: Data | None = None,
             log: str | None = None) -> dict[str, Any]:
    """Trains the demo model and returns the report (JSON-able).

    ``report["history"]`` holds one run-log record per step (the format of
    :mod:`gradstats.apps.plot`, plus ``epoch``, ``defined`` and ``b_simple_stderr``), and
    ``log`` (a ``.jsonl`` or ``.csv`` path) receives the same records as training goes.
    ``on_step(i, model, x, y, stats)`` (``i`` counts steps from 0) is called after
    ``monitor.step()`` and before the optimizer step, so ``model`` still holds the parameters
    that produced ``stats`` from batch ``(x, y)`` (``stats`` is None with ``mode="off"``).
    """
    cfg = config or DemoConfig()
    cfg.check()
    data = data or load_digits(cfg.seed, cfg.test_fraction)
    n_train = len(data.y_train)
    cfg.check(n_train)
    model = _model(cfg, data)
    opt = _optimizer(cfg, model)
    monitor = _monitor(cfg, model, n_train)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = _Progress(cfg.epochs * math.ceil(n_train / cfg.batch_size), progress)
    pause = monitor.paused if monitor is not None else contextlib.nullcontext
    writer = open_run_log(log) if log else None
    history: list[dict[str, Any]] = []
    epochs: list[dict[str, Any]] = []
    last: StepStats | None = None
    loss_ema, step, examples, t0 = math.nan, 0, 0, time.perf_counter()
    try:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            total_loss = 0.0
            for idx in torch.randperm(n_train, generator=gen).split(cfg.batch_size):
                x, y = data.x_train[idx], data.y_train[idx]
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                examples += len(idx)
                lr, value = opt.param_groups[0]["lr"], loss.item()
                if monitor is not None:
                    last = monitor.step()
                    record = record_of(last, lr=lr, examples=examples, loss=value)
                    record[PREFIX + "defined"] = last.defined
                else:
                    record = {PREFIX + "examples": examples, PREFIX + "batch_size": len(idx),
                              PREFIX + "lr": lr, PREFIX + "loss": value}
                record[PREFIX + "epoch"] = epoch
                rec = run_log_line(record, step + 1)
                if on_step is not None:
                    on_step(step, model, x, y, last)
                opt.step()
                opt.zero_grad(set_to_none=True)
                history.append(rec)
                if writer is not None:
                    writer.log(record, step + 1)
                total_loss += value * len(idx)
                loss_ema = value if step == 0 else 0.95 * loss_ema + 0.05 * value
                bar.update(step, epoch, loss_ema, rec.get("b_simple_ema"))
                step += 1
            model.eval()
            with pause():
                acc = _accuracy(model, data.x_test, data.y_test)
            ep = {"epoch": epoch, "step": step, "train_loss": total_loss / n_train,
                  "test_accuracy": acc}
            if monitor is not None:
                ep.update({k: history[-1][k] for k in _SUMMARY})
            epochs.append(ep)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if monitor is not None:
            monitor.detach()
    report: dict[str, Any] = {
        "config": asdict(cfg),
        "model": describe_mlp(model),
        "data": {"name": data.name, "n_train": n_train, "n_test": len(data.y_test)},
        "steps": step,
        "wall_s": time.perf_counter() - t0,
        "history": history,
        "epochs": epochs,
        "final": {"test_accuracy": epochs[-1]["test_accuracy"],
                  "n_correct": round(epochs[-1]["test_accuracy"] * len(data.y_test))},
    }
    if last is not None:
        h = history[-1]
        report["final"].update({k: h[k] for k in ("tr_sigma", "g2", "b_simple", "defined")
                                + _SUMMARY})
        shapes = {name: list(m.weight.shape) for name, m in model.named_modules()
                  if isinstance(m, nn.Linear)}
        report["layers"] = {
            name: {"shape": shapes.get(name), "tr_sigma": ls.tr_sigma_ema, "g2": ls.g2_ema,
                   "b_simple": ls.b_simple_ema}
            for name, ls in last.layers.items()}
        pw = predict_from_b_simple([r["b_simple_ema"] for r in history],
                                   [r["batch_size"] for r in history])
        report["b_simple_progress_weighted"] = _prediction_dict(pw)
        report["batch_advice"] = batch_advice(pw.b_crit, cfg.batch_size)
    return report


def _prediction_dict(p: NoiseScalePrediction) -> dict[str, Any]:
    return {"b_simple": p.b_crit, "s_min": p.s_min, "e_min": p.e_min, "steps": p.steps,
            "skipped_steps": p.skipped_steps,
            "formula": p.FORMULA + "; B_simple_t = the monitor's smoothed value at step t"}


def batch_advice(b_noise: float, batch_size: int) -> dict[str, Any] | None:
    """Relative SGD learning rate, steps and examples at a few batch sizes ``B``, with
    ``B_noise`` estimated by ``b_noise`` (the progress-weighted ``B_simple``):
    ``eta*/eta_max = 1/(1 + B_noise/B)``, ``S/S_min = 1 + B_noise/B``, ``E/E_min = 1 + B/B_noise``,
    and ``eta*(B)/eta*(b)`` for the batch ``b`` used. None when ``b_noise`` is undefined."""
    if not (math.isfinite(b_noise) and b_noise > 0):
        return None
    lo, hi = min(batch_size, b_noise) / 8, max(batch_size, b_noise) * 8
    sizes = sorted({batch_size} | {4 ** k for k in range(1, 12) if lo <= 4 ** k <= hi})
    here = sgd_optimal_lr(1.0, b_noise, batch_size)
    rows = [{"batch_size": b, "lr_fraction": sgd_optimal_lr(1.0, b_noise, b),
             "steps_factor": steps_for_batch(1.0, b_noise, b),
             "examples_factor": examples_for_batch(1.0, b_noise, b),
             "lr_vs_current": sgd_optimal_lr(1.0, b_noise, b) / here} for b in sizes]
    return {"b_noise_estimate": b_noise, "source": "B_simple, progress-weighted over the run",
            "batch_size": batch_size, "rows": rows}


# ----------------------------------------------------------------------------- timing
def measure_step_times(config: DemoConfig | None = None, steps: int = 200, warmup: int = 20,
                       data: Data | None = None) -> dict[str, Any]:
    """Median wall time of one training step (forward, backward, ``monitor.step()``, optimizer
    step, zero_grad) with the monitor off, in hooks mode and in fused mode. The three models
    step in turn on the same batches (order rotated each step), so drift hits all alike."""
    cfg = config or DemoConfig()
    cfg.check()
    data = data or load_digits(cfg.seed, cfg.test_fraction)
    n_train = len(data.y_train)
    cfg.check(n_train)
    modes = ("off", "hooks", "fused")
    runs = {}
    for mode in modes:
        model = _model(cfg, data)
        runs[mode] = (model, _optimizer(cfg, model), _monitor(cfg, model, n_train, mode))
    gen = torch.Generator().manual_seed(cfg.seed)
    times: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for i in range(warmup + steps):
            idx = torch.randperm(n_train, generator=gen)[:cfg.batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            for j in range(len(modes)):
                mode = modes[(i + j) % len(modes)]
                model, opt, monitor = runs[mode]
                t = time.perf_counter()
                F.cross_entropy(model(x), y).backward()
                if monitor is not None:
                    monitor.step()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= warmup:
                    times[mode].append(time.perf_counter() - t)
    finally:
        for _, _, monitor in runs.values():
            if monitor is not None:
                monitor.detach()
    med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
    q = {m: statistics.quantiles(v, n=4) for m, v in times.items()}
    return {
        "steps": steps, "warmup": warmup, "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer, "hidden": cfg.hidden,
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "median_ms": med,
        "iqr_ms": {m: [q[m][0] * 1e3, q[m][2] * 1e3] for m in modes},
        "ratio_vs_off": {m: med[m] / med["off"] for m in modes},
    }


# ----------------------------------------------------------------------------- output
def _checkpoints(n: int, k: int = 6) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def format_report(report: dict[str, Any]) -> str:
    """The terminal report: B_simple at a few epochs, per-layer table, accuracy, batch advice."""
    cfg = report["config"]
    opt = (f"SGD lr {cfg['lr']:g} momentum {cfg['momentum']:g}" if cfg["optimizer"] == "sgd"
           else f"Adam lr {cfg['lr']:g}")
    d = report["data"]
    ep = f"{cfg['epochs']} epoch{'s' * (cfg['epochs'] != 1)}"
    out = [f"gradstats demo: {report['model']}, {opt}, batch {cfg['batch_size']} examples, "
           f"{ep} ({report['steps']} steps), monitor {cfg['mode']}, {report['wall_s']:.1f} s",
           f"data: {d['name']}, {d['n_train']} training / {d['n_test']} held-out examples", ""]
    has_stats = "layers" in report
    if has_stats:
        out.append(f"B_simple = tr(Sigma)/|G|^2 over training, in examples (EMA, "
                   f"beta={cfg['beta']:g}; 95% interval)")
    out.append(f"  {'epoch':>5} {'steps':>6} {'train loss':>10} {'test acc':>8}"
               + (f" {'B_simple':>9}  95% interval" if has_stats else ""))
    for i in _checkpoints(len(report["epochs"])):
        e = report["epochs"][i]
        line = (f"  {e['epoch']:>5} {e['step']:>6} {e['train_loss']:>10.4f} "
                f"{100 * e['test_accuracy']:>7.1f}%")
        if has_stats:
            line += f" {num(e['b_simple_ema']):>9}  {interval(e['b_simple_lo'], e['b_simple_hi'])}"
        out.append(line)
    f = report["final"]
    if has_stats:
        out += ["", "per layer at the end (EMA; tr(Sigma) and |G|^2 in per-example loss units, "
                    "B_simple in examples)",
                f"  {'layer':<18} {'tr(Sigma)':>11} {'|G|^2':>11} {'B_simple':>9}"]
        for name, ls in report["layers"].items():
            label = f"{name} ({'x'.join(map(str, ls['shape']))})" if ls["shape"] else name
            out.append(f"  {label:<18} {num(ls['tr_sigma']):>11} {num(ls['g2']):>11} "
                       f"{num(ls['b_simple']):>9}")
        out.append(f"  {'whole model':<18} {num(f['tr_sigma_ema']):>11} "
                   f"{num(f['g2_ema']):>11} {num(f['b_simple_ema']):>9}")
    out += ["", f"final held-out accuracy: {100 * f['test_accuracy']:.1f}% "
                f"({f['n_correct']}/{d['n_test']})"]
    if has_stats:
        out += [""] + _advice_lines(report.get("batch_advice"),
                                    report["b_simple_progress_weighted"], f)
    return "\n".join(out)


def _advice_lines(adv: dict[str, Any] | None, pw: dict[str, Any],
                  final: dict[str, Any]) -> list[str]:
    end = (f"B_simple at the end of training: {sig(final['b_simple_ema'])} examples (95% "
           f"interval {interval(final['b_simple_lo'], final['b_simple_hi'])})")
    if adv is None:
        return wrap("B_simple is undefined over the whole run (the smoothed |G|^2 estimate "
                    "stayed <= 0: the gradient is lost in the noise), so it gives no batch-size "
                    "advice. " + end, "", "")
    x, b = adv["b_noise_estimate"], adv["batch_size"]
    lines = ["what it implies for the batch size",
             f"  B_simple, progress-weighted over the run: {sig(x)} examples (used below)"]
    lines += wrap(f"= E_min/S_min, with S_min = sum_t 1/(1 + B_simple_t/B) = "
                  f"{sig(pw['s_min'])} steps and E_min = sum_t B_simple_t/(1 + "
                  f"B_simple_t/B) = {sig(pw['e_min'])} examples over the run's "
                  f"{pw['steps']:.0f} steps (B_simple_t the smoothed value at step t, B the "
                  "batch): what predicts the critical batch size B_crit.", "    ", "    ")
    lines += wrap(end + "; it grows as the loss falls, so the final value overstates what the "
                  "run needed.", "  ", "    ")
    lines += wrap(f"This run used batch {b} examples. Batch sizes well below ~{sig(x, 2)} "
                  "examples are noise-dominated: doubling the batch nearly halves the steps, so "
                  f"the learning rate can scale almost linearly with it. Far above ~{sig(x, 2)} "
                  "examples the step count stops falling and the extra examples are wasted. "
                  "Near it, training takes 2x the minimum steps and 2x the minimum examples.",
                  "  ", "  ")
    lines += ["  SGD: eta*(B) = eta_max / (1 + B_noise/B), with the progress-weighted B_simple "
              "for B_noise:",
              f"  {'batch (examples)':>16} {'eta*/eta_max':>12} {'steps/S_min':>11} "
              f"{'examples/E_min':>14} {f'eta* vs B={b}':>14}"]
    for r in adv["rows"]:
        mark = "  <- this run" if r["batch_size"] == b else ""
        lines.append(f"  {r['batch_size']:>16} {r['lr_fraction']:>12.3f} "
                     f"{r['steps_factor']:>11.3g} {r['examples_factor']:>14.3g} "
                     f"{r['lr_vs_current']:>13.3g}x{mark}")
    return lines + wrap("B_simple equals B_noise only when the Hessian is a multiple of the "
                        "identity: read it as a scale, not a digit.", "  ", "  ")


def format_timing(t: dict[str, Any]) -> str:
    """Side-by-side step times (median and quartiles) and their ratio to the monitor off."""
    out = [f"step time (forward + backward + monitor.step + optimizer step), median of "
           f"{t['steps']} steps after {t['warmup']} warm-up steps; batch {t['batch_size']} "
           f"examples, hidden {t['hidden']}, {t['optimizer']}",
           f"{t['device']}, {t['threads']} threads, torch {t['torch']}",
           f"  {'monitor':<8} {'median':>10} {'quartiles':>19} {'vs off':>7}"]
    for m, v in t["median_ms"].items():
        lo, hi = t["iqr_ms"][m]
        out.append(f"  {m:<8} {v:>7.3f} ms [{lo:>6.3f}, {hi:>6.3f}] ms "
                   f"{t['ratio_vs_off'][m]:>6.2f}x")
    return "\n".join(out)


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--epochs", type=positive_int, default=d.epochs,
                   help=f"passes over the training split (default {d.epochs})")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"examples per step, >= 2 (default {d.batch_size})")
    p.add_argument("--lr", type=positive_float, default=d.lr,
                   help=f"learning rate (default {d.lr})")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer,
                   help=f"SGD with momentum {d.momentum} or Adam (default {d.optimizer})")
    p.add_argument("--seed", type=int, default=d.seed, help="split, init and shuffling seed")
    p.add_argument("--mode", choices=("hooks", "fused", "off"), default=d.mode,
                   help=f"monitor mode, or off (default {d.mode})")
    p.add_argument("--beta", type=unit_interval, default=d.beta,
                   help=f"EMA factor of the smoothed statistics (default {d.beta})")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write the report and per-step history")
    p.add_argument("--log", metavar="F.jsonl",
                   help="write the run log, one line per step (.jsonl, or .csv), for "
                        "`gradstats plot F.jsonl`")
    p.add_argument("--plot", metavar="F.png",
                   help=f"write the run's figure, as `gradstats plot` draws it (needs "
                        f"matplotlib: {DEMO_EXTRA})")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no report")
    p.add_argument("--timing", action="store_true",
                   help="instead of training, time one step with the monitor off, in hooks "
                        "mode and in fused mode, side by side")
    p.add_argument("--timing-steps", type=positive_int, default=200, metavar="N",
                   help="timed steps per mode for --timing (default 200)")


def run_cli(args: argparse.Namespace) -> int:
    """``gradstats demo``."""
    cfg = DemoConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     optimizer=args.optimizer, seed=args.seed, mode=args.mode, beta=args.beta)
    for flag, value in (("--plot", args.plot), ("--log", args.log)):
        if value and cfg.mode == "off" and not args.timing:
            raise UsageError(f"argument {flag}: there is no B_simple with --mode off; use "
                             "--mode fused or --mode hooks")
    cfg.check()
    if args.plot and not args.timing:
        require_matplotlib("--plot", DEMO_EXTRA)
    data = load_digits(cfg.seed, cfg.test_fraction)
    cfg.check(len(data.y_train))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.timing:
        result = measure_step_times(cfg, steps=args.timing_steps, data=data)
        if not args.quiet:
            print(format_timing(result))
        if args.json:
            write_json({"config": asdict(cfg), "timing": result}, args.json)
        return 0
    report = run_demo(cfg, progress=not args.quiet, data=data, log=args.log)
    if not args.quiet:
        print(format_report(report))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        title = f"gradstats demo: {report['model']}, batch {cfg.batch_size} examples"
        save(plot_run(report["history"], title), args.plot)
    if not args.quiet:
        for what, path in (("run log", args.log), ("plot", args.plot)):
            if path:
                print(f"{what} written to {path}")
    return 0
