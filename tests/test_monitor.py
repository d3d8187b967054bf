"""GradStatsMonitor against explicit per-example gradients (torch.func) under the units contract."""
import copy
import math

import pytest
import torch
from torch import nn

from gradstats import ContractError, GradStatsMonitor
from monitor_problems import (PROBLEMS, data, example_losses, per_example_grads, reference_stats,
                              train_step)

MODES = ["hooks", "fused"]


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def _check(stats, ref, rtol):
    torch.testing.assert_close(stats.per_example_sq_norms, ref["sq"], rtol=rtol, atol=0)
    assert _rel(stats.tr_sigma, ref["tr"]) < rtol
    assert _rel(stats.g2, ref["g2"]) < rtol
    assert _rel(stats.b_simple, ref["b"]) < rtol


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("k, divide", [(1, False), (3, True), (3, False), (4, True), (4, False)])
def test_step_matches_per_example_autograd(problem, mode, reduction, k, divide):
    torch.manual_seed(1)
    model = problem.make_model().double()
    X, Y = data(problem, 12, seed=k)
    ref = reference_stats(per_example_grads(model, X, Y))
    mon = GradStatsMonitor(model, mode=mode, loss_reduction=reduction,
                           accumulation="mean" if divide else "sum")
    stats = train_step(model, mon, X, Y, k=k, reduction=reduction, divide=divide)
    assert stats.n == 12 and stats.defined
    _check(stats, ref, 1e-8)
    # Per-layer values add up to the whole model's.
    assert math.isclose(sum(s.tr_sigma for s in stats.layers.values()), stats.tr_sigma,
                        rel_tol=1e-9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_per_layer_matches_reference(problem, mode):
    model = problem.make_model().double()
    X, Y = data(problem, 9, seed=3)
    refs = {name: reference_stats(per_example_grads(
        model, X, Y, {f"{name}.{k}" for k, _ in module.named_parameters()}))
        for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    mon = GradStatsMonitor(model, mode=mode)
    stats = train_step(model, mon, X, Y)
    assert set(refs) == set(stats.layers)
    for name, ref in refs.items():
        assert _rel(stats.layers[name].tr_sigma, ref["tr"]) < 1e-8
        assert _rel(stats.layers[name].g2, ref["g2"]) < 1e-8


@pytest.mark.parametrize("mode", MODES)
def test_float32_model(mode):
    problem = PROBLEMS[1]
    torch.manual_seed(2)
    model = problem.make_model()
    X, Y = data(problem, 16, dtype=torch.float32, seed=5)
    ref = reference_stats(per_example_grads(model.double(), X.double(), Y.double()))
    model.float()
    mon = GradStatsMonitor(model, mode=mode)
    stats = train_step(model, mon, X, Y, k=2)
    torch.testing.assert_close(stats.per_example_sq_norms, ref["sq"], rtol=1e-5, atol=0)
    assert abs(stats.g2 - ref["g2"]) <= 1e-5 * ref["gbar_sq"]
    assert _rel(stats.tr_sigma, ref["tr"]) < 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler(mode, unscale_first):
    problem = PROBLEMS[0]
    torch.manual_seed(3)
    model = problem.make_model().double()
    X, Y = data(problem, 10, seed=7)
    ref = reference_stats(per_example_grads(model, X, Y))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    mon = GradStatsMonitor(model, mode=mode, scaler=scaler)
    stats = train_step(model, mon, X, Y, k=2, scaler=scaler, optimizer=opt,
                       unscale_first=unscale_first)
    assert stats.loss_scale == 2.0**16
    _check(stats, ref, 1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_loss_scale_and_batch_size_changes_do_not_move_the_smoothed_value(mode):
    """A run whose scale changes (GradScaler backoff; batch size and so 1/b; accumulation count)
    gives the same smoothed B_simple as the same run at a constant scale."""
    problem = PROBLEMS[1]
    torch.manual_seed(4)
    base = problem.make_model().double()
    sizes = [8, 8, 12, 12, 6, 9, 9, 8]
    batches = [data(problem, n, seed=20 + i) for i, n in enumerate(sizes)]

    def run(varying: bool):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
        mon = GradStatsMonitor(model, mode=mode, scaler=scaler, beta=0.8,
                               loss_reduction="mean" if varying else "sum",
                               accumulation="mean" if varying else "sum")
        out = []
        for i, (X, Y) in enumerate(batches):
            if varying and i == 3:
                scaler.update(new_scale=2.0**5)  # as after repeated backoff
            k = 3 if varying and len(X) % 3 == 0 else 1
            if varying:
                stats = train_step(model, mon, X, Y, k=k, reduction="mean", divide=True,
                                   scaler=scaler, optimizer=opt)
            else:  # the same update with a sum loss: scale the learning rate by 1/b
                for g in opt.param_groups:
                    g["lr"] = 0.05 / len(X)
                stats = train_step(model, mon, X, Y, reduction="sum", divide=False,
                                   scaler=scaler, optimizer=opt)
            out.append((stats.b_simple_ema, stats.tr_sigma_ema, stats.g2_ema))
        return out

    for a, b in zip(run(True), run(False)):
        for x, y in zip(a, b):
            assert _rel(x, y) < 1e-9


class Scale(nn.Module):
    """A module with its own parameter and no gradstats rule."""

    def __init__(self, n):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.alpha


def _model_with_unsupported():
    return nn.Sequential(nn.Linear(5, 6), Scale(6), nn.Tanh(), nn.Linear(6, 3))


@pytest.mark.parametrize("mode", MODES)
def test_layers_without_a_rule_are_covered_at_the_function_level(mode):
    """Scale multiplies by its own parameter: no layer rule, default settings, exact."""
    model = _model_with_unsupported().double()
    X, Y = data(PROBLEMS[0], 7, seed=19)
    ref = reference_stats(per_example_grads(model, X, Y))
    mon = GradStatsMonitor(model, mode=mode)
    assert "1.alpha" in mon.parameter_names and "1" in mon.layer_names
    _check(train_step(model, mon, X, Y, k=1), ref, 1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_ignore_policy_restricts_every_statistic(mode):
    model = _model_with_unsupported().double()
    X, Y = data(PROBLEMS[0], 11, seed=9)
    covered = {"0.weight", "0.bias", "3.weight", "3.bias"}
    ref = reference_stats(per_example_grads(model, X, Y, covered))
    with pytest.warns(UserWarning, match="Scale"):
        GradStatsMonitor(model, unsupported="warn").detach()
    mon = GradStatsMonitor(model, mode=mode, unsupported="ignore")
    _check(train_step(model, mon, X, Y, k=1), ref, 1e-8)


def test_dataset_size_correction():
    model = PROBLEMS[0].make_model().double()
    X, Y = data(PROBLEMS[0], 10, seed=11)
    ref = reference_stats(per_example_grads(model, X, Y), dataset_size=50)
    mon = GradStatsMonitor(model, dataset_size=50)
    _check(train_step(model, mon, X, Y), ref, 1e-8)


def test_single_example_step_is_undefined_and_skipped_by_the_ema():
    model = PROBLEMS[0].make_model().double()
    mon = GradStatsMonitor(model)
    X, Y = data(PROBLEMS[0], 6, seed=12)
    first = train_step(model, mon, X, Y)
    one = train_step(model, mon, X[:1], Y[:1])
    assert not one.defined and one.reason == "n == 1" and math.isnan(one.b_simple)
    assert one.b_simple_ema == first.b_simple_ema


def test_detach_restores_the_model():
    model = PROBLEMS[1].make_model().double()
    X, _ = data(PROBLEMS[1], 4)
    before = model(X)
    with GradStatsMonitor(model, mode="fused"):
        assert "forward" in vars(model.inp)
    assert "forward" not in vars(model.inp)
    assert not model.inp._forward_hooks and not model._forward_pre_hooks
    torch.testing.assert_close(model(X), before)


def test_paused_backward_passes_are_not_counted():
    model = PROBLEMS[0].make_model().double()
    X, Y = data(PROBLEMS[0], 8, seed=13)
    ref = reference_stats(per_example_grads(model, X, Y))
    mon = GradStatsMonitor(model)
    loss = example_losses(model(X), Y).mean()
    with mon.paused():  # e.g. a Hessian-vector product that leaves .grad alone
        g = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        torch.autograd.grad(sum((x * x).sum() for x in g), list(model.parameters()),
                            retain_graph=True)
    loss.backward()
    _check(mon.step(), ref, 1e-8)


def test_state_dict_resumes_the_same_smoothed_statistics():
    problem = PROBLEMS[0]
    torch.manual_seed(5)
    base = problem.make_model().double()
    batches = [data(problem, 8, seed=40 + i) for i in range(8)]

    def run(resume_at=None):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = GradStatsMonitor(model, beta=0.7)
        out = []
        for i, (X, Y) in enumerate(batches):
            if i == resume_at:
                state = mon.state_dict()
                mon.detach()
                mon = GradStatsMonitor(model, beta=0.7)
                mon.load_state_dict(state)
            out.append(train_step(model, mon, X, Y, optimizer=opt))
        return out

    for a, b in zip(run(), run(resume_at=4)):
        assert (a.step, a.b_simple_ema, a.b_simple_stderr) == (b.step, b.b_simple_ema,
                                                               b.b_simple_stderr)


# ------------------------------------------------------------------ contract violations
def _fresh(mode="hooks", **kw):
    model = PROBLEMS[0].make_model().double()
    X, Y = data(PROBLEMS[0], 8, seed=14)
    return model, GradStatsMonitor(model, mode=mode, **kw), X, Y


@pytest.mark.parametrize("mode", MODES)
def test_grad_not_zeroed_is_named(mode):
    model, mon, X, Y = _fresh(mode)
    example_losses(model(X), Y).mean().backward()
    mon.step()
    example_losses(model(X), Y).mean().backward()
    with pytest.raises(ContractError, match="not zeroed"):
        mon.step()


@pytest.mark.parametrize("mode", MODES)
def test_clipping_before_step_is_named(mode):
    model, mon, X, Y = _fresh(mode)
    example_losses(model(X), Y).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.raises(ContractError, match="clipping"):
        mon.step()


@pytest.mark.parametrize("mode", MODES)
def test_weight_decay_in_grad_is_named(mode):
    model, mon, X, Y = _fresh(mode)
    example_losses(model(X), Y).mean().backward()
    for p in model.parameters():
        p.grad.add_(p.detach(), alpha=0.01)
    with pytest.raises(ContractError, match="weight decay"):
        mon.step()


@pytest.mark.parametrize("mode", MODES)
def test_unseen_contribution_is_named(mode):
    model, mon, X, Y = _fresh(mode)
    loss = example_losses(model(X), Y).mean() + model[0].weight.sum()  # bypasses the layer
    loss.backward()
    with pytest.raises(ContractError, match="never saw"):
        mon.step()


class Twice(nn.Module):
    """One Linear applied twice per forward (its per-example gradient has cross terms)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.lin(torch.tanh(self.lin(x))))


class Tied(nn.Module):
    """Two Linear layers sharing one weight (and a token axis, so the cross terms span T^2)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x))))).mean(1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make, x_shape", [(Twice, (5,)), (Tied, (4, 6))],
                         ids=["called-twice", "tied"])
def test_shared_parameters_get_their_cross_terms(mode, make, x_shape):
    torch.manual_seed(6)
    model = make().double()
    X = torch.randn(7, *x_shape, dtype=torch.float64)
    Y = 2.0 + torch.randn(7, 3, dtype=torch.float64)
    ref = reference_stats(per_example_grads(model, X, Y))
    mon = GradStatsMonitor(model, mode=mode)
    _check(train_step(model, mon, X, Y, k=1), ref, 1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_unequal_micro_batches_under_mean_loss_use_the_weighted_estimator(mode):
    """Micro-batches of 3 and 7 under a mean loss weight their examples 1/3 and 1/7: the step's
    statistics are the weighted-mean estimates from explicit per-example gradients."""
    model = PROBLEMS[0].make_model().double()
    mon = GradStatsMonitor(model, mode=mode, accumulation="sum")
    X, Y = data(PROBLEMS[0], 10, seed=31)
    grads = per_example_grads(model, X, Y)
    for xb, yb in [(X[:3], Y[:3]), (X[3:], Y[3:])]:
        example_losses(model(xb), yb).mean().backward()
    stats = mon.step()
    c = torch.tensor([1 / 3] * 3 + [1 / 7] * 7, dtype=torch.float64)
    w = c / c.sum()
    S, gw = grads.square().sum(), (w[:, None] * grads).sum(0).square().sum()
    tr = (S / 10 - gw) / (1 - w.square().sum())
    g2 = gw - tr * w.square().sum()
    torch.testing.assert_close(stats.per_example_sq_norms, grads.square().sum(1), rtol=1e-10,
                               atol=0)
    assert _rel(stats.tr_sigma, tr.item()) < 1e-9 and _rel(stats.g2, g2.item()) < 1e-9


def test_training_batchnorm_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    mon = GradStatsMonitor(model, unsupported="ignore")
    with pytest.raises(ContractError, match="training mode"):
        model(torch.randn(5, 4, dtype=torch.float64))
    model.eval()
    model(torch.randn(5, 4, dtype=torch.float64))
    mon.detach()


def test_shared_with_an_uncovered_module_is_left_out_consistently():
    lin = nn.Linear(4, 4)
    scale = Scale(4)
    scale.alpha = nn.Parameter(torch.ones(4))
    model = nn.Sequential(lin, scale, nn.Linear(4, 2)).double()
    mon = GradStatsMonitor(model, unsupported="ignore")
    assert "1.alpha" not in mon.parameter_names and "0.weight" in mon.parameter_names


def test_non_finite_values_are_refused_and_skipped_under_a_scaler():
    model, mon, X, Y = _fresh()
    X = X.clone()
    X[0, 0] = math.inf
    example_losses(model(X), Y).mean().backward()
    with pytest.raises(ContractError, match="non-finite"):
        mon.step()
    model.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    mon.detach()
    mon2 = GradStatsMonitor(model, scaler=scaler)
    scaler.scale(example_losses(model(X), Y).mean()).backward()
    stats = mon2.step()
    assert stats.skipped and "non-finite" in stats.skip_reason and mon2.ema.steps == 0


def test_second_backward_through_one_forward_is_refused():
    model, mon, X, Y = _fresh()
    loss = example_losses(model(X), Y).mean()
    loss.backward(retain_graph=True)
    with pytest.raises(ContractError, match="twice"):
        loss.backward()


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "magic"}, "mode must be one of"),
    ({"loss_reduction": "median"}, "loss_reduction must be one of"),
    ({"unsupported": "skip"}, "unsupported must be one of"),
    ({"dataset_size": 1}, "dataset_size must be"),
    ({"beta": 1.5}, "beta"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradStatsMonitor(PROBLEMS[0].make_model(), **kwargs)


def test_step_without_backward_is_an_error():
    model, mon, X, Y = _fresh()
    with pytest.raises(RuntimeError, match="no counted backward"):
        mon.step()


def test_activations_are_released_and_nothing_grows():
    import gc
    import tracemalloc

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = GradStatsMonitor(model, mode="hooks")
    X, Y = torch.randn(6, 4), torch.randn(6, 2)

    def steps(n):
        for _ in range(n):
            example_losses(model(X), Y).mean().backward()
            mon.step()
            opt.zero_grad()

    steps(200)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    steps(10_000)
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    tracemalloc.stop()
    assert grown < 256 * 1024
    assert not mon.hooks.calls and not mon.hooks.factors and not mon.hooks.stash


@pytest.mark.parametrize("mode", MODES)
def test_fallback_policy_covers_layers_without_a_rule(mode):
    model = _model_with_unsupported().double()
    X, Y = data(PROBLEMS[0], 9, seed=15)
    ref = reference_stats(per_example_grads(model, X, Y))
    mon = GradStatsMonitor(model, mode=mode, unsupported="fallback")
    assert "1.alpha" in mon.parameter_names
    _check(train_step(model, mon, X, Y, k=1), ref, 1e-8)


class SeqFirst(nn.Module):
    """Linear layers over a sequence-first input [T, B, d], pooled over T."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 7)
        self.b = nn.Linear(7, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(0)


class BatchFirst(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(0, 1))


@pytest.mark.parametrize("mode", MODES)
def test_sequence_first_layout(mode):
    torch.manual_seed(7)
    model = SeqFirst().double()
    X = torch.randn(8, 5, 6, dtype=torch.float64)  # batch-first copy for the reference
    Y = 2.0 + torch.randn(8, 3, dtype=torch.float64)
    ref = reference_stats(per_example_grads(BatchFirst(model), X, Y))
    mon = GradStatsMonitor(model, mode=mode, batch_dim=1)
    example_losses(model(X.transpose(0, 1)), Y).mean().backward()
    _check(mon.step(), ref, 1e-8)
