"""The per-step accumulators the rules and ops write in place and ``step()`` reads at once.

One column per example counted this step (micro-batches one after another), one row (slot) per
covered parameter:

* ``E`` ``[slots, capacity]`` float64: ``E[s, i] = |u_i^(s)|^2``, example ``i``'s squared
  gradient norm for parameter ``s`` in autograd's units (cross terms of shared parameters
  included);
* ``P`` ``[slots, 2 PROBES]`` float64: the contract probe ``<V_j, sum_i u_i>`` and the bound on
  its rounding, summed over the step;
* ``r`` ``[capacity]`` float64: each example's loss-reduction factor (``1/b`` for a mean over a
  micro-batch of ``b``, ``1/n_tokens`` for a token mean, 1 for a sum), written when its
  forward starts.

Buffers are laid out once and grown only between steps (or when a forward would overflow them in
eager mode), so nothing is allocated per layer or per step, and a compiled graph sees the same
tensors every step. Under ``torch.compile`` the column offset is a tensor, so counting examples
never recompiles; a step that overflows the capacity there is reported unmeasured and the
buffers grow.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .rules.base import PROBES

__all__ = ["Accumulators", "Packing"]

#: compiled forwards per step whose sizes are kept (more: the step is reported unmeasured)
MAX_TRACED_FORWARDS = 256


class Accumulators:
    def __init__(self, slots: int, device: torch.device, capacity: int = 1024) -> None:
        self.slots, self.device = slots, device
        f64 = dict(dtype=torch.float64, device=device)
        self.E = torch.zeros(slots, capacity, **f64)
        self.P = torch.zeros(slots, 2 * PROBES, **f64)
        self.r = torch.zeros(capacity, **f64)
        self.count = 0  # examples counted this step (eager)
        self.forwards = 0
        # compiled forwards count in tensors instead (no host value to guard on); 0-dim CPU
        # tensors, so reading them never waits for a GPU
        self.dev_count = torch.zeros((), dtype=torch.int64)
        self.dev_forwards = torch.zeros((), dtype=torch.int64)
        self.dev_sizes = torch.zeros(MAX_TRACED_FORWARDS, dtype=torch.int64)
        # per covered layer: its backwards in compiled graphs this step (gradstats.traced)
        self.hits = torch.zeros(0, dtype=torch.int64)
        self.fast_sizes: list[int] = []  # eager forwards on the traced path (gradstats.traced)
        self.fast_hits: list[int] = []  # and each layer's backwards there

    @property
    def capacity(self) -> int:
        return self.E.shape[1]

    def begin_forward(self, batch: int, reduction: float | torch.Tensor,
                      traced: bool = False) -> torch.Tensor:
        """Columns ``[batch]`` for the examples of a forward that starts now; records their
        reduction factor. ``traced``: a forward on the traced path (:mod:`gradstats.traced`),
        whose size ``step()`` reads from :meth:`traced` rather than from a forward record."""
        if traced and not torch.compiler.is_compiling():
            rows = self.begin_forward(batch, reduction)
            self.fast_sizes.append(batch)
            return rows
        if torch.compiler.is_compiling():
            rows = self.dev_count + torch.arange(batch, device=self.device)
            rows = rows.clamp_max(self.capacity - 1)  # overflow: found and reported in step()
            self.dev_sizes.index_fill_(
                0, self.dev_forwards.clamp_max(MAX_TRACED_FORWARDS - 1).reshape(1), batch)
            self.dev_count.add_(batch)
            self.dev_forwards.add_(1)
            factor = torch.as_tensor(reduction, dtype=torch.float64, device=self.device)
            self.r.index_copy_(0, rows, factor.expand(batch))
            return rows
        start = self.count
        if start + batch > self.capacity:
            self._grow(max(2 * self.capacity, start + batch))
        self.count += batch
        self.forwards += 1
        rows = torch.arange(start, start + batch, device=self.device)
        self.r[start:start + batch] = reduction
        return rows

    def _grow(self, capacity: int) -> None:
        E = torch.zeros(self.slots, capacity, dtype=torch.float64, device=self.device)
        r = torch.zeros(capacity, dtype=torch.float64, device=self.device)
        E[:, :self.E.shape[1]] = self.E
        r[:self.r.shape[0]] = self.r
        self.E, self.r = E, r

    def totals(self) -> tuple[int, int, bool]:
        """``(examples, forwards, overflowed)`` counted this step (a step's forwards are either
        all eager or all compiled: their columns would overlap otherwise)."""
        n_dev = int(self.dev_count)
        n = self.count + n_dev
        return n, self.forwards + int(self.dev_forwards), n > self.capacity

    def traced(self) -> tuple[list[int], int, list[int]]:
        """``(sizes, forwards, hits)``: the batch sizes of this step's forwards on the traced
        path (compiled ones: at most ``MAX_TRACED_FORWARDS`` kept), their number, and each
        layer's backwards counted on that path."""
        if self.fast_sizes:
            return list(self.fast_sizes), len(self.fast_sizes), list(self.fast_hits)
        f = int(self.dev_forwards)
        if f == 0:
            return [], 0, []
        return self.dev_sizes[:min(f, MAX_TRACED_FORWARDS)].tolist(), f, self.hits.tolist()

    def reset(self, grow_to: int = 0) -> None:
        """Zeroes what this step wrote (and grows the buffers for the next one if asked)."""
        n = min(self.count + int(self.dev_count), self.capacity)
        self.E[:, :n].zero_()
        self.r[:n].zero_()
        self.P.zero_()
        self.count = self.forwards = 0
        self.fast_sizes.clear()
        self.fast_hits = [0] * len(self.hits)
        self.dev_count.zero_()
        self.dev_forwards.zero_()
        self.hits.zero_()
        if grow_to > self.capacity:
            self._grow(grow_to)


class Packing:
    """Named float64 fields in one flat device tensor, so that one all-reduce (of the fields
    named in ``reduced``, which come first) and one transfer to the host carry them all."""

    def __init__(self, reduced: tuple[str, ...], **fields: torch.Tensor):
        order = [*reduced, *(k for k in fields if k not in reduced)]
        self._shapes = {k: tuple(fields[k].shape) for k in order}
        self._reduced = sum(fields[k].numel() for k in reduced)
        self.flat = torch.cat([fields[k].reshape(-1).to(torch.float64) for k in order])
        self._host: np.ndarray | None = None

    def reduced_view(self) -> torch.Tensor:
        return self.flat[:self._reduced]

    def to_host(self) -> dict[str, np.ndarray]:
        self._host = self.flat.cpu().numpy()
        out, at = {}, 0
        for k, shape in self._shapes.items():
            size = math.prod(shape)
            out[k] = self._host[at:at + size].reshape(shape)
            at += size
        return out

    def finite(self) -> bool:
        return bool(np.isfinite(self._host).all())
