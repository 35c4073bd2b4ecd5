"""Post-hoc calibration: temperature scaling (single model and ensemble) and the served abstention rule.

Scores are logits / per-choice scores ``[N, K]`` (or ``[N, M, K]`` per member) with ``-inf`` for absent
choices; ``softmax(s / T)`` gives them probability 0 at every T. Temperatures are fitted by minimizing
validation NLL over ``log T`` in float64 and clamped to ``[T_MIN, T_MAX]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch

from core.bundle import RuleCalibration

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


class AbstentionRule(RuleCalibration):
    """A served abstention rule (:class:`core.bundle.RuleCalibration`, what the manifest stores) with its
    thresholds: answer iff every score in ``thresholds`` is ≤ its threshold. Empty when the target was not
    met (no abstention is served in the bundle's name); ``best_thresholds`` then keeps the rule that reaches
    the risk target at the highest coverage, if any."""

    thresholds: dict[str, float]

    def stored(self) -> RuleCalibration:
        """The manifest's record of this rule (the thresholds themselves live in ``Thresholds``)."""
        return RuleCalibration(**self.model_dump(exclude={"thresholds"}))


def _candidates(score: torch.Tensor, limit: int) -> torch.Tensor:
    """Threshold candidates of one score [N]: its distinct finite values (at most ``limit``, by quantile),
    plus +inf (the score does not restrict)."""
    values = torch.unique(score[torch.isfinite(score)])
    if values.numel() > limit:
        idx = torch.linspace(0, values.numel() - 1, limit).round().long().unique()
        values = values[idx]
    return torch.cat([values, torch.tensor([math.inf], dtype=_F)])


def _with_margin(values: torch.Tensor, threshold: float) -> float:
    """Move a threshold that sits on a calibration score halfway to the next larger one (or 1e-6 above the
    largest): the same calibration questions pass, and float noise far below that gap (another batch shape,
    another engine) cannot flip a question on the edge. values [N]."""
    if not math.isfinite(threshold):
        return threshold
    above = values[values > threshold]
    if above.numel() == 0:
        return threshold + 1e-6 * max(1.0, abs(threshold))
    return (threshold + float(above.min())) / 2


def calibrate_abstention(scores: Mapping[str, torch.Tensor], correct: torch.Tensor, *, target_risk: float = 0.2,
                         min_coverage: float = 0.5, max_combinations: int = 50_000) -> AbstentionRule:
    """Choose the served rule "answer iff score_s ≤ t_s for every s" jointly over the given scores.

    Among all threshold vectors (each score's distinct values, capped by quantiles when the grid would
    exceed ``max_combinations``, and +inf = unrestricted) it takes the one with the highest coverage whose
    selective risk (errors among answered / answered) is ≤ ``target_risk``; ties go to the lower risk. With
    one score the search is exact over every distinct value. Non-finite scores never pass a finite
    threshold. scores name → [N], correct [N] bool.
    """
    names = tuple(scores)
    if not names:
        raise ValueError("calibrate_abstention needs at least one score")
    hit = correct.detach().cpu().reshape(-1).bool()
    n = hit.numel()
    values = [scores[k].detach().to(device="cpu", dtype=_F).reshape(-1) for k in names]
    if any(v.numel() != n for v in values) or n == 0:
        raise ValueError(f"every score needs one value per label ({n} labels)")
    per_axis = max(2, int(max_combinations ** (1.0 / len(names))))
    grids = [_candidates(v, per_axis - 1) for v in values]
    errors = (~hit).to(_F)
    best_key: tuple[float, float] | None = None
    best: tuple[float, ...] | None = None
    best_stats = (0.0, 0.0)
    # keep[n, c] for each axis, combined by broadcasting over the grid of candidate vectors
    keeps = [(v[:, None] <= g[None, :]) | torch.isposinf(g)[None, :]  # [N, C_s]; +inf keeps even nan
             for v, g in zip(values, grids, strict=True)]
    shape = [g.numel() for g in grids]
    flat = torch.ones(n, 1, dtype=torch.bool)
    for axis, keep in enumerate(keeps):
        flat = (flat[:, :, None] & keep[:, None, :]).reshape(n, -1)
        if axis == len(keeps) - 1:
            break
    kept = flat.sum(0).to(_F)  # [C]
    wrong = (flat & ~hit[:, None]).sum(0).to(_F)
    risk = torch.where(kept > 0, wrong / kept.clamp_min(1.0), torch.zeros_like(kept))
    coverage = kept / n
    ok = (risk <= target_risk + 1e-12) & (kept > 0)
    if ok.any():
        cov_ok = torch.where(ok, coverage, torch.full_like(coverage, -1.0))
        top = cov_ok.max()
        ties = torch.nonzero((cov_ok == top) & ok).reshape(-1)
        ties = ties[risk[ties] == risk[ties].min()]
        j = int(ties.max())  # the loosest such rule: +inf (unrestricted) and larger thresholds come last
        idx = list(torch.unravel_index(torch.tensor(j), tuple(shape)))
        best = tuple(_with_margin(v, float(g[int(i)])) for v, g, i in zip(values, grids, idx, strict=True))
        best_key = (float(coverage[j]), float(risk[j]))
        best_stats = best_key
    chosen = {k: t for k, t in zip(names, best or (), strict=False) if math.isfinite(t)}
    if best_key is not None and best_key[0] >= min_coverage - 1e-12:
        return AbstentionRule(scores=names, thresholds=chosen, target_risk=target_risk, min_coverage=min_coverage,
                              coverage=best_stats[0], risk=best_stats[1], n=n, met=True)
    overall_risk = float(errors.mean())
    if best_key is None:
        reason = (f"no rule on {', '.join(names)} reaches selective risk <= {target_risk} on the calibration data "
                  f"(n={n}, risk answering all = {overall_risk:.3f})")
    else:
        reason = (f"selective risk <= {target_risk} needs coverage {best_stats[0]:.3f} < min_coverage {min_coverage} "
                  f"on the calibration data (n={n}); no threshold is served")
    return AbstentionRule(scores=names, thresholds={}, target_risk=target_risk, min_coverage=min_coverage,
                          coverage=1.0, risk=overall_risk, n=n, met=False, reason=reason,
                          best_thresholds=chosen if best_key is not None else None,
                          best_coverage=best_stats[0] if best_key is not None else None)


def rule_outcome(scores: Mapping[str, torch.Tensor], thresholds: Mapping[str, float],
                 correct: torch.Tensor) -> tuple[float, float]:
    """(coverage, selective risk) of the served rule "answer iff every score ≤ its threshold" on data:
    scores name → [N] (scores without a threshold are ignored), correct [N] bool. Risk is 0 when nothing
    is answered."""
    hit = correct.detach().cpu().reshape(-1).bool()
    answered = torch.ones_like(hit)
    for name, limit in thresholds.items():
        answered &= scores[name].detach().cpu().to(_F).reshape(-1) <= limit
    kept = int(answered.sum())
    return kept / hit.numel(), (float((~hit[answered]).sum()) / kept if kept else 0.0)
