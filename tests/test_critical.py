"""Tests for gradstats.critical: the (S, E) fit, its bootstrap intervals, the prediction from
one run's noise scale, file readers."""

import json
import math

import numpy as np
import pytest

from gradstats.critical import (CriticalBatchFit, fit_critical_batch, load_runs,
                                predict_from_b_simple, save_runs)


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
    while True:  # noise 0.1 can push the fitted S_min below 0, which the fit refuses
        _, _, B, S = synthetic(rng, noise=0.1)
        c_rel, a_rel = np.polyfit(1 / B, S, 1, w=1 / S)  # minimises sum ((S - fit)/S)^2
        c, a = np.polyfit(1 / B, S, 1)
        if min(a_rel, c_rel, a, c) > 0:
            break
    f = fit_critical_batch(B, S, n_boot=0)
    assert (f.s_min, f.e_min) == pytest.approx((a_rel, c_rel), rel=1e-8)
    g = fit_critical_batch(B, S, n_boot=0, relative=False)
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


def test_coverage_at_the_stated_rate_on_the_log_scale():
    """Fresh synthetic runs from known S_min, E_min with multiplicative noise: the truth falls
    inside the 90% interval about 90% of the time and inside the 50% one about half the time
    (percentile bootstrap under-covers by a few points with 24 runs and 2 parameters)."""
    rng = np.random.default_rng()
    n = 100
    for confidence, lo_rate, hi_rate in ((0.9, 0.75, 1.0), (0.5, 0.3, 0.65)):
        hits = np.zeros(3)
        for i in range(n):
            s_min, e_min, B, S = synthetic(rng)
            f = fit_critical_batch(B, S, n_boot=300, seed=i, confidence=confidence)
            assert f.bootstrap.undefined == {}
            for k, (ci, true) in enumerate(
                ((f.s_min_ci, s_min), (f.e_min_ci, e_min), (f.b_crit_ci, e_min / s_min))
            ):
                assert 0 < ci[0] <= ci[1]
                hits[k] += ci[0] <= true <= ci[1]
        assert np.all((lo_rate <= hits / n) & (hits / n <= hi_rate)), (confidence, hits / n)


def _share_nonpositive(B, S, n_boot=4000):
    """Independent bootstrap with numpy's weighted polyfit: the share of resamples (of those
    holding >= 2 batch sizes) whose fitted S_min or E_min is <= 0."""
    rng = np.random.default_rng(12345)
    bad_s = bad_e = used = 0
    while used < n_boot:
        i = rng.integers(0, B.size, B.size)
        if np.unique(B[i]).size < 2:
            continue
        e_min, s_min = np.polyfit(1 / B[i], S[i], 1, w=1 / S[i])
        used += 1
        bad_s += s_min <= 0
        bad_e += e_min <= 0
    return bad_s / used, bad_e / used


@pytest.mark.parametrize("kind", ["flat", "pure_1_over_B"])
def test_unresolved_data_give_undefined_not_nonsense(kind):
    """Steps that barely fall with B (E_min unresolved from 0: B_crit below the runs) or that
    fall like 1/B throughout (S_min unresolved from 0: B_crit above them): the fit itself is
    positive, but the interval of B_crit is undefined, with the reason, and nothing is reported
    with a non-positive lower end."""
    rng = np.random.default_rng()
    B = np.repeat(2.0 ** np.arange(3, 9), 2)
    while True:
        base = 1000.0 + 200.0 / B if kind == "flat" else 3e4 / B + 0.5
        S = base * np.exp(0.1 * rng.normal(size=B.size))
        try:
            f = fit_critical_batch(B, S, n_boot=4000, seed=int(rng.integers(1 << 30)))
        except ValueError:
            continue  # the point fit already says "no trade-off"; need one that is positive
        share_s, share_e = _share_nonpositive(B, S)
        share = share_e if kind == "flat" else share_s
        if share > 0.1:  # clearly unresolved by an independent bootstrap
            break
    assert f.b_crit > 0
    assert all(math.isnan(v) for v in f.b_crit_ci)
    why = f.bootstrap.undefined["b_crit"]
    assert why.startswith("undefined: not resolved by these runs")
    assert ("E_min <= 0" in why and "lower" in why) if kind == "flat" else (
        "S_min <= 0" in why and "upper" in why)
    counted = f.bootstrap.e_min_nonpositive if kind == "flat" else f.bootstrap.s_min_nonpositive
    # two bootstraps of 4000 resamples: the shares differ by ~0.011 (one s.d.) at most shares
    assert counted / f.bootstrap.resamples == pytest.approx(share, abs=0.05)
    assert f.bootstrap.usable < f.bootstrap.resamples
    assert str(f.bootstrap.usable) in f.describe_intervals()
    for ci in (f.s_min_ci, f.e_min_ci):
        assert all(math.isnan(v) for v in ci) or 0 < ci[0] <= ci[1]


def test_intervals_never_have_a_nonpositive_lower_end():
    rng = np.random.default_rng()
    seen = 0
    for i in range(200):
        B = 2.0 ** rng.integers(2, 12, size=int(rng.integers(3, 12)))
        S = rng.uniform(10, 1000) * (1 + rng.uniform(0, 100) / B) * np.exp(
            rng.uniform(0, 0.5) * rng.normal(size=B.size))
        try:
            f = fit_critical_batch(B, S, n_boot=100, seed=i)
        except ValueError:
            continue
        seen += 1
        assert f.n_boot == f.bootstrap.resamples == 100
        for name, ci in (("s_min", f.s_min_ci), ("e_min", f.e_min_ci), ("b_crit", f.b_crit_ci)):
            if name in f.bootstrap.undefined:
                assert all(math.isnan(v) for v in ci)
            else:
                assert 0 < ci[0] <= ci[1] < math.inf, (name, ci)
    assert seen > 50


def test_prediction_from_one_runs_noise_scale():
    """The run itself lies on its predicted hyperbola: S_min + E_min/B = S (each step costs
    1/(1 + b/B) + (b/(1 + b/B))/B = 1); a constant noise scale b predicts B_crit = b; spans
    equal repeated entries; undefined entries are skipped and counted."""
    rng = np.random.default_rng()
    B, steps = int(rng.integers(8, 512)), int(rng.integers(20, 200))
    b = np.exp(rng.normal(np.log(100), 1.0, size=steps))
    p = predict_from_b_simple(b, B)
    assert p.s_min + p.e_min / B == pytest.approx(steps, rel=1e-12)
    assert b.min() < p.b_crit < b.max() and p.steps == steps and p.skipped_steps == 0
    c = float(rng.uniform(10, 1000))
    q = predict_from_b_simple([c] * steps, B)
    assert q.b_crit == pytest.approx(c) and q.s_min == pytest.approx(steps / (1 + c / B))
    spans = rng.integers(1, 5, size=steps)
    r = predict_from_b_simple(b, B, span=spans)
    t = predict_from_b_simple(np.repeat(b, spans), B)
    assert (r.s_min, r.e_min) == pytest.approx((t.s_min, t.e_min), rel=1e-12)
    bad = list(b[:10]) + [None, -1.0, math.nan] + list(b[10:])
    u = predict_from_b_simple(bad, B)
    assert (u.s_min, u.e_min, u.skipped_steps) == pytest.approx((p.s_min, p.e_min, 3))
    sizes = rng.integers(2, 64, size=steps)
    v = predict_from_b_simple(b, sizes)
    assert v.s_min + float(np.sum(b / (1 + b / sizes) / sizes)) == pytest.approx(steps)
    with pytest.raises(ValueError, match="batch_size"):
        predict_from_b_simple([1.0, 2.0], [4, 0])
    with pytest.raises(ValueError, match="span"):
        predict_from_b_simple([1.0, 2.0], 4, span=[1])


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
