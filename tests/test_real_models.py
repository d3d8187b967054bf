"""Models a user brings: Hugging Face GPT-2, Llama (tied and untied), Gemma, BERT, T5, timm ViT
and ConvNeXt, torchvision ResNet-18 with GroupNorm and a nanoGPT-style model, built from small
configs with random weights (every dropout 0), called the way their libraries call them
(keyword inputs, padded sequences of unequal lengths, HF's own ``labels=`` loss), with the
monitor at its default settings, in hooks and fused modes, against a per-example autograd loop
(:func:`real_models.loop_reference`). An LSTM is refused by name at default settings and
covered by ``unsupported="fallback"``."""
from __future__ import annotations

import functools

import pytest
import torch

from gradstats import GradStatsMonitor
from gradstats.provenance import ProvenanceError

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("torchvision")

from real_models import CASES, Case, loop_reference, lstm_case

SLOW = {"resnet18-gn"}  # 11M parameters: building it and the float64 loop take seconds


def _param(case: Case):
    return pytest.param(case, id=case.name, marks=[pytest.mark.slow] if case.name in SLOW else [])


@functools.cache
def prepared(name: str) -> tuple[torch.nn.Module, dict, dict]:
    """The case's model (seeded, in its dtype), its batch and the loop reference, built once for
    both modes (a test only writes ``.grad``)."""
    case = next(c for c in [*CASES, lstm_case()] if c.name == name)
    torch.manual_seed(sum(map(ord, name)))
    model = case.build().to(case.dtype)
    batch = {k: v.to(case.dtype) if v.is_floating_point() else v
             for k, v in case.batch(torch.Generator().manual_seed(len(name))).items()}
    return model, batch, loop_reference(model, case, batch)


def assert_matches(stats, ref: dict, tol: float) -> None:
    """Relative ``tol`` on each |u_i|^2, their sum, |ubar|^2 and tr(Sigma); |G|^2 and B_simple
    to ``tol`` times the cancellation factor |ubar|^2 / ||G|^2| (B_simple adds both errors)."""
    n = ref["sq"].numel()
    assert stats.n == n and stats.verified
    torch.testing.assert_close(stats.per_example_sq_norms, ref["sq"], rtol=tol, atol=0)

    def rel(got: float, want: float) -> float:
        return abs(got - want) / abs(want)

    assert rel(stats.per_example_sq_norms.sum().item(), ref["sq"].sum().item()) <= tol
    assert rel(stats.tr_sigma, ref["tr"]) <= tol
    assert rel(stats.g2 + stats.tr_sigma / n, ref["gbar_sq"]) <= tol  # |G|^2 = |ubar|^2 - tr/N
    amplification = ref["gbar_sq"] / abs(ref["g2"])
    assert rel(stats.g2, ref["g2"]) <= tol * amplification
    assert stats.defined == (ref["g2"] > 0)
    if stats.defined:
        assert rel(stats.b_simple, ref["b"]) <= 2 * tol * amplification


@pytest.mark.parametrize("mode", ["hooks", "fused"])
@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_default_monitor_matches_per_example_autograd(case: Case, mode: str):
    model, batch, ref = prepared(case.name)
    model.zero_grad(set_to_none=True)
    with GradStatsMonitor(model, mode=mode, loss_reduction=case.loss_reduction,
                          **case.monitor_kwargs) as monitor:
        covered = {id(model.get_parameter(n)) for n in monitor.parameter_names}
        assert covered == {id(p) for p in model.parameters()}  # tied weights once, none left out
        case.train_loss(model, batch).backward()
        stats = monitor.step()
    assert_matches(stats, ref, case.tol)


def test_lstm_is_refused_by_name_at_default_settings():
    model, batch, _ = prepared("lstm")
    with GradStatsMonitor(model), \
            pytest.raises(ProvenanceError, match=r"^lstm: .*pass unsupported='fallback'"):
        model(batch["ids"])


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_lstm_with_fallback_matches_per_example_autograd(mode: str):
    case = lstm_case()
    model, batch, ref = prepared("lstm")
    model.zero_grad(set_to_none=True)
    with GradStatsMonitor(model, mode=mode, unsupported="fallback") as monitor:
        assert sorted(monitor.parameter_names) == sorted(n for n, _ in model.named_parameters())
        case.train_loss(model, batch).backward()
        stats = monitor.step()
    assert_matches(stats, ref, case.tol)
