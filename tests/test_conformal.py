"""Conformal answer sets (core/conformal.py) against MAPIE, naive loops and their coverage guarantee on
synthetic data with a known truth; the Hoeffding–Bentkus p-value's validity. (Foundation for issue 12; not
yet served.)"""

from __future__ import annotations

import warnings

import pytest
import torch

from core.conformal import (
    all_scores,
    conformal_quantile,
    hoeffding_bentkus_pvalue,
    min_alpha,
    nonconformity,
    prediction_sets,
    quantile_rank,
)


def synthetic(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated by construction: y ~ Categorical(p). probs [n, k], labels [n]."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.distributions.Dirichlet(torch.full((k,), 0.7, dtype=torch.float64)).sample((n,))
    labels = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return probs, labels


def test_lac_sets_equal_mapie_split_conformal_prefit() -> None:
    np = pytest.importorskip("numpy")
    pytest.importorskip("mapie")
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Table(ClassifierMixin, BaseEstimator):  # a prefit "model" whose output is our probabilities
        def __init__(self, probs: object = None) -> None:
            self.probs = probs

        def fit(self, x: object, y: object) -> Table:
            return self

        def predict_proba(self, x: object) -> object:
            return self.probs[np.asarray(x)[:, 0].astype(int)]  # type: ignore[index]

        def predict(self, x: object) -> object:
            return self.predict_proba(x).argmax(1)  # type: ignore[attr-defined]

    probs, labels = synthetic(500, 5, seed=0)
    n = 300
    table = Table(probs.numpy())
    table.classes_, table.n_features_in_ = np.arange(5), 1
    x = np.arange(500)[:, None]
    for alpha in (0.05, 0.1, 0.2):  # (MAPIE refuses α = 1/(n+1); we serve it: q̂ = the largest score)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mapie = SplitConformalClassifier(table, confidence_level=1 - alpha, conformity_score="lac", prefit=True)
            mapie.conformalize(x[:n], labels[:n].numpy())
            _, theirs = mapie.predict_set(x[n:])
        qhat = conformal_quantile(torch.sort(nonconformity(probs[:n], labels[:n])).values, alpha)
        ours = prediction_sets(probs[n:], qhat).numpy()
        assert (ours == theirs[:, :, 0]).all(), alpha


def test_quantile_edges() -> None:
    scores = torch.tensor([0.1, 0.2, 0.2, 0.2, 0.5])  # ties
    assert quantile_rank(5, 0.5) == 3 and conformal_quantile(scores, 0.5) == pytest.approx(0.2)
    assert conformal_quantile(scores, min_alpha(5)) == pytest.approx(0.5)  # α = 1/(n+1): the largest score
    with pytest.raises(ValueError, match="smallest supported alpha is 1/\\(n\\+1\\)"):
        conformal_quantile(scores, 0.1)  # ⌈6 · 0.9⌉ = 6 > 5
    assert conformal_quantile(torch.tensor([0.3]), 0.5) == pytest.approx(0.3)  # n = 1, α = 1/2
    with pytest.raises(ValueError):
        quantile_rank(10, 0.0)


def test_aps_and_raps_scores_equal_naive_loops() -> None:
    probs, _ = synthetic(50, 4, seed=1)
    probs[0] = torch.tensor([0.4, 0.2, 0.4, 0.0], dtype=torch.float64)  # ties keep choice order
    aps, raps = all_scores(probs, "aps"), all_scores(probs, "raps", raps_lambda=0.1, raps_k=1)
    for i, p in enumerate(probs.tolist()):
        order = sorted(range(4), key=lambda j: (-p[j], j))
        for rank, k in enumerate(order):
            mass = sum(p[j] for j in order[: rank + 1])
            assert aps[i, k] == pytest.approx(mass, abs=1e-12)
            assert raps[i, k] == pytest.approx(mass + 0.1 * max(0, rank + 1 - 1), abs=1e-12)


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_coverage_holds_over_resamples(score: str) -> None:
    alpha, n, trials = 0.1, 200, 300
    covered = []
    for t in range(trials):
        probs, labels = synthetic(n + 100, 4, seed=100 + t)
        qhat = conformal_quantile(torch.sort(nonconformity(probs[:n], labels[:n], score)).values, alpha)
        sets = prediction_sets(probs[n:], qhat, score)
        covered.append(float(sets[torch.arange(100), labels[n:]].double().mean()))
    mean = sum(covered) / trials
    # E[coverage] ≥ 1 − α, and ≤ 1 − α + 1/(n+1) for continuous scores; ± 3 standard errors
    se = (sum((c - mean) ** 2 for c in covered) / (trials - 1)) ** 0.5 / trials**0.5
    assert mean >= 1 - alpha - 3 * se
    if score == "lac":
        assert mean <= 1 - alpha + 1 / (n + 1) + 3 * se


def test_hoeffding_bentkus_is_a_valid_pvalue() -> None:
    """Under H0 (true risk = ε) the p-value is ≤ u with probability ≤ u."""
    gen = torch.Generator().manual_seed(0)
    eps, n = 0.2, 100
    risks = (torch.rand(2000, n, generator=gen) < eps).double().mean(1)
    pvalues = torch.tensor([hoeffding_bentkus_pvalue(float(r), n, eps) for r in risks])
    for u in (0.05, 0.1, 0.2):
        assert float((pvalues <= u).double().mean()) <= u
    assert hoeffding_bentkus_pvalue(0.0, 1000, 0.2) < 1e-20 and hoeffding_bentkus_pvalue(0.5, 100, 0.2) == 1.0
