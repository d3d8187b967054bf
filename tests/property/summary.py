"""Per-feature counts of the outcomes, written to a text file (and printed under ``-s``), and the
failing cases with everything needed to replay them."""
from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict

from .check import Outcome
from .spec import Case

KINDS = ("match", "refusal", "limited", "mismatch", "unaccepted", "crash", "hang", "invalid")


class Summary:
    def __init__(self, profile: str):
        self.profile = profile
        self.start = time.monotonic()
        self.rows: list[tuple[Case, Outcome, float]] = []

    def add(self, case: Case, outcome: Outcome, seconds: float) -> None:
        self.rows.append((case, outcome, seconds))

    @property
    def failures(self) -> list[tuple[Case, Outcome, float]]:
        return [r for r in self.rows if r[1].failed]

    def table(self) -> str:
        per: dict[str, Counter] = defaultdict(Counter)
        refusals: dict[str, Counter] = defaultdict(Counter)
        for case, out, _ in self.rows:
            for tag in ["ALL", *case.features()]:
                per[tag][out.kind] += 1
                per[tag]["cases"] += 1
                for ev in dict.fromkeys(out.events):
                    refusals[tag][ev] += 1
        width = max(len(t) for t in per)
        head = f"{'feature':<{width}}  {'cases':>5} " + " ".join(f"{k:>10}" for k in KINDS)
        lines = [f"gradstats property suite, profile {self.profile!r}: {len(self.rows)} cases "
                 f"in {time.monotonic() - self.start:.0f} s", head, "-" * len(head)]
        for tag in sorted(per, key=lambda t: (t != "ALL", t)):
            c = per[tag]
            lines.append(f"{tag:<{width}}  {c['cases']:>5} "
                         + " ".join(f"{c[k]:>10}" for k in KINDS))
        lines += ["", "accepted refusals, by message and feature:"]
        for tag in sorted(refusals, key=lambda t: (t != "ALL", t)):
            for msg, n in sorted(refusals[tag].items()):
                if tag == "ALL" or n:
                    lines.append(f"  {tag:<{width}}  {n:>5}  {msg}")
        causes = Counter()
        for _, out, _ in self.rows:
            if out.kind != "match" and out.kind != "refusal":
                causes[(out.kind, _cause(out))] += 1
        below = sum(1 for _, out, _ in self.rows if out.unresolved)
        lines += ["", f"cases with layers below the precision's resolution (not compared, see "
                      f"Case.resolution): {below}"]
        lines += ["", "non-matching outcomes, by first reason:"]
        for (kind, cause), n in causes.most_common():
            lines.append(f"  {n:>5}  {kind:<10}  {cause}")
        return "\n".join(lines)

    def write(self, path: str) -> str:
        text = self.table()
        with open(path, "w") as f:
            f.write(text + "\n")
        with open(path.removesuffix(".txt") + "-cases.json", "w") as f:
            json.dump([{"outcome": out.kind, "events": out.events, "message": out.message,
                        "details": out.details[:20], "unresolved": out.unresolved[:20],
                        "seconds": round(sec, 3),
                        "features": case.features(), "case": asdict(case)}
                       for case, out, sec in self.rows if out.kind not in ("match",)],
                      f, indent=1, default=str)
        return text


def _cause(out: Outcome) -> str:
    line = out.message or (out.details[0] if out.details else "")
    words = line.split()
    # drop step numbers and values so that one cause groups its cases
    keep = [w for w in words if not any(ch.isdigit() for ch in w)]
    return " ".join(keep)[:150]
