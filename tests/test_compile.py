"""``torch.compile(model)`` with the monitor attached: in hooks and fused modes the statistics
are those of eager mode (which the other tests hold to per-example autograd), step after step,
on an MLP, a small transformer (Embedding, LayerNorm, attention, tied head) and a CNN. The
monitor's hooks run outside the compiled graphs (a graph break around each); the graph counts
are reported in README "torch.compile"."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstats import GradStatsMonitor

pytest.importorskip("torch._inductor")


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 37, d: int = 16, T: int = 6, heads: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=2)
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, -1))
        x = x + self.out(F.gelu(self.fc(self.ln2(x))))
        return self.head(self.lnf(x))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(7, 12), nn.Tanh(), nn.LayerNorm(12), nn.Linear(12, 12),
                         nn.ReLU(), nn.Linear(12, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))


def _batches(name: str, gen: torch.Generator, steps: int) -> list[tuple[torch.Tensor, ...]]:
    out = []
    for s in range(steps):
        B = 5 + s  # the batch size changes between steps
        if name == "gpt":
            idx = torch.randint(0, 37, (B, 6), generator=gen)
            out.append((idx, torch.randint(0, 37, (B, 6), generator=gen)))
        elif name == "cnn":
            out.append((torch.randn(B, 3, 8, 8, generator=gen, dtype=torch.float64),
                        torch.randint(0, 4, (B,), generator=gen)))
        else:
            out.append((torch.randn(B, 7, generator=gen, dtype=torch.float64),
                        torch.randint(0, 3, (B,), generator=gen)))
    return out


BUILD = {"mlp": _mlp, "gpt": TinyGPT, "cnn": _cnn}


def _loss(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                           reduction="sum" if name == "gpt" else "mean")


def _run(name: str, mode: str, compiled: bool, seed: int, data) -> list:
    torch.manual_seed(seed)
    model = BUILD[name]().double()
    mon = GradStatsMonitor(model, mode=mode, loss_reduction="sum" if name == "gpt" else "mean")
    f = torch.compile(model, backend="inductor") if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rows = []
    for x, y in data:
        _loss(name, f(x), y).backward()
        st = mon.step()
        rows.append((st.per_example_sq_norms.clone(), st.tr_sigma, st.g2,
                     {k: v.tr_sigma for k, v in st.layers.items()},
                     [p.grad.clone() for p in model.parameters()]))
        opt.step()
        opt.zero_grad()
    mon.detach()
    return rows


@pytest.mark.parametrize("mode", ["hooks", "fused"])
@pytest.mark.parametrize("name", ["mlp", "gpt", pytest.param("cnn", marks=pytest.mark.slow)])
def test_compiled_model_gives_the_eager_statistics(name: str, mode: str):
    torch._dynamo.reset()
    seed = torch.seed() % 2**31
    data = _batches(name, torch.Generator().manual_seed(seed), 3)
    eager = _run(name, mode, False, seed, data)
    comp = _run(name, mode, True, seed, data)
    for (sq_e, tr_e, g2_e, lay_e, gr_e), (sq_c, tr_c, g2_c, lay_c, gr_c) in zip(eager, comp):
        # the training itself is unchanged by the monitor under compile
        for a, b in zip(gr_e, gr_c):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sq_c, sq_e, rtol=1e-9, atol=0)
        assert math.isclose(tr_c, tr_e, rel_tol=1e-8) and math.isclose(g2_c, g2_e, rel_tol=1e-7)
        assert lay_c.keys() == lay_e.keys()
        for k in lay_e:
            assert math.isclose(lay_c[k], lay_e[k], rel_tol=1e-7, abs_tol=1e-12), k
