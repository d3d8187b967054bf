"""One case end to end: run it (here, or on the DDP pool), classify errors, compare every
statistic with the float64 reference, and name the outcome.

Outcomes: ``match``; ``refusal`` (gradstats raised a ContractError/ValueError/RuntimeError
whose message names a cause listed in :data:`REFUSALS` for a feature the case has);
``mismatch`` (a silent wrong statistic, a failure); ``limited`` (values beyond the tolerance,
but no further from the float64 reference than torch's own computation in the case's low
precision: reported, not failed); ``unaccepted`` (a gradstats error not listed as legitimate
for the case, a failure); ``crash`` (an error from elsewhere that the same code without the
monitor does not raise, a failure); ``invalid`` (the code fails without the monitor too: a
generator problem, reported); ``hang`` (a DDP case that never finished, a failure).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import runner
from .reference import (Failure, Quantities, Reference, StepCheck, compare_copy, compare_step,
                        mark_limited, quantities)
from .runner import ErrorInfo, RankRecord, StepRecord
from .spec import Case, step_data

FAILING = ("mismatch", "unaccepted", "crash", "hang")


@dataclass(frozen=True)
class Refusal:
    key: str
    pattern: str
    applies: Callable[[Case, ErrorInfo, RankRecord], bool]
    why: str


def _nonfinite(rec: RankRecord, err: ErrorInfo) -> bool:
    steps = [s for s in rec.steps if s.step == err.step]
    return any(g is not None and not bool(torch.isfinite(g).all())
               for s in steps for g in s.grads.values())


#: the refusals accepted as legitimate, each for the feature that makes it so
REFUSALS = (
    Refusal("no gradstats rule (unsupported='error')", r"no gradstats rule for",
            lambda c, e, r: (c.unsupported == "error" and e.phase == "construct"
                             and any(re.search(rf"\b{re.escape(m)}\b", e.message)
                                     for m in c.no_rule_modules)),
            "README: parameters of layers without a rule raise under unsupported='error', "
            "named"),
    Refusal("recurrent module under unsupported='error'",
            r"(?i)unsupported='fallback'|\b(lstm|gru)\b",
            lambda c, e, r: (c.unsupported == "error"
                             and any(b in ("lstm", "gru") for b in c.model.blocks)),
            "README: layers without a rule are refused by name under unsupported='error' "
            "(nn.LSTM/nn.GRU are not taken at the function level; the message says to use "
            "the fallback)"),
    Refusal("BatchNorm in training mode", r"training mode",
            lambda c, e, r: c.train and "batchnorm" in c.model.blocks,
            "README: refused by name (per-example gradients are not defined)"),
    Refusal("trainable parameters changed (step skipped, monitor re-attached)",
            r"trainable parameters changed",
            lambda c, e, r: c.freeze is not None and e.phase == "step" and e.step == c.freeze[0],
            "the monitor's documented re-attach on the step requires_grad flipped (raised, or "
            "the step skipped with this reason)"),
    Refusal("unequal micro-batches under a mean loss", r"unequal|different sizes",
            lambda c, e, r: (c.loss_reduction == "mean"
                             and len({b for rk in c.ranks for b in rk}) > 1),
            "README: refused by name"),
    Refusal("non-finite gradients", r"non-finite", lambda c, e, r: _nonfinite(r, e),
            "README: refused by name, when torch's own .grad is non-finite"),
)


@dataclass
class Outcome:
    kind: str
    events: list[str] = field(default_factory=list)   # accepted refusals met on the way
    details: list[str] = field(default_factory=list)  # what failed, one line each
    message: str = ""
    unresolved: list[str] = field(default_factory=list)  # comparisons below the resolution

    @property
    def failed(self) -> bool:
        return self.kind in FAILING


def accepted(case: Case, err: ErrorInfo, rec: RankRecord) -> Refusal | None:
    if not (err.named and err.raised_in_gradstats):
        return None
    for r in REFUSALS:
        if re.search(r.pattern, err.message) and r.applies(case, err, rec):
            return r
    return None


def _collateral(err: ErrorInfo) -> bool:
    """An error a DDP rank gets because its peer stopped (closed connections, timeout)."""
    return err.type == "DistBackendError" or bool(re.search(
        r"connection closed by peer|connection reset|timed out|gloo", err.message, re.I))


def run_records(case: Case, pool, with_monitor: bool = True) -> list[RankRecord]:
    if case.ddp:
        return pool.run(case, with_monitor=with_monitor)
    return [runner.run(case, with_monitor=with_monitor)]


def evaluate(case: Case, pool=None) -> Outcome:
    try:
        records = run_records(case, pool)
    except TimeoutError as e:
        return Outcome("hang", message=str(e))
    events, bad = [], []
    for rec in records:
        for st in rec.steps:
            if st.stats is not None and (st.stats["skipped"] or not st.stats["measured"]):
                # a step skipped with a reason is judged like a refusal of that step
                skip = ErrorInfo("step", st.step, "skipped step", str(st.stats["skip_reason"]),
                                 True, True, "StepStats.skip_reason")
                r = accepted(case, skip, rec)
                if r is not None:
                    events.append(r.key)
                    st.stats = None  # only .grad is compared on this step
        for err in rec.errors:
            r = accepted(case, err, rec)
            if r is not None:
                events.append(r.key)
            else:
                bad.append(err)
    if case.ddp and any(not _collateral(e) for rec in records for e in rec.errors):
        # a rank that raised left its peer waiting in a collective: judge the first cause
        bad = [e for e in bad if not _collateral(e)]
    if bad:
        return _classify(case, pool, bad[0], events)
    if case.train and "batchnorm" in case.model.blocks:
        # per-example gradients are not defined: there is nothing to compare with
        steps = [s.step for rec in records for s in rec.steps if s.stats is not None]
        if steps:
            return Outcome("mismatch", events, [
                f"steps {steps}: statistics returned for a model with BatchNorm in training "
                "mode (refused by name in the README)"])
        return Outcome("refusal", events, message=events[-1] if events else "")
    try:
        out = _compare(case, records)
    except Exception as e:  # noqa: BLE001 - the reference itself failed: a generator problem
        return Outcome("invalid", events, [f"reference: {type(e).__name__}: {e}"],
                       f"reference: {type(e).__name__}: {e}")
    out.events = events
    if out.kind == "match" and any(rec.stopped for rec in records):
        out.kind, out.message = "refusal", events[-1] if events else ""
    return out


def _classify(case: Case, pool, err: ErrorInfo, events: list[str]) -> Outcome:
    line = f"[{err.phase}, step {err.step}] {err.type}: {err.message} ({err.where})"
    try:
        plain = run_records(case, pool, with_monitor=False)
    except TimeoutError as e:
        return Outcome("hang", events, [line], f"plain run: {e}")
    plain_errors = [e for r in plain for e in r.errors]
    if plain_errors:
        p = plain_errors[0]
        return Outcome("invalid", events, [line], f"{p.type}: {p.message} ({p.where})")
    kind = "unaccepted" if err.named and err.raised_in_gradstats else "crash"
    return Outcome(kind, events, [line], f"{err.type}: {err.message}")


def _compare(case: Case, records: list[RankRecord]) -> Outcome:
    ref = Reference(case)
    low: Reference | None = None
    flags: list[str] = []
    failures: list[Failure] = []
    unresolved: list[str] = []
    by_step: dict[int, list[tuple[int, StepRecord]]] = {}
    for rec in records:
        for s in rec.steps:
            by_step.setdefault(s.step, []).append((rec.rank, s))
    for step, recs in sorted(by_step.items()):
        chunks = step_data(case, step)
        rec0 = recs[0][1]
        layers = next((list(s.stats["layers"]) for _, s in recs if s.stats), None)
        G, c, ranks = ref.per_example(rec0.weights, rec0.trainable, chunks)
        q, orphans = quantities(case, G, c, ranks, layers)
        for rank, s in recs:
            if s.stats is None and not s.grads:
                continue  # the run stopped before this step's backward finished
            chk = compare_step(case, s, q, orphans, rank)
            fails = chk.failures()
            if fails and case.precision != "float64":
                low = low or Reference(case, low=True)
                mark_limited(fails, _low_check(case, low, s, chunks, q, orphans, layers, rank))
            flags += chk.flags
            failures += fails
            unresolved += chk.unresolved
            if s.copy_grads is not None:
                mine = [ch for ch in chunks if ch.rank == rank][:1]
                Gc, _, _ = ref.per_example(s.copy_weights, s.copy_trainable, mine)
                chk = compare_copy(case, step, s.copy_grads, Gc, Gc)
                fails = chk.failures()
                if fails and case.precision != "float64":
                    low = low or Reference(case, low=True)
                    Gl, _, _ = low.per_example(s.copy_weights, s.copy_trainable, mine)
                    grads_low = {k: g.mean(0) for k, g in Gl.items()}
                    mark_limited(fails, compare_copy(case, step, grads_low, Gc, Gc))
                flags += chk.flags
                failures += fails
    details = flags + [str(f) for f in sorted(failures, key=lambda f: f.limited)]
    kind = ("mismatch" if flags or any(not f.limited for f in failures)
            else "limited" if failures else "match")
    return Outcome(kind, details=details, unresolved=unresolved)


def _low_check(case: Case, low: Reference, s: StepRecord, chunks, q: Quantities,
               orphans: list[str], layers: list[str] | None, rank: int) -> StepCheck:
    """The comparisons of ``compare_step`` with torch's own per-example gradients in the case's
    precision standing in for the monitor."""
    G, c, ranks = low.per_example(s.weights, s.trainable, chunks)
    # |G|^2 from a .grad stored in the parameters' precision, as the monitor's is
    ql, _ = quantities(case, G, c, ranks, layers, store=None if case.autocast else case.dtype)
    stats = {"measured": True, "skipped": False, "skip_reason": None, "n": ql.n,
             "per_example": ql.S_i[ql.ranks == rank]}
    g = ql.groups[""]
    stats.update(_group_view(g))
    stats["layers"] = {}
    for L in layers or []:
        gl = ql.groups.get(f"layer:{L}")
        if gl is not None:
            v = _group_view(gl)
            stats["layers"][L] = (v["tr"], v["g2"], v["b"], v["defined"])
    fake = StepRecord(s.step, s.weights, s.trainable, grads=dict(ql.grad), stats=stats)
    return compare_step(case, fake, q, orphans, rank)


def _group_view(g: dict[str, float]) -> dict:
    tr, g2 = g["tr"], g["g2"]
    defined = not math.isnan(tr) and g2 > 0
    return {"tr": tr, "g2": g2, "b": tr / g2 if defined else math.nan, "defined": defined}
