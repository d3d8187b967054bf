"""nn.MultiheadAttention through the monitor, against a per-example autograd loop of the
unmodified module (torch.func has no CPU batching rule for attention)."""
import copy

import pytest
import torch
from torch import nn

from gradstats import GradStatsMonitor
from monitor_problems import reference_stats


class AttnModel(nn.Module):
    def __init__(self, batch_first, kdim=None, vdim=None, bias=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=vdim,
                                          bias=bias)
        self.head = nn.Linear(8, 3)
        self.batch_first = batch_first

    def forward(self, q, k, v, key_padding_mask=None, attn_mask=None):
        if not self.batch_first:
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        o, _ = self.attn(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        if not self.batch_first:
            o = o.transpose(0, 1)
        return self.head(o).mean(1)


CASES = {
    "batch-first": dict(batch_first=True),
    "seq-first": dict(batch_first=False),
    "kdim-vdim": dict(batch_first=True, kdim=5, vdim=6),
    "no-bias": dict(batch_first=True, bias=False),
}


def _inputs(case, B=5, L=4, S=6):
    g = torch.Generator().manual_seed(3)
    kd = case.get("kdim") or 8
    vd = case.get("vdim") or 8
    q = torch.randn(B, L, 8, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, kd, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, vd, generator=g, dtype=torch.float64)
    if kd == 8 and vd == 8:
        k = v = torch.randn(B, S, 8, generator=g, dtype=torch.float64)
    y = 1.0 + torch.randn(B, 3, generator=g, dtype=torch.float64)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -2:] = True
    attn_mask = torch.triu(torch.ones(L, S, dtype=torch.bool), diagonal=S - L + 1)
    return q, k, v, y, kpm, attn_mask


def _loss(model, q, k, v, y, kpm, am):
    return (model(q, k, v, kpm, am) - y).square().sum(-1)


def _reference(model, q, k, v, y, kpm, am):
    names = [n for n, p in model.named_parameters()]
    rows = []
    for i in range(q.shape[0]):
        m = copy.deepcopy(model)
        loss = _loss(m, q[i:i + 1], k[i:i + 1], v[i:i + 1], y[i:i + 1], kpm[i:i + 1], am).sum()
        grads = torch.autograd.grad(loss, [dict(m.named_parameters())[n] for n in names])
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["hooks", "fused"])
@pytest.mark.parametrize("name", list(CASES))
def test_multihead_attention_matches_per_example_loop(name, mode):
    torch.manual_seed(8)
    model = AttnModel(**CASES[name]).double()
    q, k, v, y, kpm, am = _inputs(CASES[name])
    ref = reference_stats(_reference(model, q, k, v, y, kpm, am))
    plain = model(q, k, v, kpm, am)
    mon = GradStatsMonitor(model, mode=mode)
    torch.testing.assert_close(model(q, k, v, kpm, am), plain)  # same forward
    model.zero_grad()
    _loss(model, q, k, v, y, kpm, am).mean().backward()
    stats = mon.step()
    torch.testing.assert_close(stats.per_example_sq_norms, ref["sq"], rtol=1e-8, atol=0)
    assert abs(stats.b_simple - ref["b"]) <= 1e-8 * abs(ref["b"])
    assert "attn" in stats.layers and "attn.out_proj" not in stats.layers
    mon.detach()
    assert "forward" not in vars(model.attn)


def test_float32_attention():
    torch.manual_seed(9)
    model = AttnModel(batch_first=True)
    q, k, v, y, kpm, am = (t.float() if t.is_floating_point() else t
                           for t in _inputs(CASES["batch-first"]))
    ref = reference_stats(_reference(copy.deepcopy(model).double(), q.double(), k.double(),
                                     v.double(), y.double(), kpm, am))
    mon = GradStatsMonitor(model)
    _loss(model, q, k, v, y, kpm, am).mean().backward()
    stats = mon.step()
    torch.testing.assert_close(stats.per_example_sq_norms, ref["sq"], rtol=1e-5, atol=0)


def test_add_bias_kv_is_refused():
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_bias_kv"):
        GradStatsMonitor(model)
