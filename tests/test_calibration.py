"""Temperature fitting recovers a known temperature; thresholds respect the target risk."""

from __future__ import annotations

import math

import pytest
import torch

from core.calibration import (
    apply_temperature,
    calibrate_abstention,
    fit_temperature,
    fit_temperature_members,
    rule_outcome,
)

T_TRUE = 2.5


def _sample(logits: torch.Tensor, t: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(logits / t, -1), 1, generator=g)[:, 0]


def _padded_logits(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 4.0
    n_choices = torch.randint(2, k + 1, (n,), generator=g)
    return z.masked_fill(torch.arange(k)[None, :] >= n_choices[:, None], -math.inf)


@pytest.mark.parametrize("method", ["lbfgs", "golden"])
def test_fit_temperature_recovers_known_t(method) -> None:
    z = _padded_logits(20000, 5, seed=0)
    y = _sample(z, T_TRUE, seed=1)
    t = fit_temperature(z, y, method=method)
    assert abs(t - T_TRUE) / T_TRUE < 0.05


@pytest.mark.parametrize("method", ["lbfgs", "golden"])
def test_fit_temperature_members_recovers_known_t(method) -> None:
    n, m, k = 20000, 3, 4
    g = torch.Generator().manual_seed(2)
    shared = torch.randn(n, 1, k, generator=g, dtype=torch.float64) * 4.0
    z = shared + torch.randn(n, m, k, generator=g, dtype=torch.float64)
    z[:, :, 3] = z[:, :, 3].masked_fill(torch.arange(n)[:, None] % 2 == 0, -math.inf)  # half have 3 choices
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    mixture = (w[None, :, None] * torch.softmax(z / T_TRUE, -1)).sum(1)
    y = torch.multinomial(mixture, 1, generator=g)[:, 0]
    t = fit_temperature_members(z, y, w, method=method)
    assert abs(t - T_TRUE) / T_TRUE < 0.05
    # one member: the shared-T fit equals the single-model fit
    t1 = fit_temperature_members(z[:, :1], y, None, method=method)
    assert t1 == pytest.approx(fit_temperature(z[:, 0], y, method=method), rel=1e-4)


def test_temperature_clamped_and_validated() -> None:
    z = torch.tensor([[10.0, -10.0], [-10.0, 10.0]] * 50)
    y = torch.tensor([0, 1] * 50)
    assert fit_temperature(z, y) == pytest.approx(0.05)  # separable: T → 0, clamped
    assert fit_temperature(z, 1 - y) == pytest.approx(20.0)  # always wrong: T → ∞, clamped
    with pytest.raises(ValueError, match="not finite"):
        fit_temperature(torch.tensor([[0.0, -math.inf]]), torch.tensor([1]))


def test_apply_temperature() -> None:
    z = torch.tensor([[1.0, 2.0, -math.inf]])
    p = apply_temperature(z, 2.0)
    assert p.dtype == z.dtype and p[0, 2] == 0.0
    torch.testing.assert_close(p, torch.softmax(torch.tensor([[0.5, 1.0, -math.inf]]), -1))
    member = apply_temperature(z[:, None, :].expand(1, 3, 3), 2.0)
    assert member.shape == (1, 3, 3)


def _naive_best_rule(scores: dict[str, torch.Tensor], correct: torch.Tensor, target_risk: float):
    """Brute force over every vector of (distinct values ∪ {inf}): (coverage, risk) of the best rule."""
    import itertools

    names = list(scores)
    grids = [[*sorted(set(scores[k].tolist())), math.inf] for k in names]
    best = None
    for combo in itertools.product(*grids):
        keep = [all(scores[k][i] <= t for k, t in zip(names, combo, strict=True)) for i in range(len(correct))]
        kept = sum(keep)
        if kept == 0:
            continue
        risk = sum(1 for i, k in enumerate(keep) if k and not correct[i]) / kept
        if risk <= target_risk + 1e-12 and (best is None or (kept / len(correct), -risk) > (best[0], -best[1])):
            best = (kept / len(correct), risk)
    return best


def test_calibrate_abstention_single_score_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    n = 300
    score = torch.rand(n, generator=g, dtype=torch.float64)
    correct = torch.rand(n, generator=g, dtype=torch.float64) > score * 0.6  # error rate rises with score
    rule = calibrate_abstention({"good": score}, correct, target_risk=0.2, min_coverage=0.5)
    coverage, risk = _naive_best_rule({"good": score}, correct, 0.2)
    assert rule.met and rule.coverage == pytest.approx(coverage) and rule.risk == pytest.approx(risk)
    # the stated coverage and risk are those of exactly the stored rule, recomputed by a loop
    kept = [i for i in range(n) if score[i] <= rule.thresholds["good"]]
    assert len(kept) / n == pytest.approx(rule.coverage)
    assert sum(not correct[i] for i in kept) / len(kept) == pytest.approx(rule.risk)
    assert rule_outcome({"good": score}, rule.thresholds, correct) == pytest.approx((rule.coverage, rule.risk))


def test_calibrate_abstention_joint_rule_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(5)
    n = 40
    a = torch.rand(n, generator=g, dtype=torch.float64).round(decimals=1)
    b = torch.rand(n, generator=g, dtype=torch.float64).round(decimals=1)
    correct = torch.rand(n, generator=g, dtype=torch.float64) > (a + b) * 0.4
    rule = calibrate_abstention({"a": a, "b": b}, correct, target_risk=0.15, min_coverage=0.0)
    coverage, risk = _naive_best_rule({"a": a, "b": b}, correct, 0.15)
    assert rule.coverage == pytest.approx(coverage) and rule.risk == pytest.approx(risk)
    assert rule_outcome({"a": a, "b": b}, rule.thresholds, correct) == pytest.approx((coverage, risk))
    # the joint rule is at least as good as either score alone
    for name in ("a", "b"):
        alone = calibrate_abstention({name: {"a": a, "b": b}[name]}, correct, target_risk=0.15, min_coverage=0.0)
        assert rule.coverage >= alone.coverage


def test_calibrate_abstention_unmet_target_serves_no_threshold() -> None:
    g = torch.Generator().manual_seed(7)
    noise = torch.rand(1000, generator=g, dtype=torch.float64)
    correct = torch.rand(1000, generator=g, dtype=torch.float64) > 0.3  # error rate 0.3 whatever the score
    rule = calibrate_abstention({"noise": noise}, correct, target_risk=0.2, min_coverage=0.5)
    assert not rule.met and rule.thresholds == {}
    assert "min_coverage" in rule.reason or "no rule" in rule.reason
    assert rule.coverage == 1.0 and rule.risk == pytest.approx(float((~correct).double().mean()))
    if rule.best_thresholds is not None:  # a small low-noise corner may reach the risk, at low coverage
        assert rule.best_coverage is not None and rule.best_coverage < 0.5
        cov, risk = rule_outcome({"noise": noise}, rule.best_thresholds, correct)
        assert cov == pytest.approx(rule.best_coverage) and risk <= 0.2


def test_calibrate_abstention_edge_cases() -> None:
    correct = torch.tensor([True, True, False, True])
    ok = calibrate_abstention({"s": torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)}, correct,
                              target_risk=0.3, min_coverage=0.5)
    assert ok.met and ok.thresholds == {} and ok.coverage == 1.0  # risk 0.25 ≤ 0.3: answer everything, no limit
    nan = calibrate_abstention({"s": torch.full((4,), math.nan)}, correct, target_risk=0.3, min_coverage=0.5)
    assert nan.met and nan.thresholds == {}  # +inf (no restriction) is the loosest rule meeting the target
