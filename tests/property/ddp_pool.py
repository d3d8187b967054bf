"""One pool of two gloo processes (loopback) that runs every DDP case of a test session.

Each worker keeps its process group between cases. After a case in which any rank raised, a
collective may be left half-done on one rank, so both workers rebuild their process group on a
fresh port before the next case; a worker that does not answer is killed and the pool
restarted.
"""
from __future__ import annotations

import io
import os
import queue
import socket
from datetime import timedelta

import torch
import torch.multiprocessing as mp

WORLD = 2
#: gloo's collective timeout (a rank whose peer raised mid-step gives up after this)
COLLECTIVE_TIMEOUT_S = 20
#: how long the parent waits for a case's result
RESULT_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _init(rank: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def _worker(rank: int, port: int, inbox, outbox) -> None:
    import torch.distributed as dist

    from . import runner

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _init(rank, port)
    while True:
        msg = inbox.get()
        if msg is None:
            break
        kind, payload = msg
        if kind == "reinit":
            if dist.is_initialized():
                dist.destroy_process_group()
            _init(rank, payload)
            outbox.put((rank, b""))
            continue
        case, with_monitor = payload
        try:
            rec = runner.run(case, rank=rank, world=WORLD, with_monitor=with_monitor)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            rec = runner.RankRecord(rank, errors=[runner.ErrorInfo.of(e, "train", 0)],
                                    stopped=True)
        if rec.errors:
            # closing this rank's connections makes a peer blocked in a collective fail at
            # once instead of after the timeout
            dist.destroy_process_group()
        outbox.put((rank, _dumps(rec)))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class DDPPool:
    """``run(case)`` -> one :class:`~runner.RankRecord` per rank."""

    def __init__(self) -> None:
        self._procs: list = []
        self.restarts = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._inboxes = [ctx.Queue() for _ in range(WORLD)]
        self._outbox = ctx.Queue()
        port = _free_port()
        self._procs = [ctx.Process(target=_worker, args=(r, port, self._inboxes[r],
                                                         self._outbox), daemon=True)
                       for r in range(WORLD)]
        for p in self._procs:
            p.start()

    def _gather(self) -> list[bytes]:
        got: dict[int, bytes] = {}
        while len(got) < WORLD:
            try:
                rank, data = self._outbox.get(timeout=RESULT_TIMEOUT_S)
            except queue.Empty:
                self._kill()
                self.restarts += 1
                raise TimeoutError(f"a DDP rank did not finish within {RESULT_TIMEOUT_S} s "
                                   f"(ranks done: {sorted(got)})") from None
            got[rank] = data
        return [got[r] for r in range(WORLD)]

    def run(self, case, with_monitor: bool = True) -> list:
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self._kill()
            self._start()
        for box in self._inboxes:
            box.put(("case", (case, with_monitor)))
        records = [_loads(d) for d in self._gather()]
        if any(r.errors for r in records):
            port = _free_port()
            for box in self._inboxes:
                box.put(("reinit", port))
            self._gather()
        return records

    def _kill(self) -> None:
        for p in self._procs:
            if p.pid is None:
                continue
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        self._procs = []

    def close(self) -> None:
        if self._procs and all(p.is_alive() for p in self._procs):
            for box in self._inboxes:
                box.put(None)
            for p in self._procs:
                p.join(timeout=30)
        self._kill()
