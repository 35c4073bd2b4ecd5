"""core.metrics against naive numpy loops and scikit-learn; training.plots writes PNGs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from core import metrics
from core.uncertainty import decompose


def _data(n: int = 500, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(k, 0.6), size=n)
    probs = np.concatenate([probs, np.zeros((n, 2))], 1)  # two padded choices
    labels = np.array([rng.choice(k, p=p[:k]) if rng.random() < 0.7 else rng.integers(k) for p in probs])
    return torch.from_numpy(probs), torch.from_numpy(labels)


def _ece_loop(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        sel = [i for i in range(len(conf)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if sel:
            acc = np.mean([pred[i] == labels[i] for i in sel])
            total += len(sel) / len(conf) * abs(acc - np.mean(conf[sel]))
    return total


def test_point_metrics_match_loops() -> None:
    probs, labels = _data()
    p, y = probs.numpy(), labels.numpy()
    assert metrics.accuracy(probs, labels) == pytest.approx(np.mean(p.argmax(1) == y))
    nll = np.mean([-math.log(p[i, y[i]]) for i in range(len(y))])
    assert metrics.nll(probs, labels) == pytest.approx(nll)
    brier = np.mean([sum((p[i, j] - (j == y[i])) ** 2 for j in range(p.shape[1])) for i in range(len(y))])
    assert metrics.brier(probs, labels) == pytest.approx(brier)
    for n_bins in (1, 10, 15):
        assert metrics.ece(probs, labels, n_bins) == pytest.approx(_ece_loop(p, y, n_bins), abs=1e-12)


def test_reliability_bins_edges_and_nll_clamp() -> None:
    conf = torch.tensor([0.0, 0.5, 0.5000001, 1.0])
    bins = metrics.reliability_bins(conf, torch.tensor([True, False, True, True]), n_bins=2)
    assert bins.count.tolist() == [2, 2]  # (0, .5] with 0 included, then (.5, 1]
    assert bins.accuracy.tolist() == [0.5, 1.0]
    empty = metrics.reliability_bins(torch.tensor([0.9]), torch.tensor([True]), n_bins=4)
    assert empty.count.tolist() == [0, 0, 0, 1] and math.isnan(float(empty.accuracy[0]))
    assert math.isfinite(metrics.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))


def test_auroc_auprc_match_sklearn_with_ties() -> None:
    rng = np.random.default_rng(1)
    for trial in range(5):
        n = 300
        score = rng.integers(0, 12, size=n).astype(float) / 7  # heavy ties
        if trial % 2:
            score = score + rng.normal(size=n) * 0.01
        err = rng.random(n) < 1 / (1 + np.exp(-(score - 0.8) * 2))
        s, e = torch.from_numpy(score), torch.from_numpy(err)
        assert metrics.auroc(s, e) == pytest.approx(roc_auc_score(err, score), abs=1e-12)
        assert metrics.auprc(s, e) == pytest.approx(average_precision_score(err, score), abs=1e-12)
    assert math.isnan(metrics.auroc(torch.rand(5), torch.zeros(5, dtype=torch.bool)))
    assert math.isnan(metrics.auprc(torch.rand(5), torch.ones(5, dtype=torch.bool)))
    assert metrics.auroc(torch.zeros(4), torch.tensor([True, False, True, False])) == 0.5


def test_risk_coverage_and_selective_accuracy() -> None:
    score = torch.tensor([0.3, 0.1, 0.2, 0.2, 0.9])
    correct = torch.tensor([False, True, True, False, False])
    cov, risk = metrics.risk_coverage(score, correct)
    assert cov.tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    # ascending, stable: 0.1(T) 0.2(T) 0.2(F) 0.3(F) 0.9(F)
    assert risk.tolist() == pytest.approx([0.0, 0.0, 1 / 3, 0.5, 0.6])
    assert metrics.aurc(score, correct) == pytest.approx(np.mean([0, 0, 1 / 3, 0.5, 0.6]))
    assert metrics.accuracy_at_coverage(score, correct, 0.8) == pytest.approx(0.5)
    assert metrics.accuracy_at_coverage(score, correct, 0.4) == pytest.approx(1.0)
    assert metrics.accuracy_at_coverage(score, correct, 1.0) == pytest.approx(0.4)


def test_summarize_keys_and_single_member() -> None:
    rng = np.random.default_rng(2)
    member_probs = torch.from_numpy(rng.dirichlet(np.full(4, 0.5), size=(200, 3)))
    labels = torch.from_numpy(rng.integers(0, 4, size=200))
    out = metrics.summarize(member_probs, labels, torch.tensor([1.0, 2.0, 1.0]))
    expected = {"acc", "nll", "brier", "ece", "predictive_entropy", "mutual_information", "expected_entropy",
                "aurc", "acc_at_80_coverage", "n"}
    expected |= {f"{m}_{s}" for m in ("auroc", "auprc") for s in ("entropy", "mi", "one_minus_max_prob")}
    assert set(out) == expected and out["n"] == 200.0
    u = decompose(member_probs, torch.tensor([1.0, 2.0, 1.0]))
    assert out["acc"] == pytest.approx(metrics.accuracy(u.probabilities, labels))
    assert out["mutual_information"] == pytest.approx(float(u.mutual_information.mean()))
    assert all(isinstance(v, float) for v in out.values())
    single = metrics.summarize(member_probs[:, :1], labels)
    # one member: MI is undefined, never a fake 0 / 0.5; finite_metrics turns it into null with a reason
    assert all(math.isnan(single[k]) for k in metrics.MI_METRICS)
    values, undefined = metrics.finite_metrics(single, "one member")
    assert set(undefined) == set(metrics.MI_METRICS) and set(undefined.values()) == {"one member"}
    assert values["acc"] == pytest.approx(metrics.accuracy(member_probs[:, 0], labels))


def test_histograms_ks_psi() -> None:
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.beta(2, 5, size=1000))
    edges = [i / 20 for i in range(21)]
    counts = metrics.histogram(x, edges)
    assert sum(counts) == 1000 and counts == np.histogram(x.numpy(), bins=edges)[0].tolist()
    assert metrics.histogram(torch.tensor([-1.0, 2.0, math.nan]), [0.0, 0.5, 1.0]) == [1, 1]
    assert metrics.ks_statistic(x, edges, counts) == 0.0
    assert metrics.psi(x, edges, counts) == 0.0
    assert metrics.ks_statistic(torch.cat([x, x]), edges, counts) == 0.0  # same distribution, other size
    far = torch.full((50,), 0.99, dtype=torch.float64)
    low = metrics.histogram(torch.full((50,), 0.01), edges)
    assert metrics.ks_statistic(far, edges, low) == pytest.approx(1.0)
    assert metrics.psi(far, edges, low) > 1.0
    shifted = torch.from_numpy(rng.beta(5, 2, size=500))
    assert metrics.psi(shifted, edges, counts) > 0 and 0 < metrics.ks_statistic(shifted, edges, counts) <= 1


def test_reference_histograms_layout() -> None:
    rng = np.random.default_rng(4)
    u = decompose(torch.from_numpy(rng.dirichlet(np.ones(3), size=(100, 2))))
    ref = metrics.reference_histograms(u, num_choices=3)
    assert set(ref) == {"confidence", "predictive_entropy", "mutual_information"}
    for name, h in ref.items():
        assert len(h["edges"]) == 21 and len(h["counts"]) == 20 and sum(h["counts"]) == 100
        assert h["edges"][-1] == pytest.approx(1.0 if name == "confidence" else math.log(3))
        assert all(isinstance(c, int) for c in h["counts"])


def test_plots_write_pngs(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from training import plots

    probs, labels = _data(n=200)
    u = decompose(probs[:, None, :].repeat(1, 2, 1) * 0.5 + torch.softmax(torch.randn(200, 2, 6), -1) * 0.5)
    correct = u.probabilities.argmax(-1) == labels
    h, mi = u.predictive_entropy, u.mutual_information
    paths = [
        plots.reliability_diagram(probs, labels, tmp_path / "rel.png", "test"),
        plots.accuracy_coverage_curve(
            {name: (c, 1 - r) for name, (c, r) in
             {"entropy": metrics.risk_coverage(u.predictive_entropy, correct),
              "mi": metrics.risk_coverage(u.mutual_information, correct)}.items()},
            tmp_path / "sub" / "cov.png", "coverage"),
        plots.mi_entropy_histogram(h, mi, correct, tmp_path / "mi.png", "mi"),
        plots.mi_entropy_histogram(h, mi, torch.ones(200, dtype=torch.bool), tmp_path / "mi_all_correct.png"),
    ]
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
