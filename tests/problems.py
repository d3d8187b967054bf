"""Test problems as data (BackPACK style): every check runs over the same cases."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearCase:
    name: str
    B: int
    mid: tuple[int, ...]  # the middle dims, flattened into T by the ops
    d_in: int
    d_out: int

    @property
    def T(self) -> int:
        t = 1
        for m in self.mid:
            t *= m
        return t


LINEAR_CASES = [
    LinearCase("T1", 6, (), 9, 5),
    LinearCase("T1-B1", 1, (), 7, 3),
    LinearCase("T1-wide", 4, (), 130, 257),
    LinearCase("seq", 5, (7,), 11, 13),
    LinearCase("seq-B1", 1, (9,), 6, 4),
    LinearCase("seq-long", 3, (40,), 5, 6),  # Gram costlier than direct here
    LinearCase("seq-d1", 3, (4,), 1, 1),
    LinearCase("4d", 3, (2, 5), 8, 3),
    LinearCase("5d", 2, (3, 2, 4), 6, 5),
]
