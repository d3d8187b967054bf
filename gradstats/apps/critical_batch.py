"""``gradstats critical-batch``: the critical batch size of the demo model, measured by a sweep.

Trains the demo's MLP to a target loss at several batch sizes, each with its best learning rate
(:mod:`.sweep` says exactly how), fits ``S = S_min + E_min/B`` to the runs
(:func:`gradstats.critical.fit_critical_batch`) and puts ``B_crit = E_min/S_min`` beside the
noise scale ``B_simple`` measured during one reference run, progress-weighted
(:func:`gradstats.critical.predict_from_b_simple`). Writes ``runs.csv`` (one row per run),
``result.json`` (everything) and ``critical_batch.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from .common import (DEMO_EXTRA, interval, num, positive_float, positive_int, ratio, sig,
                     wrap, write_json)
from .data import load_digits
from .plotting import (B_SIMPLE_LABEL, COLORS, log_axis, log_limits, new_figure, positive,
                       require_matplotlib, save)
from .sweep import QUICK, SweepConfig, SweepError, run_sweep

__all__ = ["format_result", "write_runs_csv", "save_outputs", "save_plot", "add_arguments",
           "config_from_args", "run_cli"]


# ----------------------------------------------------------------------------- output
def _ci(f: dict[str, Any], name: str, unit: str) -> str:
    why = f["bootstrap"]["undefined"].get(name)
    if why is not None:
        return f"{100 * f['confidence']:g}% interval {why}"
    lo, hi = f[f"{name}_ci"]
    return f"{100 * f['confidence']:g}% interval {interval(lo, hi)} {unit}"


def format_result(result: dict[str, Any]) -> str:
    """The terminal report: per-batch table, fit with intervals, B_simple beside B_crit."""
    f, bs, cfg = result["fit"], result["b_simple"], result["config"]
    on, whole, pred = bs["online"], bs["whole_split"], bs["predicted"]
    rep = cfg["repeats"]
    out = [f"gradstats critical-batch: {result['model']}",
           *wrap(f"data: {result['data']['name']}, {result['data']['n_train']} training "
                  f"examples; target: {result['target']}; {rep} run{'s' * (rep != 1)} per batch "
                  "size (data orders and initialisations)", "", "  "),
           "",
           f"  {'batch':>10} {'best lr':>9} {'steps':>8} {'examples':>9} {'lrs tried':>9}  "
           "steps per run",
           f"  {'(examples)':>10} {'':>9} {'(mean)':>8} {'(mean)':>9}"]
    for r in result["batch_sizes"]:
        edge = "  (best lr at the grid's end)" if r["lr_at_grid_edge"] else ""
        out.append(f"  {r['batch_size']:>10} {r['lr']:>9.4g} {r['mean_steps']:>8.1f} "
                   f"{r['mean_examples']:>9.0f} {r['lrs_tried']:>9}  "
                   f"{' '.join(map(str, r['steps']))}{edge}")
    out += ["", f"fit (S/S_min - 1)(E/E_min - 1) = 1 over {len(result['runs'])} runs:"]
    for line in (f"S_min  = {num(f['s_min'])} steps, {_ci(f, 's_min', 'steps')}",
                 f"E_min  = {num(f['e_min'])} examples, {_ci(f, 'e_min', 'examples')}",
                 f"B_crit = E_min/S_min = {num(f['b_crit'])} examples, "
                 f"{_ci(f, 'b_crit', 'examples')}"):
        out += wrap(line, "  ", "      ")
    out += wrap(f["bootstrap"]["explanation"], "  ", "  ")
    at_target = (f"monitor, online, at the target (EMA, beta {bs['beta']:g}): "
                 f"{num(on['at_target'])}, 95% interval {interval(*on['at_target_interval'])}")
    if on["at_target_interval"][0] is not None and not positive(on["at_target_interval"][0]):
        at_target += ": the smoothed |G|^2 is not resolved from 0 at the end"
    out += ["", *wrap(f"B_simple = tr(Sigma)/|G|^2, in examples, during the reference run "
                      f"(batch {bs['batch_size']} examples, lr {bs['lr']:.4g}, {bs['steps']} "
                      "steps):", "", ""),
            *wrap(at_target, "  ", "    "),
            f"  monitor, online, run average (mean tr(Sigma) / mean |G|^2): "
            f"{num(on['run_average'])}",
            f"  whole training split (exact), at the start {num(whole['at_start'])}, at the "
            f"target {num(whole['at_target'])}, run average {num(whole['run_average'])}",
            "  progress-weighted over the run, from B_simple_t of the whole split at step t:",
            f"    S_min = sum_t 1/(1 + B_simple_t/B) = {num(pred['s_min'])} steps",
            f"    E_min = sum_t B_simple_t/(1 + B_simple_t/B) = {num(pred['e_min'])} examples",
            f"    B_crit = E_min/S_min = {num(pred['b_crit'])} examples (the fit: "
            f"{num(f['b_crit'])} examples; ratio fit/predicted "
            f"{num(ratio(f['b_crit'], pred['b_crit']), 3)})",
            "",
            f"wall time {result['wall_s']:.1f} s ({result['device']}, {result['threads']} "
            f"thread{'s' * (result['threads'] != 1)}, torch {result['torch']})"]
    if not bs["same_steps_as_sweep"]:
        out.append("warning: the monitored reference run did not reach the target at the same "
                   "step as the sweep's run")
    return "\n".join(out)


def write_runs_csv(result: dict[str, Any], path: str | Path) -> None:
    """One row per run (each batch size's best learning rate, each repeat): batch_size, steps,
    examples, lr, repeat -- readable by :func:`gradstats.critical.load_runs`."""
    with Path(path).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["batch_size", "steps", "examples", "lr", "repeat"])
        w.writeheader()
        for r in result["runs"]:
            w.writerow({"batch_size": r["batch_size"], "steps": r["steps"],
                        "examples": r["examples"], "lr": repr(float(r["lr"])),
                        "repeat": r["repeat"]})


def save_outputs(result: dict[str, Any], out: str | Path, plot: bool = True) -> list[str]:
    """Writes ``runs.csv``, ``result.json`` and (with ``plot``) ``critical_batch.png`` under
    ``out``; returns the messages saying what was written."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    write_runs_csv(result, d / "runs.csv")
    write_json(result, str(d / "result.json"))
    msgs = [f"wrote {d / 'runs.csv'} and {d / 'result.json'}"]
    if plot:
        save_plot(result, d / "critical_batch.png")
        msgs.append(f"wrote {d / 'critical_batch.png'}")
    return msgs


def save_plot(result: dict[str, Any], path: str | Path) -> None:
    """S against E (log-log) with the fitted hyperbola and its asymptotes, and B_simple over
    the reference run beside B_crit. Raises ``MissingDependency`` without matplotlib."""
    require_matplotlib("the critical-batch plot", DEMO_EXTRA)
    f, runs, bs = result["fit"], result["runs"], result["b_simple"]
    s_min, e_min, b_crit = f["s_min"], f["e_min"], f["b_crit"]
    fig, axes = new_figure(1, 2, (12.5, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    ax, ax2 = axes[0]
    sizes = [r["batch_size"] for r in result["batch_sizes"]]
    lo_b, hi_b = min(sizes) / 4, max(sizes) * 4
    grid = [lo_b * (hi_b / lo_b) ** (i / 199) for i in range(200)]
    ax.plot([b * s_min + e_min for b in grid], [s_min + e_min / b for b in grid],
            color=COLORS["b_simple"], label="fit: (S/S_min - 1)(E/E_min - 1) = 1")
    ax.axhline(s_min, color=COLORS["b_simple"], ls=":", lw=0.8)
    ax.axvline(e_min, color=COLORS["b_simple"], ls=":", lw=0.8)
    ax.scatter([r["examples"] for r in runs], [r["steps"] for r in runs], s=12,
               color=COLORS["runs"], alpha=0.5, zorder=3, label="runs (best lr per batch size)")
    ax.scatter([r["mean_examples"] for r in result["batch_sizes"]],
               [r["mean_steps"] for r in result["batch_sizes"]], marker="_", s=200,
               color=COLORS["runs"], zorder=3, label="mean per batch size")
    for r in result["batch_sizes"]:
        ax.annotate(f"B={r['batch_size']}", (r["mean_examples"], r["mean_steps"]), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")
    ax.scatter([2 * e_min], [2 * s_min], marker="*", s=160, color=COLORS["fit"], zorder=4,
               label=f"B = B_crit = {sig(b_crit)} examples: (2 E_min, 2 S_min)")
    pred = bs["predicted"]
    ps, pe = pred["s_min"], pred["e_min"]
    if positive(ps) and positive(pe):
        ax.plot([b * ps + pe for b in grid], [ps + pe / b for b in grid],
                color=COLORS["predicted"], ls="--",
                label=f"predicted from B_simple of one run (B_crit {sig(pe / ps)} examples)")
    log_axis(ax, "x")
    log_axis(ax, "y")
    ax.set_xlabel("examples to reach the target, E (examples)")
    ax.set_ylabel("steps to reach the target, S (steps)")
    ax.set_title(f"{result['data']['name']}, training loss <= "
                 f"{result['config']['target_loss']:g}; S_min = {sig(s_min)} steps, "
                 f"E_min = {sig(e_min)} examples")
    ax.legend(fontsize=8, loc="upper right")

    h = [r for r in bs["history"] if positive(r["b_simple_ema"])]
    if h:
        ax2.plot([r["step"] for r in h], [r["b_simple_ema"] for r in h], color=COLORS["predicted"],
                 lw=1, label=f"monitor, online (EMA, beta {bs['beta']:g})")
    w = [r for r in bs["whole_split_history"] if positive(r["b_simple"])]
    if w:
        ax2.plot([r["step"] for r in w], [r["b_simple"] for r in w], color="black", lw=1.5,
                 label="whole training split")
    ax2.axhline(b_crit, color=COLORS["fit"], label=f"B_crit = {sig(b_crit)} examples (fit)")
    if positive(pred["b_crit"]):
        ax2.axhline(pred["b_crit"], color=COLORS["predicted"], ls="--",
                    label=f"progress-weighted B_simple = {sig(pred['b_crit'])} examples")
    ymin, ymax = log_limits([r["b_simple_ema"] for r in h] + [r["b_simple"] for r in w]
                            + [b_crit, pred["b_crit"]]) or (1.0, 1e4)
    lo, hi = f["b_crit_ci"]
    if positive(lo) and positive(hi):
        ax2.axhspan(max(lo, ymin), min(hi, ymax), color=COLORS["fit"], alpha=0.15,
                    label=f"{100 * f['confidence']:g}% interval of B_crit")
    log_axis(ax2)
    ax2.set_ylim(ymin, ymax)
    ax2.set_xlabel(f"steps of the reference run (batch {bs['batch_size']} examples, "
                   f"lr {bs['lr']:.3g})")
    ax2.set_ylabel(B_SIMPLE_LABEL)
    ax2.set_title("B_simple during training vs B_crit")
    ax2.legend(fontsize=8, loc="best")
    save(fig, str(path))


# ----------------------------------------------------------------------------- command line
def _batch_sizes(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers >= 2, got {text!r}") from None
    if len(sizes) < 2 or len(set(sizes)) != len(sizes) or min(sizes) < 2:
        raise argparse.ArgumentTypeError(
            f"must be at least two distinct integers >= 2, got {text!r}")
    return tuple(sorted(sizes))


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SweepConfig()
    p.add_argument("--out", metavar="DIR",
                   help="write runs.csv, result.json and critical_batch.png there (the plot needs "
                        f"matplotlib: {DEMO_EXTRA})")
    p.add_argument("--batch-sizes", type=_batch_sizes, metavar="B1,B2,...",
                   help="batch sizes to sweep, in examples (default "
                        f"{','.join(map(str, d.batch_sizes))}; --quick: "
                        f"{','.join(map(str, QUICK.batch_sizes))})")
    p.add_argument("--target-loss", type=positive_float, metavar="L",
                   help=f"training-split cross-entropy to reach (default {d.target_loss:g}; "
                        f"--quick: {QUICK.target_loss:g})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="split, initialisation, shuffling and bootstrap seed")
    p.add_argument("--quick", action="store_true",
                   help="a fast, rough sweep (fewer sizes and learning rates, looser target)")
    p.add_argument("--repeats", type=positive_int, metavar="N",
                   help=f"runs per (batch size, learning rate), each with its own "
                        f"initialisation and data order (default {d.repeats}; --quick: "
                        f"{QUICK.repeats})")
    p.add_argument("--lr-candidates", type=positive_int, metavar="N",
                   help=f"learning rates per batch size before any extension (default "
                        f"{d.lr_candidates}; --quick: {QUICK.lr_candidates})")
    p.add_argument("--max-steps", type=positive_int, metavar="N",
                   help=f"give up on a run after N steps (default {d.max_steps}; --quick: "
                        f"{QUICK.max_steps})")
    p.add_argument("--reference-batch", type=positive_int, metavar="B",
                   help="batch size (examples) of the run that measures B_simple (default: the "
                        "middle one)")
    p.add_argument("--n-boot", type=int, metavar="N",
                   help=f"bootstrap resamples for the intervals (default {d.n_boot}; --quick: "
                        f"{QUICK.n_boot})")
    p.add_argument("--threads", type=positive_int, default=d.threads, metavar="N",
                   help=f"torch intra-op threads while training (default {d.threads})")
    p.add_argument("--no-plot", action="store_true", help="do not write critical_batch.png")
    p.add_argument("--quiet", action="store_true", help="no progress lines and no report")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    base = QUICK if args.quick else SweepConfig()
    over: dict[str, Any] = {"seed": args.seed, "threads": args.threads}
    for name in ("batch_sizes", "target_loss", "repeats", "lr_candidates", "max_steps",
                 "reference_batch", "n_boot"):
        v = getattr(args, name)
        if v is not None:
            over[name] = v
    return replace(base, **over)


def run_cli(args: argparse.Namespace) -> int:
    """``gradstats critical-batch``."""
    cfg = config_from_args(args)
    cfg.check()
    if args.out and not args.no_plot:
        require_matplotlib("critical_batch.png", DEMO_EXTRA + " (or pass --no-plot)")
    data = load_digits(cfg.seed, cfg.test_fraction)
    cfg.check(len(data.y_train))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        result = run_sweep(cfg, data=data, log=None if args.quiet else log)
    except SweepError as e:
        print(f"gradstats critical-batch: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(format_result(result))
    if args.out:
        for msg in save_outputs(result, args.out, plot=not args.no_plot):
            if not args.quiet:
                print(msg)
    return 0
