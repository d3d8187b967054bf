"""One regression test per defect of the issue "Real training code: nothing silently wrong".

Every statistic is compared with per-example autograd on a float64 copy (torch.func, or an
explicit per-example loop where torch.func has no batching rule), on fresh random inputs.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

from gradstats import ContractError, GradStatsMonitor
from monitor_problems import reference_stats

MODES = ["hooks", "fused"]


def per_example(model: nn.Module, loss_of, *inputs) -> torch.Tensor:
    """[N, P] per-example gradients of ``loss_of(model output for one example)``."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def f(p, *xs):
        return loss_of(functional_call(model, p, tuple(x[None] for x in xs)))

    g = vmap(grad(f), in_dims=(None,) + (0,) * len(inputs))(params, *inputs)
    return torch.cat([v.flatten(1) for v in g.values()], 1)


def per_example_loop(model: nn.Module, loss_of, *inputs) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(inputs[0].shape[0]):
        out = model(*(x[i:i + 1] for x in inputs))
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss_of(out), params)]))
    return torch.stack(rows)


def check(stats, grads: torch.Tensor, rtol: float = 1e-9) -> None:
    ref = reference_stats(grads)
    torch.testing.assert_close(stats.per_example_sq_norms, ref["sq"], rtol=rtol, atol=0)
    assert math.isclose(stats.tr_sigma, ref["tr"], rel_tol=rtol)
    assert abs(stats.g2 - ref["g2"]) <= rtol * ref["gbar_sq"] * 10


def sq(out: torch.Tensor) -> torch.Tensor:
    return out.square().sum()


def _seed():
    return torch.seed() % 2**31


# ------------------------------------------------------------------ 1. activation checkpointing
class _Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.n, self.a, self.b = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(self.n(x))))


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.blocks = nn.ModuleList([_Block(6, 9), _Block(6, 9)])
        self.out = nn.Linear(6, 3)
        self.reentrant = reentrant

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x) if self.reentrant is None else checkpoint(b, x, use_reentrant=self.reentrant)
        return self.out(x).mean(1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reentrant", [False, True])
def test_1_checkpointing_keeps_gradients_and_counts_norms_once(mode, reentrant):
    torch.manual_seed(_seed())
    model = _Checkpointed(reentrant).double()
    plain = _Checkpointed(None).double()
    plain.load_state_dict(model.state_dict())
    X = torch.randn(7, 4, 5, dtype=torch.float64)
    grads = per_example(plain, sq, X)
    mon = GradStatsMonitor(model, mode=mode, loss_reduction="sum")
    for _ in range(2):
        model.zero_grad()
        sq(model(X)).backward()
        stats = mon.step()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(flat, grads.sum(0), rtol=1e-10, atol=1e-12)  # training gradient
    check(stats, grads)
    assert stats.verified or stats.step > 3


# ------------------------------------------------------------------ 2. batch-free inputs, T == B
class _NanoGPT(nn.Module):
    def __init__(self, V=13, T=8, d=6):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, d), nn.Embedding(T, d)
        self.head = nn.Linear(d, 3)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        return self.head(torch.tanh(x)).mean(1)


class _LearnedQueries(nn.Module):
    def __init__(self, Q=8, d=5):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(Q, d))
        self.q = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):  # x [B, T, d]; queries [Q, d] without the batch
        scores = torch.einsum("qd,btd->bqt", self.q(self.queries), x)
        return self.head(scores.softmax(-1) @ x).mean(1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make, inputs", [
    (_NanoGPT, lambda g: (torch.randint(0, 13, (8, 8), generator=g),)),
    (_LearnedQueries, lambda g: (torch.randn(8, 4, 5, generator=g, dtype=torch.float64),)),
], ids=["nanogpt-wpe", "learned-queries"])
def test_2_batch_free_inputs_with_T_equal_to_B(mode, make, inputs):
    torch.manual_seed(_seed())
    model = make().double()
    xs = inputs(torch.Generator().manual_seed(_seed()))
    grads = per_example(model, sq, *xs)
    mon = GradStatsMonitor(model, mode=mode, loss_reduction="sum")
    sq(model(*xs)).backward()
    check(mon.step(), grads)


# ------------------------------------------------------------------ 3. keyword and nested inputs
class _Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(10, 4), nn.Embedding(6, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids=None, attention_mask=None, extra=None):
        pos = torch.arange(input_ids.shape[1])[None]  # [1, T], as HF builds position ids
        x = self.wte(input_ids) + self.wpe(pos)
        x = x * attention_mask[..., None] * extra["scale"][:, None, None]
        return self.head(x).mean(1)


@pytest.mark.parametrize("mode", MODES)
def test_3_keyword_and_nested_inputs_find_the_batch(mode):
    torch.manual_seed(_seed())
    model = _Keyword().double()
    ids = torch.randint(0, 10, (6, 6))
    mask = (torch.rand(6, 6) > 0.2).double()
    scale = torch.rand(6, dtype=torch.float64) + 0.5

    class Wrapped(nn.Module):  # per-example reference through positional args
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, i, a, s):
            return self.m(input_ids=i, attention_mask=a, extra={"scale": s})

    grads = per_example(Wrapped(model), sq, ids, mask, scale)
    mon = GradStatsMonitor(model, mode=mode, loss_reduction="sum")
    sq(model(input_ids=ids, attention_mask=mask, extra={"scale": scale})).backward()
    check(mon.step(), grads)


# ------------------------------------------------------------------ 4. deepcopy
@pytest.mark.parametrize("mode", MODES)
def test_4_a_deepcopy_is_a_plain_model_with_its_own_weights(mode):
    torch.manual_seed(_seed())
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    mon = GradStatsMonitor(model, mode=mode, loss_reduction="sum")
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(1.5)
    x = torch.randn(6, 3, dtype=torch.float64)
    want = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    want.load_state_dict(copied.state_dict())
    torch.testing.assert_close(copied(x), want(x))  # the copy's own weights
    sq(copied(x)).backward()
    assert all(p.grad is not None for p in copied.parameters())
    assert all(p.grad is None for p in model.parameters())
    grads = per_example(model, sq, x)
    sq(model(x)).backward()
    check(mon.step(), grads)  # the copy's forward and backward counted nothing


# ------------------------------------------------------------------ 5. coverage changes
def test_5_coverage_changes_are_detected_and_the_monitor_adapts():
    torch.manual_seed(_seed())
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model[0].weight.requires_grad_(False)
    mon = GradStatsMonitor(model, loss_reduction="sum")
    x = torch.randn(6, 3, dtype=torch.float64)
    sq(model(x)).backward()
    mon.step()
    model.zero_grad()
    model[0].weight.requires_grad_(True)  # unfrozen
    sq(model(x)).backward()
    with pytest.warns(UserWarning, match="now trainable: 0.weight"):
        skipped = mon.step()
    assert skipped.skipped and "0.weight" in skipped.skip_reason
    model.zero_grad()
    model[2] = nn.Linear(5, 2).double()  # the head replaced
    sq(model(x)).backward()
    with pytest.warns(UserWarning, match="now trainable: 2.weight, 2.bias"):
        assert mon.step().skipped
    model.zero_grad()
    grads = per_example(model, sq, x)
    sq(model(x)).backward()
    check(mon.step(), grads)
    assert "0.weight" in mon.parameter_names


# ------------------------------------------------------------------ 6. low precision tolerance
def _mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 4)).to(dtype)


def test_6_bfloat16_autocast_raises_no_false_contract_error():
    torch.manual_seed(_seed())
    model = _mlp()
    mon = GradStatsMonitor(model)
    x = torch.randn(32, 12)
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().sum(1).mean()
        loss.backward()
        assert mon.step().n == 32
        model.zero_grad()


@pytest.mark.parametrize("fault", ["not-zeroed", "clipped", "l2"])
def test_6_bfloat16_parameters_still_detect_faults(fault):
    torch.manual_seed(_seed())
    model = _mlp(torch.bfloat16)
    mon = GradStatsMonitor(model)
    x = torch.randn(32, 12, dtype=torch.bfloat16)
    model(x).float().square().sum(1).mean().backward()
    mon.step()  # a clean step, probed
    if fault != "not-zeroed":
        model.zero_grad()
    model(x).float().square().sum(1).mean().backward()
    if fault == "clipped":
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5 * _grad_norm(model))
    elif fault == "l2":
        # 0.2 x param: at 0.05 the term hides under bf16 rounding of .grad for ~1 seed in 10
        # (the probe's detection limit in this precision), and the test would be flaky
        for p in model.parameters():
            p.grad.add_(p.detach(), alpha=0.2)
    match = {"not-zeroed": "not zeroed", "clipped": "scaled by", "l2": "x param added"}[fault]
    with pytest.raises(ContractError, match=match):
        mon.step()  # a warm-up step: probed


def _grad_norm(model):
    return float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in
                                                       model.parameters()])))


def test_6_groupnorm_of_rounding_noise_raises_no_false_error():
    """GroupNorm(C, C) followed by global pooling: its weight gradient is zero up to rounding."""
    torch.manual_seed(_seed())
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(8, 8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    mon = GradStatsMonitor(model)
    for _ in range(4):
        x = 3.0 + torch.randn(16, 3, 8, 8)
        model(x).square().sum(1).mean().backward()
        mon.step()
        model.zero_grad()


# ------------------------------------------------------------------ 7. MultiheadAttention
def test_7_attention_with_a_frozen_projection():
    torch.manual_seed(_seed())
    m = nn.MultiheadAttention(4, 2, batch_first=True).double()
    m.out_proj.weight.requires_grad_(False)
    q = torch.randn(3, 5, 4, dtype=torch.float64)
    grads = per_example_loop(m, lambda o: sq(o[0]), q, q, q)
    mon = GradStatsMonitor(m, loss_reduction="sum")
    sq(m(q, q, q)[0]).backward()
    check(mon.step(), grads)


def test_7_is_causal_without_a_mask_is_refused_as_torch_refuses_it():
    m = nn.MultiheadAttention(4, 2, batch_first=True)
    q = torch.randn(3, 5, 4)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        m(q, q, q, is_causal=True)
    GradStatsMonitor(m)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        m(q, q, q, is_causal=True)


class _TwiceAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        y = self.a(x, x, x)[0]
        return self.a(y, y, y)[0].mean(1)


@pytest.mark.parametrize("mode", MODES)
def test_7_attention_called_twice_gets_its_cross_terms(mode):
    torch.manual_seed(_seed())
    model = _TwiceAttention().double()
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    grads = per_example_loop(model, sq, x)
    mon = GradStatsMonitor(model, mode=mode, loss_reduction="sum")
    sq(model(x)).backward()
    check(mon.step(), grads)


# ------------------------------------------------------------------ 8. Gram accuracy
def test_8_auto_strategy_keeps_accuracy_with_a_common_component_through_the_monitor():
    torch.manual_seed(_seed())
    model = nn.Sequential(nn.Linear(24, 16))
    mon = GradStatsMonitor(model, loss_reduction="sum")
    c = 100 * torch.randn(24)
    x = c + 0.01 * torch.randn(3, 48, 24)
    g = torch.randn(3, 48, 16)
    g = g - g.mean(1, keepdim=True)
    (model(x) * g).sum().backward()
    got = mon.step().per_example_sq_norms
    ref = (torch.einsum("bto,bti->boi", g.double(), x.double()).square().sum((1, 2))
           + g.double().sum(1).square().sum(1))
    assert ((got - ref).abs() / ref).max() < 1e-3


# ------------------------------------------------------------------ 9. tuple outputs
class _LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        return self.head(out[:, -1] + h[0])


def test_9_lstm_with_tuple_outputs_under_the_fallback():
    torch.manual_seed(_seed())
    model = _LSTMClassifier().double()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    grads = per_example_loop(model, sq, x)
    mon = GradStatsMonitor(model, unsupported="fallback", loss_reduction="sum")
    sq(model(x)).backward()
    check(mon.step(), grads)


def test_9_lstm_at_default_settings_is_refused_by_name():
    model = _LSTMClassifier().double()
    GradStatsMonitor(model, loss_reduction="sum")
    with pytest.raises(RuntimeError, match="unsupported='fallback'"):
        sq(model(torch.randn(5, 6, 3, dtype=torch.float64))).backward()


# ------------------------------------------------------------------ 10. an empty batch
def test_10_an_empty_micro_batch_contributes_nothing():
    torch.manual_seed(_seed())
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    mon = GradStatsMonitor(model, loss_reduction="sum", accumulation="sum")
    x = torch.randn(6, 3, dtype=torch.float64)
    grads = per_example(model, sq, x)
    sq(model(x[:0])).backward()
    sq(model(x)).backward()
    stats = mon.step()
    assert stats.n == 6
    check(stats, grads)


# ------------------------------------------------------------------ 11. two monitors
def test_11_a_second_monitor_on_one_model_is_refused():
    model = nn.Sequential(nn.Linear(3, 4))
    first = GradStatsMonitor(model, mode="fused")
    with pytest.raises(ValueError, match="already has a GradStatsMonitor"):
        GradStatsMonitor(model, mode="fused")
    first.detach()
    GradStatsMonitor(model, mode="fused")


# ------------------------------------------------------------------ 12. unit mistakes
def _mlp64():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def test_12_undivided_accumulated_losses_are_named():
    model = _mlp64()
    mon = GradStatsMonitor(model)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    for xb, yb in zip(x.chunk(4), y.chunk(4)):
        mon.check_loss(F.cross_entropy(model(xb), yb)).backward()
    with pytest.raises(ContractError, match="must be divided by 4"):
        mon.step()


def test_12_a_sum_loss_declared_as_mean_is_named():
    model = _mlp64()
    mon = GradStatsMonitor(model, loss_reduction="mean")
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    mon.check_loss(F.cross_entropy(model(x), y, reduction="sum")).backward()
    with pytest.raises(ContractError, match="sum over the batch"):
        mon.step()


def test_12_a_grad_scaler_not_passed_to_the_monitor_is_named():
    model = _mlp64().float()
    mon = GradStatsMonitor(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(torch.randn(8, 3)).square().sum(1).mean()).backward()
    with pytest.raises(ContractError, match="pass scaler="):
        mon.step()
    mon.detach()


@pytest.mark.parametrize("mode", MODES)
def test_12_two_views_of_the_same_examples(mode):
    torch.manual_seed(_seed())
    model = _mlp64()
    x1 = torch.randn(6, 3, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn_like(x1)

    class Both(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, a, b):
            return torch.cat([self.m(a), self.m(b)], -1)

    grads = per_example(Both(model), sq, x1, x2)
    mon = GradStatsMonitor(model, mode=mode, loss_reduction="sum")
    with mon.same_examples():
        z1, z2 = model(x1), model(x2)
    (sq(z1) + sq(z2)).backward()
    stats = mon.step()
    assert stats.n == 6
    check(stats, grads)


@pytest.mark.parametrize("off_by", [-1, 1])
def test_12_a_token_count_unlike_the_losses_is_named(off_by):
    """token_mean: the loss divides by its valid targets (ignore_index excluded); a token_counts
    that disagrees (one that forgets a shift, counts padding) would scale every statistic, so
    check_loss compares the two. The right count passes."""
    model = _mlp64()
    x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 2, (6, 4))
    y[torch.rand(6, 4) < 0.3] = -100
    valid = int((y != -100).sum())

    def run(count: int) -> None:
        mon = GradStatsMonitor(model, loss_reduction="token_mean",
                               token_counts=lambda a, k: torch.tensor(count))
        out = model(x)
        mon.check_loss(F.cross_entropy(out.reshape(-1, 2), y.reshape(-1))).backward()
        mon.step()
        model.zero_grad()
        mon.detach()

    run(valid)
    with pytest.raises(ContractError, match=f"mean over {valid} terms .* was {valid + off_by}"):
        run(valid + off_by)


# ------------------------------------------------------------------ 13. messages
def test_13_layer_names_are_listed_when_one_is_missing():
    model = _mlp64()
    mon = GradStatsMonitor(model)
    sq(model(torch.randn(4, 3, dtype=torch.float64))).backward()
    with pytest.raises(KeyError, match=r"the layers are \['0', '2'\]"):
        mon.step().layers["fc1"]


def test_13_a_tiny_l2_term_is_named_as_such():
    model = _mlp64()
    mon = GradStatsMonitor(model, probe_every=1)
    x = torch.randn(8, 3, dtype=torch.float64)
    sq(model(x)).backward()
    mon.step()
    model.zero_grad()
    sq(model(x)).backward()
    for p in model.parameters():
        p.grad.add_(p.detach(), alpha=1e-6)
    with pytest.raises(ContractError, match="1e-06 x param added"):
        mon.step()
