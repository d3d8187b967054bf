"""The eager fast path: between probe steps, a model whose layout the full path has learned runs
the traced path (gradstats.traced) eagerly, without the provenance mode. Its statistics must be
the per-example ones on fresh random models, batch sizes and micro-batch counts; what it cannot
follow (a forward without backward, checkpointing's recomputation) must turn it off, never be
silently counted."""
from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from gradstats import GradStatsMonitor
from test_compile_fullgraph import Problem, _reference


def _steps(prob: Problem, mon: GradStatsMonitor, plan):
    """Runs ``plan`` (a list of per-step batch-size lists); yields (stats, fast, batches)."""
    for sizes in plan:
        fast = mon.hooks.fast
        batches = [prob.batch(B) for B in sizes]
        for x, y in batches:
            prob.loss(prob.model(x), y).backward()
        yield mon.step(), fast, batches
        for p in prob.model.parameters():
            p.grad = None


@pytest.mark.parametrize("mode", ["hooks", "fused"])
@pytest.mark.parametrize("name", ["mlp", "attn", "norms", "nano"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_steps_match_per_example_autograd(name: str, mode: str, seed: int):
    prob = Problem(name, seed)
    ref_model = __import__("copy").deepcopy(prob.model)
    mon = GradStatsMonitor(prob.model, mode=mode, loss_reduction=prob.reduction,
                           accumulation="sum", probe_warmup=1, probe_every=3)
    gen = torch.Generator().manual_seed(100 + seed)
    sizes = [[int(torch.randint(2, 7, (), generator=gen))
              for _ in range(int(torch.randint(1, 3, (), generator=gen)))] for _ in range(2)]
    if name == "nano":
        sizes[1] = [4, 4]  # B == T for the position embeddings
    plan = [sizes[0]] * 4 + [sizes[1]] * 4  # a change of sizes forces a probe step
    fast_steps = 0
    for stats, fast, batches in _steps(prob, mon, plan):
        assert stats.measured, stats.skip_reason
        want = _reference(ref_model, prob, batches)
        torch.testing.assert_close(stats.per_example_sq_norms, want, rtol=1e-9, atol=1e-12)
        if fast:
            fast_steps += 1
            assert not stats.verified
    assert fast_steps >= 3  # the plan was learned and used between probe steps


def test_forward_without_backward_turns_the_fast_path_off():
    prob = Problem("mlp", 3)
    ref_model = __import__("copy").deepcopy(prob.model)
    mon = GradStatsMonitor(prob.model, probe_warmup=1, probe_every=0,
                           loss_reduction=prob.reduction)
    list(_steps(prob, mon, [[5], [5]]))
    assert mon.hooks.fast
    x, y = prob.batch(5)
    prob.model(prob.batch(3)[0])  # grad enabled, never backpropagated
    prob.loss(prob.model(x), y).backward()
    stats = mon.step()
    assert not stats.measured and "forwards must reach" in stats.skip_reason
    assert not mon.hooks.fast and mon.hooks.no_fast is not None
    for p in prob.model.parameters():
        p.grad = None
    (stats, fast, batches), = _steps(prob, mon, [[4]])
    assert stats.measured and not fast
    torch.testing.assert_close(stats.per_example_sq_norms, _reference(ref_model, prob, batches))


class Ckpt(nn.Module):
    def __init__(self, ckpt: bool = True):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.ckpt = ckpt

    def forward(self, x):
        def seg(t):
            return torch.tanh(self.b(torch.tanh(self.a(t))))

        h = torch.utils.checkpoint.checkpoint(seg, x, use_reentrant=False) if self.ckpt else seg(x)
        return self.c(h)


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_checkpointing_keeps_the_full_path(mode: str):
    torch.manual_seed(5)
    model = Ckpt().double()
    ref = __import__("copy").deepcopy(model)
    mon = GradStatsMonitor(model, mode=mode, loss_reduction="sum", accumulation="sum",
                           probe_warmup=1, probe_every=0)
    for _ in range(4):
        xs = [torch.randn(B, 4, dtype=torch.float64) for B in (3, 5)]
        assert not mon.hooks.fast
        for x in xs:
            model(x).square().sum().backward()
        stats = mon.step()
        want = []
        for x in xs:
            for i in range(x.shape[0]):
                g = torch.autograd.grad(ref(x[i:i + 1]).square().sum(), list(ref.parameters()))
                want.append(sum(t.square().sum() for t in g))
        assert stats.measured
        torch.testing.assert_close(stats.per_example_sq_norms, torch.stack(want))
        for p in model.parameters():
            p.grad = None


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_checkpointing_switched_on_during_fast_steps_is_never_counted(mode: str):
    torch.manual_seed(6)
    model = Ckpt(ckpt=False).double()
    mon = GradStatsMonitor(model, mode=mode, loss_reduction="sum", accumulation="sum",
                           probe_warmup=1, probe_every=0)
    xs = [torch.randn(B, 4, dtype=torch.float64) for B in (3, 5)]

    def step():
        for x in xs:
            model(x).square().sum().backward()
        stats = mon.step()
        for p in model.parameters():
            p.grad = None
        return stats

    step(), step()
    assert mon.hooks.fast
    model.ckpt = True
    stats = step()
    assert not stats.measured and "inside backward" in stats.skip_reason
    assert not mon.hooks.fast
    ref = __import__("copy").deepcopy(model)
    stats = step()
    want = torch.stack([sum(t.square().sum() for t in torch.autograd.grad(
        ref(x[i:i + 1]).square().sum(), list(ref.parameters())))
        for x in xs for i in range(x.shape[0])])
    assert stats.measured
    torch.testing.assert_close(stats.per_example_sq_norms, want)
