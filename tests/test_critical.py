"""Tests for gradstats.critical: the (S, E) fit, its bootstrap intervals, file readers."""

import json
import math

import numpy as np
import pytest

from gradstats.critical import CriticalBatchFit, fit_critical_batch, load_runs, save_runs


def synthetic(rng, noise=0.05, repeats=2):
    s_min = rng.uniform(500, 5000)
    b_crit = rng.uniform(50, 2000)
    e_min = s_min * b_crit
    B = np.repeat(2.0 ** np.arange(3, 15), repeats)
    S = (s_min + e_min / B) * np.exp(noise * rng.normal(size=B.size))
    return s_min, e_min, B, S


def test_exact_data_recovered_and_on_the_hyperbola():
    rng = np.random.default_rng()
    s_min, e_min, B, _ = synthetic(rng)
    B = B * rng.uniform(0.5, 1.5, B.size)
    S = s_min + e_min / B
    for relative in (True, False):
        f = fit_critical_batch(B, S, n_boot=50, relative=relative)
        assert f.s_min == pytest.approx(s_min, rel=1e-9)
        assert f.e_min == pytest.approx(e_min, rel=1e-9)
        assert f.b_crit == pytest.approx(e_min / s_min, rel=1e-9)
    Bq = rng.uniform(1, 1e5, 20)
    S_hat, E_hat = f.predict_steps(Bq), f.predict_examples(Bq)
    assert np.allclose(E_hat, Bq * S_hat)
    assert np.allclose((S_hat / s_min - 1) * (E_hat / e_min - 1), 1.0, rtol=1e-8)


def test_fit_equals_independent_weighted_least_squares():
    rng = np.random.default_rng()
    _, _, B, S = synthetic(rng, noise=0.1)
    f = fit_critical_batch(B, S, n_boot=0)
    c_rel, a_rel = np.polyfit(1 / B, S, 1, w=1 / S)  # minimises sum ((S - fit)/S)^2
    assert (f.s_min, f.e_min) == pytest.approx((a_rel, c_rel), rel=1e-8)
    g = fit_critical_batch(B, S, n_boot=0, relative=False)
    c, a = np.polyfit(1 / B, S, 1)
    assert (g.s_min, g.e_min) == pytest.approx((a, c), rel=1e-8)
    assert all(math.isnan(v) for v in f.s_min_ci + f.e_min_ci + f.b_crit_ci) and f.n_boot == 0


def test_noisy_fit_recovers_truth_inside_bootstrap_ci():
    rng = np.random.default_rng(0)
    s_min, e_min, B, S = synthetic(rng, noise=0.05)
    f = fit_critical_batch(B, S, n_boot=1000, seed=1, confidence=0.95)
    assert isinstance(f, CriticalBatchFit) and f.n_boot == 1000
    assert f.s_min == pytest.approx(s_min, rel=0.1)
    assert f.e_min == pytest.approx(e_min, rel=0.1)
    assert f.b_crit == pytest.approx(e_min / s_min, rel=0.15)
    for est, ci, true in (
        (f.s_min, f.s_min_ci, s_min),
        (f.e_min, f.e_min_ci, e_min),
        (f.b_crit, f.b_crit_ci, e_min / s_min),
    ):
        assert ci[0] < est < ci[1]
        assert ci[0] <= true <= ci[1]
    narrow = fit_critical_batch(B, S, n_boot=1000, seed=1, confidence=0.5)
    assert f.b_crit_ci[0] < narrow.b_crit_ci[0] < narrow.b_crit_ci[1] < f.b_crit_ci[1]
    again = fit_critical_batch(B, S, n_boot=1000, seed=1, confidence=0.95)
    assert again.b_crit_ci == f.b_crit_ci  # deterministic given the seed


def test_bootstrap_coverage_over_many_datasets():
    rng = np.random.default_rng(2024)
    n, hits = 40, np.zeros(3)
    for i in range(n):
        s_min, e_min, B, S = synthetic(rng)
        f = fit_critical_batch(B, S, n_boot=300, seed=i, confidence=0.9)
        for k, (ci, true) in enumerate(
            ((f.s_min_ci, s_min), (f.e_min_ci, e_min), (f.b_crit_ci, e_min / s_min))
        ):
            hits[k] += ci[0] <= true <= ci[1]
    assert np.all(hits / n >= 0.7), (
        hits / n
    )  # nominal 0.9; percentile bootstrap under-covers a little


def test_input_errors():
    with pytest.raises(ValueError, match="2 distinct batch sizes"):
        fit_critical_batch([32, 32, 32], [100, 110, 95])
    with pytest.raises(ValueError, match="batch_sizes must be finite and > 0"):
        fit_critical_batch([32, -64], [100, 60])
    with pytest.raises(ValueError, match="steps must be finite and > 0"):
        fit_critical_batch([32, 64], [100, 0])
    with pytest.raises(ValueError, match="same length"):
        fit_critical_batch([32, 64, 128], [100, 60])
    with pytest.raises(ValueError, match="confidence"):
        fit_critical_batch([32, 64], [100, 60], confidence=1.0)
    # S = 100/B - 5: steps fall faster than the model allows -> fitted S_min < 0
    B = np.array([1.0, 2.0, 4.0, 8.0])
    with pytest.raises(ValueError, match="S_min"):
        fit_critical_batch(B, 100 / B - 5)
    # steps growing with B -> E_min < 0
    with pytest.raises(ValueError, match="E_min"):
        fit_critical_batch(B, 10 + B)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_round_trip(tmp_path, suffix):
    rng = np.random.default_rng()
    _, _, B, S = synthetic(rng)
    p = tmp_path / f"runs{suffix}"
    save_runs(p, B, S)
    runs = load_runs(p)
    np.testing.assert_array_equal(runs.batch_sizes, B)
    np.testing.assert_array_equal(runs.steps, S)
    assert fit_critical_batch(*runs, n_boot=0).b_crit == fit_critical_batch(B, S, n_boot=0).b_crit


def test_readers_examples_column_and_errors(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("batch_size,examples\n32,3200\n64,4480\n")
    runs = load_runs(p)
    np.testing.assert_allclose(runs.steps, [100.0, 70.0])
    p.write_text("batch_size,steps,examples\n32,100,3200\n64,70,9999\n")
    with pytest.raises(ValueError, match="examples must equal"):
        load_runs(p)
    p.write_text("bs,steps\n32,100\n")
    with pytest.raises(ValueError, match="batch_size"):
        load_runs(p)
    p.write_text("batch_size,steps\n32,-1\n")
    with pytest.raises(ValueError, match="steps must be finite and > 0"):
        load_runs(p)
    j = tmp_path / "r.json"
    j.write_text(json.dumps([{"batch_size": 16, "steps": 500}, {"batch_size": 256, "steps": 80}]))
    runs = load_runs(j)
    np.testing.assert_array_equal(runs.batch_sizes, [16, 256])
    j.write_text(json.dumps({"batch_size": [16]}))
    with pytest.raises(ValueError, match="list of objects"):
        load_runs(j)
