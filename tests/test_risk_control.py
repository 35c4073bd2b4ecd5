"""Learn-then-Test (core/risk_control.py) on synthetic data with a known selective risk, the anytime-valid
bound on a stream (valid at every count, and it fires on a stream that drifts), and the manifest references."""

from __future__ import annotations

import math

import pytest
import torch

from core.conformal import ConformalReference, conformal_reference
from core.risk_control import (
    RiskReference,
    anytime_lower_bound,
    anytime_radius,
    learn_then_test,
    risk_reference,
    threshold_grid,
)

SLOPE = 0.6  # P(wrong | u) = SLOPE · u with u ~ U(0, 1): the selective risk at λ ≤ 1 is SLOPE · λ / 2


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    wrong = torch.rand(n, generator=gen, dtype=torch.float64) < SLOPE * u
    return u, ~wrong


def test_guarantee_holds_in_at_least_1_minus_delta_of_500_resamples() -> None:
    epsilon, delta, violations, certified = 0.2, 0.1, 0, 0
    for seed in range(500):
        u, correct = synthetic(400, seed)
        cert = learn_then_test(u, correct, score="one_minus_max_probability", target_risk=epsilon, delta=delta)
        if cert.certified:
            certified += 1
            assert cert.threshold is not None
            violations += SLOPE * min(cert.threshold, 1.0) / 2 > epsilon
    print(f"LTT: certified in {certified}/500 resamples, true risk > {epsilon} in {violations}")
    assert violations <= delta * 500
    assert certified >= 250  # and it is not vacuous: risk 0.2 holds up to λ* = 0.667


def test_fixed_sequence_against_a_naive_loop() -> None:
    u, correct = synthetic(1000, 7)
    grid = threshold_grid("one_minus_max_probability", 50)
    cert = learn_then_test(u, correct, score="one_minus_max_probability", target_risk=0.25, delta=0.1, grid=grid,
                           starts=5)
    from core.conformal import hoeffding_bentkus_pvalue

    pvalues = []
    for lam in grid.tolist():
        answered = [bool(c) for x, c in zip(u.tolist(), correct.tolist(), strict=True) if x <= lam]
        pvalues.append(hoeffding_bentkus_pvalue(answered.count(False) / len(answered), len(answered), 0.25)
                       if answered else 1.0)
    rejected = []
    for start in (0, 12, 24, 37, 49):  # round(i · 49 / 4)
        j = start
        while j < 50 and pvalues[j] <= 0.1 / 5:
            rejected.append(j)
            j += 1
    assert cert.certified and rejected
    assert cert.threshold == pytest.approx(float(grid[max(rejected)]))


def test_vectorized_pvalues_equal_the_scalar_ones() -> None:
    from core.conformal import hoeffding_bentkus_pvalue
    from core.risk_control import hb_pvalues

    kept = torch.tensor([0, 1, 5, 40, 200, 200, 1000])
    wrong = torch.tensor([0, 0, 2, 3, 20, 90, 140])
    ours = hb_pvalues(kept, wrong, 0.15)
    theirs = [hoeffding_bentkus_pvalue(w / k, k, 0.15) if k else 1.0 for k, w in zip(kept.tolist(), wrong.tolist(),
                                                                                      strict=True)]
    assert ours.tolist() == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_nothing_certified_means_no_threshold_and_a_reason() -> None:
    u, correct = synthetic(30, 0)
    cert = learn_then_test(u, correct, score="predictive_entropy", target_risk=0.01, delta=0.05)
    assert not cert.certified and cert.threshold is None and "certifies" in cert.reason
    with pytest.raises(ValueError):
        learn_then_test(u, correct, score="predictive_entropy", target_risk=0.0, delta=0.05)
    with pytest.raises(ValueError):
        threshold_grid("accuracy")


def test_anytime_bound_is_valid_at_every_count_on_iid_streams() -> None:
    gen = torch.Generator().manual_seed(0)
    streams, length, p, level = 2000, 2000, 0.1, 0.05
    x = (torch.rand(streams, length, generator=gen) < p).double()
    t = torch.arange(1, length + 1, dtype=torch.float64)
    radius = torch.tensor([anytime_radius(int(i), level) for i in t])
    crossed = ((x.cumsum(1) / t - radius) > p).any(1).double().mean().item()
    naive = ((x.cumsum(1) / t - torch.sqrt(math.log(1 / level) / (2 * t))) > p).any(1).double().mean().item()
    print(f"ever above the truth: confidence sequence {crossed:.4f}, fixed-n Hoeffding repeated {naive:.4f}")
    assert crossed <= level
    assert naive > crossed  # repeating a fixed-n bound at every count does inflate its error


def test_anytime_bound_fires_on_a_drifting_stream() -> None:
    gen = torch.Generator().manual_seed(1)
    before = (torch.rand(500, generator=gen) < 0.08).double()
    after = (torch.rand(2000, generator=gen) < 0.35).double()  # the set misses 35 % after the shift
    stream = torch.cat([before, after]).tolist()
    misses, fired = 0.0, None
    for t, x in enumerate(stream, 1):
        misses += x
        if anytime_lower_bound(misses, t, 0.05) > 0.1:
            fired = t
            break
    assert fired is not None and 500 < fired < 2500
    misses = sum(before.tolist())
    assert all(anytime_lower_bound(sum(before.tolist()[:t]), t, 0.05) <= 0.1 for t in range(1, 501))
    assert misses / 500 < 0.1


def test_references_round_trip_and_refuse_inconsistency() -> None:
    probs = torch.softmax(torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)
    labels = torch.zeros(50, dtype=torch.long)
    ref = conformal_reference(probs, labels, "h")
    again = ConformalReference.model_validate_json(ref.model_dump_json())
    assert again.qhat(0.1) == ref.qhat(0.1) and again.sets(probs, 0.2).equal(ref.sets(probs, 0.2))
    with pytest.raises(ValueError):
        ref.qhat(1 / 60)  # below 1/(n+1) = 1/51
    with pytest.raises(ValueError):
        ConformalReference(n=2, data_hash="h", sorted_scores=(0.5, 0.1))
    risk = risk_reference({"one_minus_max_probability": 1 - probs.max(-1).values}, probs.argmax(-1) == labels, "h")
    assert RiskReference.model_validate_json(risk.model_dump_json()) == risk
    with pytest.raises(ValueError):
        RiskReference(n=3, data_hash="h", values={"one_minus_max_probability": (0.1, 0.2)}, correct=(True,) * 3)
