"""Random models as users write them: torch.nn pieces and plain functional code.

Nothing here knows about gradstats. A :class:`ModelSpec` is plain data (it travels to the DDP
workers); :func:`build` turns it into a module with a fixed seed, so every process and the
float64 reference build the same model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

#: block kinds the generator draws from
BLOCKS = ("mlp", "twice", "shared", "layernorm", "rmsnorm", "user_rmsnorm", "groupnorm",
          "batchnorm", "conv1d", "hf_conv1d", "layerscale", "attention", "lstm", "gru")
#: blocks whose modules own parameters no gradstats layer rule is documented for
NO_RULE_BLOCKS = frozenset({"user_rmsnorm", "hf_conv1d", "layerscale", "lstm", "gru"})
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclass(frozen=True)
class ModelSpec:
    tokens: bool          # token ids through nn.Embedding, else float features through nn.Linear
    d_in: int
    width: int
    hidden: int
    n_out: int
    vocab: int
    seq: bool             # inputs carry a position axis T
    blocks: tuple[str, ...]
    heads: int            # divides width (MultiheadAttention)
    groups: int           # divides width (GroupNorm)
    pos: bool             # nanoGPT's h + wpe(torch.arange(T))
    max_T: int
    pool: str             # "none" | "mean" | "queries_param" | "queries_embedding"
    n_queries: int
    tied: bool            # lm head weight is the token embedding's (nanoGPT)
    mask: bool            # a [B, T] (or [B]) multiplicative mask passed next to the input
    checkpoint: str       # "none" | "reentrant" | "nonreentrant"
    group_size: int       # consecutive blocks per checkpointed group
    dropout: float
    act: str
    seed: int


@dataclass
class Batch:
    """The dataclass input style: ``model(Batch(x, mask))``."""

    x: torch.Tensor
    mask: torch.Tensor | None = None


class UserRMSNorm(nn.Module):
    """A hand-written RMSNorm, as in LLaMA and T5 code: ``w * x / rms(x)``."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


class HFConv1D(nn.Module):
    """Hugging Face GPT-2's ``Conv1D``: a linear map with the weight stored ``[nx, nf]``."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(size_out)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str, p: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.drop, self.act = nn.Dropout(p), act

    def forward(self, h):
        return h + self.fc2(self.drop(ACTIVATIONS[self.act](self.fc1(h))))


class Twice(nn.Module):
    """One Linear applied twice per forward (weight sharing within a block)."""

    def __init__(self, lin: nn.Linear, act: str, calls: int = 2):
        super().__init__()
        self.lin, self.act, self.calls = lin, act, calls

    def forward(self, h):
        y = h
        for _ in range(self.calls):
            y = ACTIVATIONS[self.act](self.lin(y))
        return h + y


class LayerScale(nn.Module):
    """A residual branch scaled by a learned per-channel gamma (CaiT, ConvNeXt)."""

    def __init__(self, width: int, act: str):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.gamma = nn.Parameter(torch.full((width,), 0.5))
        self.act = act

    def forward(self, h):
        return h + self.gamma * ACTIVATIONS[self.act](self.fc(h))


class HFBlock(nn.Module):
    def __init__(self, width: int, act: str):
        super().__init__()
        self.c_fc, self.act = HFConv1D(width, width), act

    def forward(self, h):
        return h + ACTIVATIONS[self.act](self.c_fc(h))


class ChannelsFirst(nn.Module):
    """A channels-first module (GroupNorm, BatchNorm1d, Conv1d) on ``[B, T, C]`` or ``[B, C]``."""

    def __init__(self, inner: nn.Module, residual: bool, act: str):
        super().__init__()
        self.inner, self.residual, self.act = inner, residual, act

    def forward(self, h):
        if h.dim() == 3:
            y = self.inner(h.transpose(1, 2)).transpose(1, 2)
        elif isinstance(self.inner, nn.Conv1d):
            y = self.inner(h.unsqueeze(-1)).squeeze(-1)
        else:
            y = self.inner(h)
        return h + ACTIVATIONS[self.act](y) if self.residual else y


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, h):
        x = h if h.dim() == 3 else h.unsqueeze(1)
        y, _ = self.attn(x, x, x, need_weights=False)
        return h + (y if h.dim() == 3 else y.squeeze(1))


class Recurrent(nn.Module):
    def __init__(self, kind: str, width: int):
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(width, width, batch_first=True)

    def forward(self, h):
        x = h if h.dim() == 3 else h.unsqueeze(1)
        y, _ = self.rnn(x)  # tuple output: (out, state)
        return h + (y if h.dim() == 3 else y.squeeze(1))


class QueryPool(nn.Module):
    """Attention pooling over positions with learned queries: ``q_proj`` is a Linear applied to
    the batch-free ``[Q, w]`` queries (a raw parameter, or an embedding of ``arange(Q)``)."""

    def __init__(self, width: int, n_queries: int, learned: bool):
        super().__init__()
        if learned:
            self.queries = nn.Parameter(torch.randn(n_queries, width) * 0.5)
        else:
            self.table = nn.Embedding(n_queries, width)
        self.q_proj = nn.Linear(width, width)
        self.n_queries = n_queries

    def forward(self, h):
        if hasattr(self, "queries"):
            q = self.queries
        else:
            q = self.table(torch.arange(self.n_queries, device=h.device))
        q = self.q_proj(q)
        att = torch.softmax(h @ q.T / math.sqrt(h.shape[-1]), dim=1)   # [B, T, Q]
        return att.transpose(1, 2) @ h                                  # [B, Q, w]


def _block(kind: str, s: ModelSpec, shared: nn.Linear | None) -> nn.Module:
    w, act = s.width, s.act
    if kind == "mlp":
        return MLP(w, s.hidden, act, s.dropout)
    if kind == "twice":
        return Twice(nn.Linear(w, w), act)
    if kind == "shared":
        return Twice(shared, act, calls=1)
    if kind == "layernorm":
        return nn.LayerNorm(w)
    if kind == "rmsnorm":
        return nn.RMSNorm(w)
    if kind == "user_rmsnorm":
        return UserRMSNorm(w)
    if kind == "groupnorm":
        return ChannelsFirst(nn.GroupNorm(s.groups, w), False, act)
    if kind == "batchnorm":
        return ChannelsFirst(nn.BatchNorm1d(w), False, act)
    if kind == "conv1d":
        return ChannelsFirst(nn.Conv1d(w, w, 3, padding=1), True, act)
    if kind == "hf_conv1d":
        return HFBlock(w, act)
    if kind == "layerscale":
        return LayerScale(w, act)
    if kind == "attention":
        return SelfAttention(w, s.heads)
    if kind in ("lstm", "gru"):
        return Recurrent(kind, w)
    raise ValueError(f"unknown block kind {kind!r}")


class Net(nn.Module):
    """stem (+ wpe) (* mask) -> blocks (optionally checkpointed in groups) -> pool -> head.

    Accepts every input style the generator uses: ``net(x)``, ``net(x, mask)``,
    ``net(input_ids=x, mask=m)``, ``net(input_ids=x, extra={"mask": m})``, ``net(Batch(x, m))``.
    ``plain = True`` switches checkpointing off (the reference computes without it).
    """

    def __init__(self, s: ModelSpec):
        super().__init__()
        self.spec, self.plain = s, False
        if s.tokens:
            self.wte = nn.Embedding(s.vocab, s.width)
        else:
            self.stem = nn.Linear(s.d_in, s.width)
        if s.pos:
            self.wpe = nn.Embedding(s.max_T, s.width)
        shared = nn.Linear(s.width, s.width) if "shared" in s.blocks else None
        self.blocks = nn.ModuleList(_block(k, s, shared) for k in s.blocks)
        if s.pool.startswith("queries"):
            self.pool = QueryPool(s.width, s.n_queries, s.pool == "queries_param")
        if s.tokens:
            self.head = nn.Linear(s.width, s.vocab, bias=False)
            if s.tied:
                self.head.weight = self.wte.weight
        else:
            n_in = s.width * (s.n_queries if s.pool.startswith("queries") else 1)
            self.head = nn.Linear(n_in, s.n_out)

    def _groups(self) -> list[list[nn.Module]]:
        blocks, g = list(self.blocks), max(1, self.spec.group_size)
        return [blocks[i:i + g] for i in range(0, len(blocks), g)]

    def forward(self, x=None, mask=None, *, input_ids=None, extra=None):
        if isinstance(x, Batch):
            x, mask = x.x, x.mask
        if input_ids is not None:
            x = input_ids
        if extra is not None:
            mask = extra.get("mask")
        s = self.spec
        h = self.wte(x) if s.tokens else self.stem(x)
        if s.pos:
            h = h + self.wpe(torch.arange(h.shape[1], device=h.device))
        if mask is not None:
            h = h * mask.unsqueeze(-1).to(h.dtype)
        for group in self._groups():
            def run(t, group=group):
                for b in group:
                    t = b(t)
                return t
            if s.checkpoint == "none" or self.plain:
                h = run(h)
            else:
                h = checkpoint(run, h, use_reentrant=s.checkpoint == "reentrant")
        if s.pool == "mean":
            h = h.mean(1)
        elif s.pool.startswith("queries"):
            h = self.pool(h).flatten(1)
        return self.head(h)


def build(s: ModelSpec) -> Net:
    """The model of ``s`` with seeded weights (every parameter jittered, so norm weights and
    biases are not at their symmetric initial values)."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(s.seed)
        net = Net(s)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.2 * torch.randn_like(p))
    finally:
        torch.random.set_rng_state(gen_state)
    return net


def example_losses(s: ModelSpec, out: torch.Tensor, target: torch.Tensor,
                   seq_reduce: str) -> torch.Tensor:
    """``[B]`` per-example losses (at least float32): squared error for features, cross-entropy
    for tokens, summed or averaged over positions."""
    if out.dtype in (torch.bfloat16, torch.float16):
        out = out.float()
    if s.tokens:
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1),
                              reduction="none").view(target.shape)
    else:
        per = (out - target.to(out.dtype)).square().sum(-1)
    if per.dim() == 2:
        per = per.sum(1) if seq_reduce == "sum" else per.mean(1)
    return per
