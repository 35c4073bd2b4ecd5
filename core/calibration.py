"""Post-hoc calibration: temperature scaling (single model and ensemble) and abstention thresholds.

Scores are logits / per-choice scores ``[N, K]`` (or ``[N, M, K]`` per member) with ``-inf`` for absent
choices; ``softmax(s / T)`` gives them probability 0 at every T. Temperatures are fitted by minimizing
validation NLL over ``log T`` in float64 and clamped to ``[T_MIN, T_MAX]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch

T_MIN, T_MAX = 0.05, 20.0
Method = Literal["lbfgs", "golden"]
_F = torch.float64


def _split_absent(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores with non-finite entries zeroed, absent mask) so that s / T never meets ±inf."""
    absent = ~torch.isfinite(scores)
    return scores.masked_fill(absent, 0.0), absent


def _tempered_log_softmax(finite: torch.Tensor, absent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log softmax(s / T) over the last dim, absent entries at -inf; differentiable in T (their grad is 0)."""
    return torch.log_softmax((finite / t).masked_fill(absent, -math.inf), dim=-1)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated probabilities ``softmax(scores / T)`` over the last dim. scores [..., K] → [..., K]
    (same dtype); -inf scores get probability 0."""
    t = torch.tensor(float(temperature), dtype=_F, device=scores.device)
    return _tempered_log_softmax(*_split_absent(scores.to(_F)), t).exp().to(scores.dtype)


def _check_labels(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """labels [N] → long; raises if a label points at an absent (non-finite) choice in any member."""
    y = labels.long().to(scores.device)
    idx = y.view(-1, *([1] * (scores.dim() - 1)))
    idx = idx.expand(*scores.shape[:-1], 1)
    if not torch.isfinite(scores.gather(-1, idx)).all():
        raise ValueError("a label points at a choice whose score is not finite")
    return y


def _minimize_log_t(objective: Callable[[torch.Tensor], torch.Tensor], method: Method) -> float:
    """argmin over T of objective(log T) (a 0-dim float64 tensor → scalar), clamped to [T_MIN, T_MAX]."""
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    if method == "lbfgs":
        log_t = torch.zeros((), dtype=_F, requires_grad=True)
        # absolute tolerances ~0: near-separable data has a tiny, flat NLL that must still be followed;
        # the clamp zeroes the gradient outside the bounds, which stops the search there
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-13,
                                tolerance_change=0.0, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = objective(log_t.clamp(lo, hi))
            loss.backward()
            return loss

        opt.step(closure)  # type: ignore[no-untyped-call]
        value = min(max(float(log_t.detach()), lo), hi) if math.isfinite(float(log_t.detach())) else math.nan
        if math.isfinite(value) and value in (lo, hi):
            return math.exp(value)
        if math.isfinite(value):
            at = torch.tensor(value, dtype=_F, requires_grad=True)
            loss = objective(at)
            (grad,) = torch.autograd.grad(loss, at)
            nll = float(loss.detach())
            if nll > 0.0 and abs(float(grad)) <= 1e-6 * nll:  # stationary point: done
                return math.exp(value)
        method = "golden"  # stalled on a flat, tiny NLL or diverged: use the bracketed search
    if method != "golden":
        raise ValueError(f"unknown method {method!r}")
    # golden-section search on [log T_MIN, log T_MAX]; NLL is unimodal in log T (convex in 1/T)

    def f(x: float) -> float:
        with torch.no_grad():
            return float(objective(torch.tensor(x, dtype=_F)))

    return math.exp(golden_section_minimize(f, lo, hi, tol=1e-7))


def golden_section_minimize(f: Callable[[float], float], a: float, b: float, tol: float = 1e-7) -> float:
    """Argmin of a unimodal ``f`` on ``[a, b]`` by golden-section search, to an interval narrower than ``tol``."""
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def fit_temperature(scores: torch.Tensor, labels: torch.Tensor, method: Method = "lbfgs") -> float:
    """T minimizing ``mean_n −log softmax(s_n / T)[y_n]``. scores [N, K] (−inf = absent), labels [N]."""
    s = scores.detach().to(_F)
    y = _check_labels(s, labels)
    finite, absent = _split_absent(s)

    def objective(log_t: torch.Tensor) -> torch.Tensor:
        logp = _tempered_log_softmax(finite, absent, log_t.exp())
        return -logp.gather(-1, y[:, None]).mean()

    return _minimize_log_t(objective, method)


def fit_temperature_members(member_scores: torch.Tensor, labels: torch.Tensor,
                            weights: torch.Tensor | None = None, method: Method = "lbfgs") -> float:
    """One T shared by all members, minimizing the NLL of the weighted mixture:
    ``mean_n −log Σ_m w_m softmax(s_{n,m} / T)[y_n]``. member_scores [N, M, K], labels [N], weights [M]."""
    s = member_scores.detach().to(_F)
    y = _check_labels(s, labels)
    m = s.shape[-2]
    w = torch.full((m,), 1.0 / m, dtype=_F) if weights is None else weights.detach().to(_F).cpu()
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("member weights must be non-negative with a positive sum")
    log_w = (w / w.sum()).log().to(s.device)
    idx = y[:, None, None].expand(-1, m, 1)
    finite, absent = _split_absent(s)

    def objective(log_t: torch.Tensor) -> torch.Tensor:
        logp_y = _tempered_log_softmax(finite, absent, log_t.exp()).gather(-1, idx)[..., 0]  # [N, M]
        return -torch.logsumexp(logp_y + log_w, dim=-1).mean()

    return _minimize_log_t(objective, method)


def choose_thresholds(scores: Mapping[str, torch.Tensor], correct: torch.Tensor, target_risk: float = 0.2,
                      min_coverage: float = 0.5) -> dict[str, float | None]:
    """Abstention threshold per score (keep an item iff score <= t), each chosen independently.

    For each score [N] the candidates are its distinct values; t keeps ``coverage(t) = #{s <= t} / N`` items
    with selective risk ``risk(t) = #{errors, s <= t} / #{s <= t}``. Returns the largest t with
    ``risk(t) <= target_risk`` and ``coverage(t) >= min_coverage``. If no t qualifies, returns the smallest t
    with ``coverage(t) >= min_coverage`` (the risk target is then missed, but at least min_coverage of the
    traffic is still answered). Non-finite scores are left out; None when none is finite. correct [N] bool.
    """
    hit = correct.detach().cpu().reshape(-1).bool()
    out: dict[str, float | None] = {}
    for name, score in scores.items():
        s = score.detach().to(device="cpu", dtype=_F).reshape(-1)
        if s.numel() != hit.numel():
            raise ValueError(f"score {name!r} has {s.numel()} values for {hit.numel()} labels")
        keep = torch.isfinite(s)
        s, errors = s[keep], (~hit[keep]).to(_F)
        if s.numel() == 0:
            out[name] = None
            continue
        order = torch.argsort(s, stable=True)
        s, errors = s[order], errors[order]
        last = torch.cat([s[1:] != s[:-1], torch.tensor([True])])  # a threshold keeps whole tie runs
        kept = torch.arange(1, s.numel() + 1, dtype=_F)[last]
        risk = errors.cumsum(0)[last] / kept
        coverage = kept / s.numel()
        values = s[last]
        enough = coverage >= min_coverage - 1e-12
        ok = enough & (risk <= target_risk + 1e-12)
        if ok.any():
            out[name] = float(values[ok].max())
        else:
            out[name] = float(values[enough].min())  # the last value always has coverage 1
    return out
