"""``uqserve report``: compare bundles on the same questions (served numbers, cached scores, seed groups).

Every bundle is run through :func:`training.evaluate.bundle_prediction` (exactly what the server answers)
on the same questions of each dataset; the per-question outputs are cached as safetensors keyed by the
bundle (name, version, calibration hash, content hash of its tensors, prompt hash), the base model's weight
hash and a hash of the question set, so a second run with the same inputs runs no model. Metrics are
:mod:`core.metrics` on those outputs; bundles of one seed group are shown as mean ± std over the group.
The page itself is written by :mod:`training.report_page`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.answers import Question
from core.basemodel import BaseModel
from core.bundle import Bundle
from core.datasets import data_hash
from core.metrics import auroc, finite_metrics, summarize_scores
from core.predictive import BundlePrediction
from core.uncertainty import UncertaintyScores
from training.evaluate import bundle_prediction

_F = torch.float64
CACHE_FORMAT = 1
FEU_UNDEFINED = "FEU is defined only for a routed mixture of LoRA experts (UQ4CT, method moe)"

# (metrics key, column header, "higher is better"?)
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("acc", "ACC", True),
    ("nll", "NLL", False),
    ("ece", "ECE", False),
    ("brier", "Brier", False),
    ("auroc_one_minus_max_prob", "AUROC max-prob", True),
    ("auroc_entropy", "AUROC entropy", True),
    ("auroc_mi", "AUROC MI", True),
    ("auroc_one_minus_feu", "AUROC 1−FEU", True),
    ("aurc", "AURC", False),
    ("acc_at_80_coverage", "ACC @ 80% cov.", True),
)


@dataclass(frozen=True)
class ReportDataset:
    """The labelled questions every bundle is run on: ``labels`` [N] long, ``hash`` = :func:`data_hash`."""

    name: str
    split: str
    questions: list[Question]
    shift: bool = False

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([q.answer for q in self.questions], dtype=torch.long)

    @property
    def hash(self) -> str:
        return data_hash(self.questions)

    @property
    def title(self) -> str:
        return f"{self.name}/{self.split}"


@dataclass(frozen=True)
class CachedScores:
    """The per-question served outputs of one bundle on one dataset (float64 on CPU).

    probabilities [N, K]; predictive_entropy, expected_entropy, mutual_information [N]; feu [N] or None;
    labels [N] long; has_mi False where MI is undefined for the method (then ``notes`` say why).
    """

    probabilities: torch.Tensor
    predictive_entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor
    labels: torch.Tensor
    feu: torch.Tensor | None = None
    has_mi: bool = True
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, prediction: BundlePrediction, labels: torch.Tensor) -> CachedScores:
        u = prediction.scores
        return cls(probabilities=u.probabilities.to(_F).cpu(), predictive_entropy=u.predictive_entropy.to(_F).cpu(),
                   expected_entropy=u.expected_entropy.to(_F).cpu(),
                   mutual_information=u.mutual_information.to(_F).cpu(), labels=labels.long().cpu(),
                   feu=None if prediction.feu is None else prediction.feu.to(_F).cpu(), has_mi=prediction.has_mi,
                   notes=list(prediction.notes))

    def uncertainty(self) -> UncertaintyScores:
        return UncertaintyScores(probabilities=self.probabilities, predictive_entropy=self.predictive_entropy,
                                 expected_entropy=self.expected_entropy, mutual_information=self.mutual_information,
                                 max_probability=self.probabilities.max(-1).values)

    @property
    def correct(self) -> torch.Tensor:
        """[N] bool: the argmax is the label."""
        return self.probabilities.argmax(-1) == self.labels

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        tensors = {"probabilities": self.probabilities, "predictive_entropy": self.predictive_entropy,
                   "expected_entropy": self.expected_entropy, "mutual_information": self.mutual_information,
                   "labels": self.labels}
        if self.feu is not None:
            tensors["feu"] = self.feu
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={**metadata, "has_mi": str(self.has_mi), "notes": json.dumps(self.notes),
                            "format": str(CACHE_FORMAT)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> CachedScores | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        except (OSError, ValueError, RuntimeError):
            return None
        if meta.get("format") != str(CACHE_FORMAT):
            return None
        return cls(probabilities=t["probabilities"], predictive_entropy=t["predictive_entropy"],
                   expected_entropy=t["expected_entropy"], mutual_information=t["mutual_information"],
                   labels=t["labels"], feu=t.get("feu"), has_mi=meta.get("has_mi") == "True",
                   notes=json.loads(meta.get("notes", "[]")))


def tensors_hash(bundle: Bundle) -> str:
    """16 hex chars of the sha256 of every member and artifact tensor of the bundle (names, dtypes, bytes)."""
    digest = hashlib.sha256()
    groups = {**{f"member/{k}": v for k, v in bundle.members.items()},
              **{f"artifact/{k}": v for k, v in bundle.artifacts.items()}}
    for group in sorted(groups):
        digest.update(group.encode())
        content = groups[group]
        for key in sorted(content):
            value = content[key]
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous().reshape(-1)
                digest.update(f"{t.dtype}{tuple(value.shape)}".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes())
            else:
                digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def bundle_identity(bundle: Bundle, base: BaseModel) -> dict[str, str]:
    """What a bundle's cached scores depend on (besides the questions); shown as lineage too."""
    m = bundle.manifest
    return {"name": m.name, "version": m.version, "method": str(m.method), "calibration_hash": m.calibration_hash(),
            "tensors_hash": tensors_hash(bundle), "prompt_hash": m.answer_space.prompt_hash(),
            "base_model": base.info.model_id, "base_weight_hash": base.info.weight_hash}


def at_temperature_one(bundle: Bundle) -> Bundle:
    """The bundle served without temperature scaling (calibration temperature 1), named ``<name>@T1``: the
    uncalibrated baseline next to the calibrated bundle (its calibration hash, hence its cache key, differs)."""
    m = bundle.manifest
    manifest = m.model_copy(update={"name": f"{m.name}@T1",
                                    "calibration": m.calibration.model_copy(update={"temperature": 1.0})})
    return Bundle(bundle.path, manifest, bundle.members, bundle.artifacts)


def cache_key(identity: dict[str, str], questions_hash: str) -> str:
    blob = json.dumps({**identity, "data_hash": questions_hash, "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def scores_for(base: BaseModel, bundle: Bundle, identity: dict[str, str], dataset: ReportDataset,
               cache_dir: Path | None) -> tuple[CachedScores, bool]:
    """(scores, from cache?) of a bundle on a dataset: the cached file when its key matches, else one
    :func:`bundle_prediction` run (then cached)."""
    key = cache_key(identity, dataset.hash)
    path = None if cache_dir is None else cache_dir / f"{identity['name']}-{key}.safetensors"
    if path is not None and path.is_file():
        cached = CachedScores.load(path)
        if cached is not None and cached.labels.shape[0] == len(dataset.questions):
            return cached, True
    prediction = bundle_prediction(base, bundle, dataset.questions, desc=f"{identity['name']}:{dataset.name}")
    scores = CachedScores.of(prediction, dataset.labels)
    if path is not None:
        scores.save(path, {**identity, "dataset": dataset.title, "data_hash": dataset.hash})
    return scores, False


# --- metrics and seed groups ---------------------------------------------------------------------------


def bundle_metrics(scores: CachedScores) -> tuple[dict[str, float], dict[str, str]]:
    """(finite metrics, name → reason for each undefined one) of one bundle's served outputs: everything
    :func:`core.metrics.summarize_scores` reports, plus ``auroc_one_minus_feu`` where FEU is defined."""
    raw = summarize_scores(scores.uncertainty(), scores.labels, scores.has_mi)
    raw["auroc_one_minus_feu"] = math.nan if scores.feu is None else auroc(1.0 - scores.feu, ~scores.correct)
    reason = scores.notes[0] if (not scores.has_mi and scores.notes) else "undefined for this method"
    values, undefined = finite_metrics(raw, reason)
    if scores.feu is None:
        undefined["auroc_one_minus_feu"] = FEU_UNDEFINED
    return values, undefined


@dataclass(frozen=True)
class Row:
    """One table row: a bundle, or a seed group (mean and sample std over its bundles; std None for one)."""

    name: str
    bundles: tuple[str, ...]
    mean: dict[str, float]
    std: dict[str, float | None]
    undefined: dict[str, str]


def aggregate(name: str, members: Sequence[tuple[str, dict[str, float], dict[str, str]]]) -> Row:
    """A row from (bundle, metrics, undefined) of each member: a metric undefined for any member is
    undefined for the row (with that member's reason)."""
    mean: dict[str, float] = {}
    std: dict[str, float | None] = {}
    undefined: dict[str, str] = {}
    for key, _, _ in COLUMNS:
        missing = [u[key] for _, v, u in members if key not in v]
        if missing:
            undefined[key] = missing[0]
            continue
        values = [v[key] for _, v, _ in members]
        mean[key] = statistics.fmean(values)
        std[key] = statistics.stdev(values) if len(values) > 1 else None
    return Row(name, tuple(b for b, _, _ in members), mean, std, undefined)


def parse_groups(specs: Sequence[str]) -> dict[str, list[str]]:
    """``NAME=b1,b2,...`` flags → {NAME: [b1, b2, ...]} (a bundle is named by its path as given, its
    folder's name, or its manifest name)."""
    groups: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, members = spec.partition("=")
        names = [m.strip() for m in members.split(",") if m.strip()]
        if not sep or not name.strip() or not names:
            raise ValueError(f"--group needs NAME=bundle1,bundle2,..., got {spec!r}")
        groups[name.strip()] = names
    return groups


def table_rows(results: dict[str, CachedScores], aliases: dict[str, set[str]],
               groups: dict[str, list[str]]) -> list[Row]:
    """Rows of one dataset's table: each group (in flag order) then every bundle not in a group.
    results: bundle name → scores; aliases: bundle name → the names it may be called by in ``--group``."""
    def resolve(alias: str) -> str:
        hits = [b for b, names in aliases.items() if alias in names]
        if len(hits) != 1:
            raise ValueError(f"--group member {alias!r} matches {len(hits)} of the bundles {sorted(aliases)}")
        return hits[0]

    metrics = {name: bundle_metrics(scores) for name, scores in results.items()}
    rows, grouped = [], set()
    for group, members in groups.items():
        names = [resolve(m) for m in members]
        grouped.update(names)
        rows.append(aggregate(group, [(n, *metrics[n]) for n in names]))
    rows += [aggregate(n, [(n, *metrics[n])]) for n in results if n not in grouped]
    return rows


# --- serving cost --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where timings come from: CPU model, logical CPUs, torch threads, accelerator."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"host": platform.node(), "cpu": cpu, "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device, "torch": torch.__version__}


def serving_cost(base: BaseModel, bundle: Bundle, questions: list[Question], identity: dict[str, str],
                 cache_dir: Path | None, retime: bool = False) -> dict[str, Any]:
    """Wall time of :func:`bundle_prediction` (trunk + members + predictive, no HTTP) on ``questions``
    after a one-question warm-up: questions/s and ms/question on this machine. Memoized per bundle,
    questions and machine (unless ``retime``), so a cached report runs no model."""
    where = machine()
    key = cache_key({**identity, "machine": json.dumps(where, sort_keys=True)}, data_hash(questions))
    path = None if cache_dir is None else cache_dir / f"timing-{identity['name']}-{key}.json"
    if path is not None and path.is_file() and not retime:
        return {**json.loads(path.read_text()), "cached": True}
    bundle_prediction(base, bundle, questions[:1], desc="warm-up")
    start = time.perf_counter()
    bundle_prediction(base, bundle, questions, desc=f"time {identity['name']}")
    seconds = time.perf_counter() - start
    cost = {"questions": len(questions), "seconds": seconds, "questions_per_s": len(questions) / seconds,
            "ms_per_question": 1000.0 * seconds / len(questions), **where,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cost, indent=2))
    return {**cost, "cached": False}
