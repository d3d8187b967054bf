"""The training setups the property suite draws: a model, its inputs and a training loop.

A :class:`Case` is plain, picklable data; :func:`cases` is the hypothesis strategy. Features are
drawn independently so that their combinations are reached; the only constraints are the ones
torch itself imposes on valid training code (listed at each ``fix-up``).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from typing import Any

import torch
from hypothesis import strategies as st

from .models import BLOCKS, NO_RULE_BLOCKS, Batch, ModelSpec

PRECISIONS = ("float32", "float64", "bf16_params", "fp16_params", "autocast_bf16",
              "autocast_fp16")
STYLES = ("positional", "keyword", "nested", "dataclass")
COPY_TIMES = ("none", "before", "between", "after")

#: relative tolerance of each precision: float32 and float64 as the issue sets them; the low
#: precisions at 16 unit roundoffs (bfloat16 16 * 2^-8 = 2^-4, float16 16 * 2^-11 = 2^-7)
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2.0 ** -4, "float16": 2.0 ** -7}


@dataclass(frozen=True)
class Case:
    model: ModelSpec
    T: int | None                        # positions per example (None: flat [B, d] inputs)
    ranks: tuple[tuple[int, ...], ...]   # micro-batch sizes per rank (one rank without DDP)
    style: str
    precision: str
    mode: str
    unsupported: str
    loss_reduction: str
    accumulation: str
    seq_reduce: str
    steps: int
    freeze: tuple[int, int, bool] | None  # (step, block index, trainable from that step on)
    copy: str                            # when a deepcopy of the model runs in a step
    train: bool
    dataset_size: int | None
    data_seed: int

    @property
    def ddp(self) -> bool:
        return len(self.ranks) > 1

    @property
    def k(self) -> int:
        return len(self.ranks[0])

    @property
    def n_total(self) -> int:
        return sum(map(sum, self.ranks))

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return {"float64": torch.float64, "bf16_params": torch.bfloat16,
                "fp16_params": torch.float16}.get(self.precision, torch.float32)

    @property
    def autocast(self) -> torch.dtype | None:
        return {"autocast_bf16": torch.bfloat16, "autocast_fp16": torch.float16}.get(
            self.precision)

    @property
    def tol(self) -> float:
        low = self.autocast or self.dtype
        return TOLERANCE[str(low).removeprefix("torch.")]

    @property
    def resolution(self) -> float:
        """``(16 u)^2``, ``u`` the unit roundoff of the lowest precision the case computes in:
        a layer (or an example) whose squared gradient norm is below this fraction of the
        model's is at the rounding noise of the backward pass (an error of ``u`` relative to the
        whole backward signal is ``16 u`` of it) and is not compared."""
        u = torch.finfo(self.autocast or self.dtype).eps / 2
        return (16 * u) ** 2

    @property
    def no_rule_modules(self) -> list[str]:
        """Modules owning parameters that no documented layer rule takes."""
        out = [f"blocks.{i}" for i, b in enumerate(self.model.blocks) if b in NO_RULE_BLOCKS]
        if self.model.pool == "queries_param":
            out.append("pool")
        return out

    def features(self) -> list[str]:
        """Tags for the per-feature summary."""
        m = self.model
        tags = ["input=tokens" if m.tokens else ("input=seq" if m.seq else "input=flat"),
                f"style={self.style}", f"precision={self.precision}", f"mode={self.mode}",
                f"unsupported={self.unsupported}", f"loss={self.loss_reduction}",
                f"accumulation={self.accumulation}", f"k={self.k}", f"steps={self.steps}",
                f"checkpoint={m.checkpoint}", "train" if self.train else "eval"]
        sizes = [b for r in self.ranks for b in r]
        tags.append("sizes=equal" if len(set(sizes)) == 1 else "sizes=unequal")
        tags += sorted({f"block={b}" for b in m.blocks})
        if m.blocks.count("shared") > 1:
            tags.append("shared-module-across-blocks")
        if m.pos:
            tags.append("pos=wpe(arange(T))")
        if self.T is not None and self.T in sizes:
            tags.append("T==B")
        if m.pool != "none":
            tags.append(f"pool={m.pool}")
        if m.tied:
            tags.append("tied-embedding-head")
        if m.mask:
            tags.append("mask")
        if self.freeze:
            tags.append("unfreeze-mid-run" if self.freeze[2] else "freeze-mid-run")
        if self.copy != "none":
            tags.append(f"deepcopy={self.copy}")
        if self.dataset_size:
            tags.append("dataset_size")
        if not self.ddp and 0 in sizes:
            tags.append("empty-micro-batch")
        if self.ddp:
            tags.append("ddp")
            if any(b == 0 for b in sizes):
                tags.append("ddp-empty-rank")
            if len({sum(r) for r in self.ranks}) > 1:
                tags.append("ddp-unequal-ranks")
        return tags


_DRAWN = itertools.count()


def _divisor(rnd: random.Random, n: int, per_group: int = 1) -> int:
    """A divisor ``d`` of ``n`` with at least ``per_group`` values per group (``n/d``)."""
    return rnd.choice([d for d in range(1, n + 1) if n % d == 0 and n // d >= per_group])


def _pick(rnd: random.Random, weighted: dict) -> Any:
    return rnd.choices(list(weighted), weights=list(weighted.values()))[0]


@st.composite
def cases(draw, ddp_share: float = 0.15) -> Case:
    """A training setup. Sizes come from hypothesis (which favours the edges: 1, 9, T == B),
    all drawn in one fixed order; the categorical features from a ``random.Random`` with the
    stated frequencies, so that each is reached about as often as intended and independently
    of the others. Its seed mixes a hypothesis draw with a counter, because hypothesis repeats
    its draws (edges, mutations of earlier cases) and would repeat whole feature sets with
    them; the run stays deterministic, and a case is replayed from its printed ``Case``, which
    holds every value."""
    width, d_in, hidden, vocab = draw(st.tuples(*[st.integers(3, 12)] * 4))
    n_out, n_queries = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    k, steps, n_blocks = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 4))
    sizes = draw(st.lists(st.integers(1, 9), min_size=6, max_size=6))
    T_drawn = draw(st.integers(1, 9))
    rnd = random.Random(draw(st.integers(0, 2 ** 32 - 1)) * 1_000_003 + next(_DRAWN))

    kind = _pick(rnd, {"tokens": 0.4, "seq": 0.35, "flat": 0.25})
    tokens, seq = kind == "tokens", kind != "flat"
    blocks = tuple(rnd.choice(BLOCKS) for _ in range(n_blocks))
    if blocks.count("shared") == 1 and rnd.random() < 0.5:
        blocks += ("shared",)  # one Linear module used by two blocks
    ddp = rnd.random() < ddp_share
    if ddp:
        empty = rnd.random() < 0.4
        ranks = tuple(tuple(0 if empty and rnd.random() < 0.4 else sizes[3 * r + j]
                            for j in range(k)) for r in range(2))
        if not sum(map(sum, ranks)):
            ranks = ((1,) + ranks[0][1:], ranks[1])
    elif rnd.random() < 0.5:
        ranks = ((sizes[0],) * k,)
    else:
        ranks = (tuple(sizes[:k]),)
    if not ddp and k > 1 and rnd.random() < 0.15:  # an empty micro-batch, as on an empty rank
        j = rnd.randrange(1, k)
        ranks = (ranks[0][:j] + (0,) + ranks[0][j + 1:],)
    T = None
    if seq:
        T = next(b for r in ranks for b in r if b) if rnd.random() < 0.3 else T_drawn
    pool = rnd.choice(("none", "mean", "queries_param", "queries_embedding")) \
        if seq and not tokens else "none"
    checkpoint = _pick(rnd, {"none": 0.4, "reentrant": 0.3, "nonreentrant": 0.3}) if blocks \
        else "none"
    # BatchNorm in training mode is refused by design: drawn less often, so that it does not
    # use up the cases
    train = rnd.random() < (0.25 if "batchnorm" in blocks else 0.8)
    if "batchnorm" in blocks and any(b * (T or 1) < 2 for r in ranks for b in r):
        train = False  # fix-up: torch's BatchNorm refuses one value per channel in training
    model = ModelSpec(
        tokens=tokens, d_in=d_in, width=width, hidden=hidden, n_out=n_out, vocab=vocab,
        seq=seq, blocks=blocks, heads=_divisor(rnd, width),
        # fix-up: torch's group_norm refuses groups of one value (one example at one
        # position: the reference's per-example calls)
        groups=_divisor(rnd, width, 2 if (T or 1) == 1 else 1),
        pos=seq and rnd.random() < 0.5, max_T=9, pool=pool, n_queries=n_queries,
        tied=tokens and rnd.random() < 0.5, mask=rnd.random() < 0.5, checkpoint=checkpoint,
        group_size=rnd.randint(1, max(1, len(blocks))), dropout=0.0 if train else 0.3,
        act=rnd.choice(("tanh", "gelu", "relu", "silu")), seed=rnd.getrandbits(31))
    freeze = None
    # fix-up: flipping requires_grad under DDP is unsupported by DDP itself (its buckets are
    # built at construction), so freezing is drawn for single-process runs
    if not ddp and steps > 1 and blocks and rnd.random() < 0.3:
        freeze = (rnd.randint(1, steps - 1), rnd.randrange(len(blocks)), rnd.random() < 0.5)
    n_total = sum(map(sum, ranks))
    precision = _pick(rnd, {"float32": 0.3, "float64": 0.2, "bf16_params": 0.125,
                            "fp16_params": 0.125, "autocast_bf16": 0.125,
                            "autocast_fp16": 0.125})
    if precision.startswith("autocast") and "lstm" in blocks:
        precision = "float32"  # fix-up: oneDNN has no LSTM primitive under CPU autocast
    return Case(
        model=model, T=T, ranks=ranks, style=rnd.choice(STYLES), precision=precision,
        mode=rnd.choice(("hooks", "fused")), unsupported=rnd.choice(("error", "fallback")),
        loss_reduction=rnd.choice(("mean", "sum")), accumulation=rnd.choice(("mean", "sum")),
        seq_reduce=rnd.choice(("sum", "mean")), steps=steps, freeze=freeze,
        # fix-up: a deepcopy of a DDP-wrapped model is not a training setup DDP supports
        copy=rnd.choice(COPY_TIMES[1:]) if not ddp and rnd.random() < 0.3 else "none",
        train=train,
        dataset_size=n_total + rnd.randint(0, 20) if n_total > 1 and rnd.random() < 0.2
        else None,
        data_seed=rnd.getrandbits(31))


# ------------------------------------------------------------------------------------ data
@dataclass
class Chunk:
    """One micro-batch of one rank: its inputs (already rounded to the model's input dtype),
    targets, and each example's loss weight ``c`` (``u_i = c g_i``)."""

    rank: int
    micro: int
    x: torch.Tensor
    mask: torch.Tensor | None
    target: torch.Tensor
    c: float

    def __len__(self) -> int:
        return self.x.shape[0]

    def example(self, i: int) -> Chunk:
        sl = slice(i, i + 1)
        return replace(self, x=self.x[sl], mask=None if self.mask is None else self.mask[sl],
                       target=self.target[sl])


def input_dtype(case: Case) -> torch.dtype:
    return case.dtype if case.dtype != torch.float32 else torch.float32


def step_data(case: Case, step: int) -> list[Chunk]:
    """Every rank's micro-batches of ``step``, from the case's data seed (the same in every
    process)."""
    m = case.model
    g = torch.Generator().manual_seed(case.data_seed + 7919 * step)
    world, k = len(case.ranks), case.k
    chunks = []
    for j in range(k):
        for r in range(world):
            b = case.ranks[r][j]
            lead = (b,) if case.T is None else (b, case.T)
            if m.tokens:
                x = torch.randint(0, m.vocab, lead, generator=g)
                target = torch.randint(0, m.vocab, lead, generator=g)
            else:
                x = torch.randn(*lead, m.d_in, generator=g, dtype=torch.float64)
                x = x.to(input_dtype(case))
                out_lead = (b,) if m.pool != "none" or case.T is None else lead
                target = torch.randn(*out_lead, m.n_out, generator=g, dtype=torch.float64)
                target = target.to(torch.float32 if case.dtype != torch.float64
                                   else torch.float64)
            mask = None
            if m.mask:
                mask = (torch.rand(*lead, generator=g) < 0.75).to(
                    input_dtype(case) if not m.tokens else torch.float32)
            c = (1.0 / b if (case.loss_reduction == "mean" and b) else 1.0)
            c /= (k if case.accumulation == "mean" else 1) * world
            chunks.append(Chunk(r, j, x, mask, target, c))
    return chunks


def call(model, case: Case, chunk: Chunk):
    """The model called in the case's input style."""
    x, mask = chunk.x, chunk.mask
    if case.style == "positional":
        return model(x) if mask is None else model(x, mask)
    if case.style == "keyword":
        return model(input_ids=x) if mask is None else model(input_ids=x, mask=mask)
    if case.style == "nested":
        return model(input_ids=x, extra={} if mask is None else {"mask": mask})
    return model(Batch(x, mask))
