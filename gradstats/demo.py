"""``gradstats demo``: the gradient noise scale of a small MLP trained on scikit-learn's digits.

A 64 -> 128 -> 128 -> 10 GELU MLP (plain ``nn.Linear`` layers) is trained with a mean
cross-entropy loss on the 8x8 handwritten digits (1797 images, standardised with the training
split's statistics, 20% held out) with a :class:`~gradstats.GradStatsMonitor` attached. Each
step gives, in per-example loss units, the unbiased ``tr(Sigma)``, ``|G|^2`` and
``B_simple = tr(Sigma)/|G|^2``, and their bias-corrected EMAs. A shuffled epoch draws each batch
of ``b`` without replacement from the ``M`` training examples, so the monitor is given ``M`` and
uses ``|G|^2 = |gbar|^2 - tr(Sigma) (1/b - 1/M)``.

The report reads ``B_simple`` as a stand-in for McCandlish et al.'s (2018) ``B_noise``: for SGD
the best learning rate at batch ``B`` is ``eta*(B) = eta_max / (1 + B_noise/B)``, and reaching a
given loss takes ``S = S_min (1 + B_noise/B)`` steps and ``E = E_min (1 + B/B_noise)`` examples.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .cli import UsageError, positive_float, positive_int
from .monitor import GradStatsMonitor, StepStats

try:
    from .scaling import examples_for_batch, sgd_optimal_lr, steps_for_batch
except ImportError:  # pragma: no cover - scaling.py is optional here
    def sgd_optimal_lr(eta_max: float, b_noise: float, batch_size: float) -> float:
        return eta_max / (1.0 + b_noise / batch_size)

    def steps_for_batch(s_min: float, b_noise: float, batch_size: float) -> float:
        return s_min * (1.0 + b_noise / batch_size)

    def examples_for_batch(e_min: float, b_noise: float, batch_size: float) -> float:
        return e_min * (1.0 + batch_size / b_noise)

__all__ = ["DemoConfig", "ConfigError", "MissingDependency", "Data", "load_data", "make_model",
           "run_demo", "measure_step_times", "format_report", "format_timing", "save_plot",
           "write_json", "add_arguments", "run_cli", "HELP"]

HELP = ("train a small MLP on scikit-learn's handwritten digits with the monitor attached and "
        "report the gradient noise scale B_simple and what it means for the batch size")
INSTALL_HINT = "pip install 'gradstats[demo]'"

Mode = Literal["hooks", "fused", "off"]
OnStep = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, "StepStats | None"], None]


class ConfigError(ValueError):
    """A :class:`DemoConfig` field out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


class MissingDependency(ImportError):
    """An optional dependency of the demo is not installed."""


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
        """Raises :class:`ConfigError` naming the first field out of range."""
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


class Data(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(seed: int = 0, test_fraction: float = 0.2) -> Data:
    """The digits, split stratified, features standardised by the training split (float32)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise MissingDependency(f"gradstats demo needs scikit-learn: {INSTALL_HINT}") from e
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                              stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0

    def f(a):
        return torch.as_tensor((a - mean) / std, dtype=torch.float32)

    def i(a):
        return torch.as_tensor(a, dtype=torch.long)

    return Data(f(x_tr), i(y_tr), f(x_te), i(y_te))


def make_model(hidden: int = 128, seed: int = 0, in_features: int = 64,
               classes: int = 10) -> nn.Sequential:
    """``in -> hidden -> hidden -> classes`` with GELU, initialised from ``seed`` (the global
    RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(),
                             nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, classes))


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


def _f(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _record(st: StepStats) -> dict[str, Any]:
    lo, hi = st.b_simple_interval
    return {"tr_sigma": _f(st.tr_sigma), "g2": _f(st.g2), "b_simple": _f(st.b_simple),
            "defined": st.defined, "tr_sigma_ema": _f(st.tr_sigma_ema), "g2_ema": _f(st.g2_ema),
            "b_simple_ema": _f(st.b_simple_ema), "b_simple_stderr": _f(st.b_simple_stderr),
            "b_simple_lo": _f(lo), "b_simple_hi": _f(hi)}


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
        text = f"epoch {epoch}  loss {loss:.3f}  B_simple {_num(b)}"
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


def run_demo(config: DemoConfig | None = None, *, on_step: OnStep | None = None,
             progress: bool = False, data: Data | None = None) -> dict[str, Any]:
    """Trains the demo model and returns the report (JSON-able).

    ``on_step(step, model, x, y, stats)`` is called after ``monitor.step()`` and before the
    optimizer step, so ``model`` still holds the parameters that produced ``stats`` from
    batch ``(x, y)`` (``stats`` is None with ``mode="off"``).
    """
    cfg = config or DemoConfig()
    cfg.check()
    data = data or load_data(cfg.seed, cfg.test_fraction)
    n_train = len(data.y_train)
    cfg.check(n_train)
    model = make_model(cfg.hidden, cfg.seed, data.x_train.shape[1], int(data.y_train.max()) + 1)
    opt = _optimizer(cfg, model)
    monitor = _monitor(cfg, model, n_train)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = math.ceil(n_train / cfg.batch_size)
    bar = _Progress(cfg.epochs * per_epoch, progress)
    pause = monitor.paused if monitor is not None else contextlib.nullcontext
    history: list[dict[str, Any]] = []
    epochs: list[dict[str, Any]] = []
    last: StepStats | None = None
    loss_ema, step, t0 = math.nan, 0, time.perf_counter()
    try:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            total_loss = 0.0
            for idx in torch.randperm(n_train, generator=gen).split(cfg.batch_size):
                x, y = data.x_train[idx], data.y_train[idx]
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                rec: dict[str, Any] = {"step": step, "epoch": epoch, "loss": loss.item(),
                                       "n": len(idx)}
                if monitor is not None:
                    last = monitor.step()
                    rec.update(_record(last))
                if on_step is not None:
                    on_step(step, model, x, y, last if monitor is not None else None)
                opt.step()
                opt.zero_grad(set_to_none=True)
                history.append(rec)
                total_loss += rec["loss"] * len(idx)
                loss_ema = rec["loss"] if step == 0 else 0.95 * loss_ema + 0.05 * rec["loss"]
                bar.update(step, epoch, loss_ema, rec.get("b_simple_ema"))
                step += 1
            model.eval()
            with pause():
                acc = _accuracy(model, data.x_test, data.y_test)
            ep = {"epoch": epoch, "step": step, "train_loss": total_loss / n_train,
                  "test_accuracy": acc}
            if history and "b_simple_ema" in history[-1]:
                h = history[-1]
                ep.update({k: h[k] for k in ("b_simple_ema", "b_simple_stderr", "b_simple_lo",
                                             "b_simple_hi", "tr_sigma_ema", "g2_ema")})
            epochs.append(ep)
    finally:
        bar.close()
        if monitor is not None:
            monitor.detach()
    wall = time.perf_counter() - t0
    sizes = [m.weight.shape for m in model if isinstance(m, nn.Linear)]
    arch = "-".join([str(sizes[0][1])] + [str(s[0]) for s in sizes])
    report: dict[str, Any] = {
        "config": asdict(cfg),
        "model": f"MLP {arch} (GELU)",
        "data": {"name": "sklearn digits", "n_train": n_train, "n_test": len(data.y_test)},
        "steps": step,
        "wall_s": wall,
        "history": history,
        "epochs": epochs,
        "final": {"test_accuracy": epochs[-1]["test_accuracy"],
                  "n_correct": round(epochs[-1]["test_accuracy"] * len(data.y_test))},
    }
    if last is not None:
        report["final"].update(_record(last))
        shapes = {name: list(m.weight.shape) for name, m in model.named_modules()
                  if isinstance(m, nn.Linear)}
        report["layers"] = {
            name: {"shape": shapes.get(name), "tr_sigma": _f(ls.tr_sigma_ema),
                   "g2": _f(ls.g2_ema), "b_simple": _f(ls.b_simple_ema)}
            for name, ls in last.layers.items()}
        report["batch_advice"] = batch_advice(last.b_simple_ema, cfg.batch_size)
    return report


def batch_advice(b_simple: float, batch_size: int) -> dict[str, Any] | None:
    """Relative SGD learning rate, steps and examples at a few batch sizes ``B``, with
    ``B_noise ~ B_simple``: ``eta*/eta_max = 1/(1 + B_noise/B)``, ``S/S_min = 1 + B_noise/B``,
    ``E/E_min = 1 + B/B_noise``, and ``eta*(B)/eta*(b)`` for the batch ``b`` used."""
    if not (math.isfinite(b_simple) and b_simple > 0):
        return None
    lo, hi = min(batch_size, b_simple) / 8, max(batch_size, b_simple) * 8
    sizes = sorted({batch_size} | {4 ** k for k in range(1, 12) if lo <= 4 ** k <= hi})
    here = sgd_optimal_lr(1.0, b_simple, batch_size)
    rows = [{"batch_size": b, "lr_fraction": sgd_optimal_lr(1.0, b_simple, b),
             "steps_factor": steps_for_batch(1.0, b_simple, b),
             "examples_factor": examples_for_batch(1.0, b_simple, b),
             "lr_vs_current": sgd_optimal_lr(1.0, b_simple, b) / here} for b in sizes]
    return {"b_noise_estimate": b_simple, "batch_size": batch_size, "rows": rows}


# ----------------------------------------------------------------------------- timing
def measure_step_times(config: DemoConfig | None = None, steps: int = 200, warmup: int = 20,
                       data: Data | None = None) -> dict[str, Any]:
    """Median wall time of one training step (forward, backward, ``monitor.step()``, optimizer
    step, zero_grad) with the monitor off, in hooks mode and in fused mode. The three models
    step in turn on the same batches (order rotated each step), so drift hits all alike."""
    cfg = config or DemoConfig()
    cfg.check()
    data = data or load_data(cfg.seed, cfg.test_fraction)
    n_train = len(data.y_train)
    cfg.check(n_train)
    modes = ("off", "hooks", "fused")
    runs = {}
    for mode in modes:
        model = make_model(cfg.hidden, cfg.seed, data.x_train.shape[1],
                           int(data.y_train.max()) + 1)
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
def _num(x: float | None, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}"


def _about(x: float) -> str:
    """``x`` to two significant figures, without exponent notation."""
    r = float(f"{x:.2g}")
    return f"{r:.0f}" if r >= 10 else f"{r:g}"


def _interval(lo: float | None, hi: float | None) -> str:
    return "n/a" if lo is None or hi is None else f"[{_num(lo)}, {_num(hi)}]"


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
    out = [f"gradstats demo: {report['model']}, {opt}, batch {cfg['batch_size']}, {ep} "
           f"({report['steps']} steps), monitor {cfg['mode']}, {report['wall_s']:.1f} s",
           f"data: {d['name']}, {d['n_train']} training / {d['n_test']} held-out examples", ""]
    has_stats = "layers" in report
    if has_stats:
        out.append(f"B_simple = tr(Sigma)/|G|^2 over training (EMA, beta={cfg['beta']:g}; "
                   "95% interval)")
    out.append(f"  {'epoch':>5} {'step':>6} {'train loss':>10} {'test acc':>8}"
               + (f" {'B_simple':>9}  95% interval" if has_stats else ""))
    for i in _checkpoints(len(report["epochs"])):
        e = report["epochs"][i]
        line = (f"  {e['epoch']:>5} {e['step']:>6} {e['train_loss']:>10.4f} "
                f"{100 * e['test_accuracy']:>7.1f}%")
        if has_stats:
            ci = _interval(e["b_simple_lo"], e["b_simple_hi"])
            line += f" {_num(e['b_simple_ema']):>9}  {ci}"
        out.append(line)
    f = report["final"]
    if has_stats:
        out += ["", "per layer at the end (EMA, per-example loss units)",
                f"  {'layer':<18} {'tr(Sigma)':>11} {'|G|^2':>11} {'B_simple':>9}"]
        for name, ls in report["layers"].items():
            label = f"{name} ({'x'.join(map(str, ls['shape']))})" if ls["shape"] else name
            out.append(f"  {label:<18} {_num(ls['tr_sigma']):>11} {_num(ls['g2']):>11} "
                       f"{_num(ls['b_simple']):>9}")
        out.append(f"  {'whole model':<18} {_num(f['tr_sigma_ema']):>11} "
                   f"{_num(f['g2_ema']):>11} {_num(f['b_simple_ema']):>9}")
    out += ["", f"final held-out accuracy: {100 * f['test_accuracy']:.1f}% "
                f"({f['n_correct']}/{d['n_test']})"]
    if has_stats:
        out += [""] + _advice_lines(report.get("batch_advice"), f)
    return "\n".join(out)


def _advice_lines(adv: dict[str, Any] | None, final: dict[str, Any]) -> list[str]:
    if adv is None:
        return ["B_simple is undefined at the end of training (the smoothed |G|^2 estimate is "
                "<= 0: the gradient is lost in the noise), so it gives no batch-size advice."]
    x, b = adv["b_noise_estimate"], adv["batch_size"]
    lines = [
        "what it implies for the batch size",
        f"  measured B_simple ~ {_num(x, 3)} (95% interval "
        f"{_interval(final['b_simple_lo'], final['b_simple_hi'])}); this run used batch {b}.",
        f"  Batch sizes well below ~{_about(x)} are noise-dominated: doubling the batch nearly "
        "halves the steps, so the learning rate can scale almost linearly with it.",
        f"  Far above ~{_about(x)} the step count stops falling and the extra examples are "
        "wasted. Near it, training takes 2x the minimum steps and 2x the minimum examples.",
        "  SGD: eta*(B) = eta_max / (1 + B_noise/B), with B_simple standing in for B_noise:",
        f"  {'batch':>7} {'eta*/eta_max':>12} {'steps/S_min':>11} {'examples/E_min':>14} "
        f"{f'eta* vs B={b}':>14}",
    ]
    for r in adv["rows"]:
        mark = "  <- this run" if r["batch_size"] == b else ""
        lines.append(f"  {r['batch_size']:>7} {r['lr_fraction']:>12.3f} {r['steps_factor']:>11.3g}"
                     f" {r['examples_factor']:>14.3g} {r['lr_vs_current']:>13.3g}x{mark}")
    lines.append("  B_simple equals B_noise only when the Hessian is a multiple of the identity, "
                 "and it grows as the loss falls: read it as a scale, not a digit.")
    return lines


def format_timing(t: dict[str, Any]) -> str:
    """Side-by-side step times (median and quartiles) and their ratio to the monitor off."""
    out = [f"step time (forward + backward + monitor.step + optimizer step), median of "
           f"{t['steps']} steps after {t['warmup']} warm-up; batch {t['batch_size']}, "
           f"hidden {t['hidden']}, {t['optimizer']}",
           f"{t['device']}, {t['threads']} threads, torch {t['torch']}",
           f"  {'monitor':<8} {'median':>10} {'quartiles':>19} {'vs off':>7}"]
    for m, v in t["median_ms"].items():
        lo, hi = t["iqr_ms"][m]
        out.append(f"  {m:<8} {v:>7.3f} ms [{lo:>6.3f}, {hi:>6.3f}] ms "
                   f"{t['ratio_vs_off'][m]:>6.2f}x")
    return "\n".join(out)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(obj: dict[str, Any], path: str) -> None:
    """Strict JSON (non-finite floats become null)."""
    with open(path, "w") as fh:
        json.dump(_finite(obj), fh, indent=1, allow_nan=False)
        fh.write("\n")


def save_plot(report: dict[str, Any], path: str) -> str | None:
    """PNG of per-step B_simple, its EMA with the 95% band, and the loss; returns why it was
    skipped, or None when written."""
    if "layers" not in report:
        return "no B_simple to plot with --mode off"
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed (pip install 'gradstats[plot]'): no plot written"
    h = report["history"]
    step = [r["step"] for r in h]
    fig = Figure(figsize=(8, 6), tight_layout=True)
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    pts = [(r["step"], r["b_simple"]) for r in h if r["b_simple"] is not None and r["b_simple"] > 0]
    ema = [(r["step"], r["b_simple_ema"]) for r in h if r["b_simple_ema"] is not None]
    seen = sorted([b for _, b in pts])
    ends = [b for _, b in ema if b > 0]
    if seen:
        ends += [seen[len(seen) // 20], seen[-1 - len(seen) // 20]]
    ymin, ymax = (min(ends) / 2, max(ends) * 2) if ends else (1e-3, 1e6)
    if pts:
        ax.scatter(*zip(*pts), s=3, alpha=0.25, color="tab:gray", label="per step")
    band = [(r["step"], r["b_simple_lo"], r["b_simple_hi"]) for r in h
            if r["b_simple_lo"] is not None]
    if band:
        s, lo, hi = zip(*band)
        ax.fill_between(s, [max(v, ymin) for v in lo], [min(v, ymax) for v in hi],
                        color="tab:blue", alpha=0.2, label="95% interval (EMA)")
    if ema:
        ax.plot(*zip(*ema), color="tab:blue", label="EMA")
    ax.set_yscale("log")
    ax.set_ylim(ymin, ymax)
    ax.set_ylabel("B_simple = tr(Sigma)/|G|^2")
    ax.set_title(f"gradstats demo: {report['model']}, batch {report['config']['batch_size']}")
    ax.legend(loc="best")
    ax2.plot(step, [r["loss"] for r in h], color="tab:red", lw=0.8)
    ax2.set_yscale("log")
    ax2.set_ylabel("training loss")
    ax2.set_xlabel("step")
    fig.savefig(path, dpi=120)
    return None


# ----------------------------------------------------------------------------- command line
def _unit_interval(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not (0.0 <= v < 1.0):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return v


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
    p.add_argument("--beta", type=_unit_interval, default=d.beta,
                   help=f"EMA factor of the smoothed statistics (default {d.beta})")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write the report and per-step history")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of B_simple over steps")
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
    try:
        cfg.check()
        data = load_data(cfg.seed, cfg.test_fraction)
        cfg.check(len(data.y_train))
    except MissingDependency as e:
        print(f"gradstats demo: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        raise UsageError(f"argument --{e.field.replace('_', '-')}: {e.message}") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.timing:
        result = measure_step_times(cfg, steps=args.timing_steps, data=data)
        if not args.quiet:
            print(format_timing(result))
        if args.json:
            write_json({"config": asdict(cfg), "timing": result}, args.json)
        return 0
    report = run_demo(cfg, progress=not args.quiet, data=data)
    if not args.quiet:
        print(format_report(report))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        why = save_plot(report, args.plot)
        if why is not None:
            print(f"gradstats demo: {why}", file=sys.stderr)
        elif not args.quiet:
            print(f"plot written to {args.plot}")
    return 0
