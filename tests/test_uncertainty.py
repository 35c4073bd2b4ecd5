"""Closed forms and a numpy reference for the entropy decomposition in core.uncertainty."""

from __future__ import annotations

import math

import numpy as np
import torch

from core.uncertainty import decompose, entropy, predictive


def _dirichlet(shape: tuple[int, ...], k: int, seed: int, alpha: float = 0.5) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.dirichlet(np.full(k, alpha), size=shape)).double()


def test_identical_members_have_zero_mi() -> None:
    p = _dirichlet((50,), 4, seed=0)
    u = decompose(p[:, None, :].expand(50, 3, 4))
    torch.testing.assert_close(u.mutual_information, torch.zeros(50, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(u.predictive_entropy, entropy(p))
    torch.testing.assert_close(u.probabilities, p)


def test_two_disagreeing_one_hot_members() -> None:
    members = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)  # [1, 2, 3]
    u = decompose(members, torch.tensor([0.5, 0.5]))
    assert math.isclose(float(u.mutual_information[0]), math.log(2), rel_tol=1e-12)
    assert math.isclose(float(u.predictive_entropy[0]), math.log(2), rel_tol=1e-12)
    assert float(u.expected_entropy[0]) == 0.0
    assert float(u.max_probability[0]) == 0.5


def test_bounds_on_random_dirichlet() -> None:
    k = 5
    u = decompose(_dirichlet((400, 4), k, seed=1), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    tol = 1e-12
    assert (u.mutual_information >= 0).all()
    assert (u.mutual_information <= u.predictive_entropy + tol).all()
    assert (u.expected_entropy <= u.predictive_entropy + tol).all()
    assert (u.predictive_entropy <= math.log(k) + tol).all()


def test_padded_zero_choices_do_not_change_entropy() -> None:
    p = _dirichlet((20, 3), 3, seed=2)
    padded = torch.cat([p, torch.zeros(20, 3, 2, dtype=torch.float64)], -1)
    a, b = decompose(p), decompose(padded)
    torch.testing.assert_close(a.predictive_entropy, b.predictive_entropy)
    torch.testing.assert_close(a.mutual_information, b.mutual_information)


def test_decompose_matches_numpy_loop() -> None:
    rng = np.random.default_rng(3)
    n, m, k = 30, 4, 6
    p = rng.dirichlet(np.full(k, 0.7), size=(n, m))
    w = rng.random(m)
    u = decompose(torch.from_numpy(p), torch.from_numpy(w))
    wn = w / w.sum()
    for i in range(n):
        mean = sum(wn[j] * p[i, j] for j in range(m))
        h_total = -sum(x * math.log(x) for x in mean if x > 0)
        h_members = [-sum(x * math.log(x) for x in p[i, j] if x > 0) for j in range(m)]
        h_expected = sum(wn[j] * h_members[j] for j in range(m))
        assert math.isclose(float(u.predictive_entropy[i]), h_total, rel_tol=1e-10)
        assert math.isclose(float(u.expected_entropy[i]), h_expected, rel_tol=1e-10)
        assert math.isclose(float(u.mutual_information[i]), h_total - h_expected, rel_tol=1e-8, abs_tol=1e-12)
        assert math.isclose(float(u.max_probability[i]), mean.max(), rel_tol=1e-12)
        np.testing.assert_allclose(u.probabilities[i].numpy(), mean, rtol=1e-12)
    torch.testing.assert_close(predictive(torch.from_numpy(p), torch.from_numpy(w)), u.probabilities)
