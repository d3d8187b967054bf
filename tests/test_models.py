"""Whole models: a small GPT (token and position embeddings, LayerNorm, causal attention, MLP,
tied output head) against a per-example autograd loop of the unmodified model."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstats import GradStatsMonitor
from monitor_problems import reference_stats


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab=23, d=16, heads=2, layers=2, T=7):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        self.register_buffer("mask", torch.triu(torch.ones(T, T, dtype=torch.bool), 1))

    def forward(self, ids):
        T = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        for b in self.blocks:
            x = b(x, self.mask[:T, :T])
        return self.head(self.ln(x))


def per_example_loss(model, ids, targets):
    logits = model(ids)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)


def loop_reference(model, ids, targets):
    params = dict(model.named_parameters())  # a tied weight appears once
    rows = []
    for i in range(ids.shape[0]):
        m = copy.deepcopy(model)
        mp = dict(m.named_parameters())
        loss = per_example_loss(m, ids[i:i + 1], targets[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, [mp[n] for n in params])
        rows.append(torch.cat([g.double().flatten() for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["hooks", "fused"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_tiny_gpt_matches_per_example_autograd(mode, dtype, rtol):
    torch.manual_seed(10)
    model = TinyGPT().to(dtype)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 23, (6, 7), generator=g)
    targets = torch.randint(0, 23, (6, 7), generator=g)
    ref = reference_stats(loop_reference(copy.deepcopy(model).double(), ids, targets))
    mon = GradStatsMonitor(model, mode=mode)
    assert "head.weight" not in mon.parameter_names  # the tied weight is counted once
    per_example_loss(model, ids, targets).mean().backward()
    stats = mon.step()
    torch.testing.assert_close(stats.per_example_sq_norms, ref["sq"], rtol=rtol, atol=0)
    assert abs(stats.b_simple - ref["b"]) <= 10 * rtol * abs(ref["b"])
    assert abs(stats.tr_sigma - ref["tr"]) <= rtol * abs(ref["tr"])
