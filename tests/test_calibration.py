"""Temperature fitting recovers a known temperature; thresholds respect the target risk."""

from __future__ import annotations

import math

import pytest
import torch

from core.calibration import apply_temperature, choose_thresholds, fit_temperature, fit_temperature_members

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


def test_choose_thresholds_respects_target_risk() -> None:
    g = torch.Generator().manual_seed(3)
    n = 4000
    score = torch.rand(n, generator=g, dtype=torch.float64)
    correct = torch.rand(n, generator=g, dtype=torch.float64) > score * 0.6  # error rate rises with score
    noise = torch.rand(n, generator=g, dtype=torch.float64)
    out = choose_thresholds({"good": score, "noise": noise, "rounded": (score * 10).round()}, correct,
                            target_risk=0.2, min_coverage=0.5)
    assert list(out) == ["good", "noise", "rounded"]
    for name, s in (("good", score), ("rounded", (score * 10).round())):
        t = out[name]
        assert t is not None
        kept = s <= t
        assert kept.double().mean() >= 0.5
        assert (~correct[kept]).double().mean() <= 0.2
        # largest: the next distinct value up breaks the target
        above = s[s > t]
        if above.numel():
            kept_next = s <= above.min()
            assert (~correct[kept_next]).double().mean() > 0.2
    # noise: overall risk ≈ 0.3 at every coverage → the fallback at min_coverage
    t = out["noise"]
    assert t is not None
    assert (noise <= t).double().mean() == pytest.approx(0.5, abs=1 / n)
    assert (noise < t).double().mean() < 0.5


def test_choose_thresholds_edge_cases() -> None:
    correct = torch.tensor([True, True, False, True])
    scores = {"all_ok": torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64),
              "nan": torch.full((4,), math.nan)}
    out = choose_thresholds(scores, correct, target_risk=0.3, min_coverage=0.5)
    assert out == {"all_ok": 0.4, "nan": None}  # overall risk 0.25 ≤ 0.3: answer everything
