"""A pool of gloo worker processes on loopback (CPU), started once and reused by many tests.

``GlooPool(4)`` spawns 4 processes that join one gloo group and wait for tasks. ``pool.run(fn,
*args, world=2, **kwargs)`` runs ``fn(rank, group, *args, **kwargs)`` on ranks ``0..world-1``
(``group`` the process group of exactly those ranks, made once at start-up; the other workers sit
the task out) and returns their results in rank order. ``fn`` must be a module-level function
(workers import it by name) and its arguments and result picklable; keep results small (floats,
lists, numpy arrays).

A task that raises on any rank, or does not finish within ``timeout_s``, takes the pool down
(its ranks may be stuck in a collective) and raises here with the remote traceback; the next
``run`` starts a fresh pool. ``shared_pool(n)`` keeps one pool per size for the whole pytest
session, closed at exit, so that test modules share the start-up cost.
"""
from __future__ import annotations

import atexit
import datetime
import os
import queue
import tempfile
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

_CTX = mp.get_context("spawn")


def _worker(rank: int, world: int, init_file: str, inbox: Any, outbox: Any,
            timeout_s: float) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    # new_group is collective over the whole group: every worker makes every prefix group.
    groups = {w: dist.new_group(list(range(w))) for w in range(2, world)}
    groups[world] = dist.group.WORLD
    outbox.put(("ready", rank, True, None))
    while True:
        task = inbox.get()
        if task is None:
            break
        tid, fn, args, kwargs, w = task
        if rank >= w:
            outbox.put((tid, rank, True, None))
            continue
        try:
            outbox.put((tid, rank, True, fn(rank, groups.get(w), *args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises
            outbox.put((tid, rank, False, traceback.format_exc()))
    dist.barrier()
    dist.destroy_process_group()


class GlooPool:
    """``world_size`` gloo processes on CPU; see the module docstring."""

    def __init__(self, world_size: int, timeout_s: float = 60.0) -> None:
        if world_size < 2:
            raise ValueError(f"world_size must be >= 2, got {world_size}")
        self.world_size, self.timeout_s = world_size, timeout_s
        self._procs: list[Any] = []
        self._tid = 0

    def _start(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="gloo_pool_")
        init = os.path.join(self._dir.name, "init")
        self._out = _CTX.Queue()
        self._inboxes = [_CTX.Queue() for _ in range(self.world_size)]
        self._procs = [_CTX.Process(target=_worker, daemon=True,
                                    args=(r, self.world_size, init, self._inboxes[r], self._out,
                                          self.timeout_s))
                       for r in range(self.world_size)]
        try:
            for p in self._procs:
                p.start()
        except BaseException:
            self.close(force=True)
            raise
        self._collect("ready", self.world_size, self.timeout_s + 60.0)

    def _collect(self, tid: Any, n: int, timeout_s: float) -> list[Any]:
        got: dict[int, Any] = {}
        errors: list[str] = []
        deadline = time.monotonic() + timeout_s
        while len(got) + len(errors) < n:
            try:
                t, rank, ok, value = self._out.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close(force=True)
                    why = f"ranks {dead} died" if dead else f"no answer within {timeout_s:.0f} s"
                    raise TimeoutError(f"gloo pool: {why} (ranks answered: {sorted(got)}); the "
                                       "pool was stopped") from None
                continue
            if t != tid:
                continue
            if ok:
                got[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            self.close(force=True)
            raise RuntimeError("gloo pool task failed; the pool was stopped\n" + "\n".join(errors))
        return [got[r] for r in sorted(got)]

    def run(self, fn: Callable[..., Any], *args: Any, world: int | None = None,
            **kwargs: Any) -> list[Any]:
        """``[fn(rank, group, *args, **kwargs) for rank < world]``, run on the workers at once."""
        w = self.world_size if world is None else world
        if not 2 <= w <= self.world_size:
            raise ValueError(f"world must be in [2, {self.world_size}], got {w}")
        if not self._procs:
            self._start()
        self._tid += 1
        for box in self._inboxes:
            box.put((self._tid, fn, args, kwargs, w))
        return self._collect(self._tid, self.world_size, self.timeout_s)[:w]

    def close(self, force: bool = False) -> None:
        """Stops the workers (``force``: kill them, for a pool left in a bad state)."""
        if not self._procs:
            return
        if not force:
            for box in self._inboxes:
                box.put(None)
            for p in self._procs:
                if p.pid is not None:
                    p.join(timeout=30)
        for p in self._procs:
            if p.pid is not None and p.is_alive():
                p.kill()
                p.join(timeout=10)
        self._procs = []
        self._dir.cleanup()

    def __enter__(self) -> GlooPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_SHARED: dict[int, GlooPool] = {}


def shared_pool(world_size: int) -> GlooPool:
    """One :class:`GlooPool` of this size per process (pytest session), closed at exit."""
    if world_size not in _SHARED:
        _SHARED[world_size] = GlooPool(world_size)
        atexit.register(_SHARED[world_size].close)
    return _SHARED[world_size]
