"""The adapter bundle: what training exports and the server loads.

A bundle is a directory::

    manifest.json                       BundleManifest (pydantic, schema_version)
    members/<name>/adapter_config.json  peft's LoRA config   } each member loads with plain
    members/<name>/adapter_model.safetensors                 } peft.PeftModel.from_pretrained
    <artifact>.safetensors              method-specific tensors (Laplace factors, MoE routers), listed in
                                        manifest.artifacts

Only JSON and safetensors are read; a pickle-capable file anywhere in the bundle is an error. The
reader checks everything and raises one :class:`~core.errors.BundleError` listing every problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import save_file

from core.answers import DEFAULT_ANSWER_FORMAT, PROMPT_VERSION, AnswerFormat, validate_question
from core.basemodel import BaseModelInfo
from core.bundle_checks import check_member, manifest_problems, member_dirs, read_artifacts, read_json, scan_tree
from core.conformal import ConformalReference
from core.drift import DriftReference
from core.errors import BundleError, IncompatibleBundleError
from core.multilora import LoraLayout
from core.prompt import PromptSpec, prompt_hash
from core.risk_control import RiskReference

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # use fullmatch ("$" allows a final "\n")


class Method(StrEnum):
    """How a bundle's members combine into a predictive distribution."""

    ENSEMBLE = "ensemble"
    """M LoRA members (M = 1 is the MAP baseline), weighted average of their choice distributions."""
    LAPLACE = "laplace"
    """MAP LoRA plus a Kronecker-factored Laplace posterior over its weights (Laplace-LoRA)."""
    MOE = "moe"
    """Mixture of LoRA experts with top-k routers (UQ4CT)."""
    CHECKPOINT_ENSEMBLE = "checkpoint_ensemble"
    """Members are snapshots of one training run (one seed, one data order); served as an ensemble."""
    MC_DROPOUT = "mc_dropout"
    """S fixed LoRA-dropout masks (tied across token positions) folded into copies of one MAP LoRA's A;
    served as an ensemble, so a request always gets the same answer."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemberSpec(_Model):
    name: str = Field(pattern=NAME_PATTERN.pattern)
    weight: float = Field(gt=0)
    seed: int | None = None


class BaseModelRef(_Model):
    model_id: str
    weight_hash: str
    num_layers: int
    hidden_size: int


class AnswerSpaceSpec(_Model):
    """What fixes a bundle's prompt tokens and choices: format, prompt, token budget and, for a
    classification bundle, its label set (every question gets these choices, in this order)."""

    answer_format: AnswerFormat = DEFAULT_ANSWER_FORMAT
    prompt_version: str = PROMPT_VERSION
    max_tokens: int = 768
    prompt: PromptSpec = PromptSpec()
    labels: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _labels(self) -> AnswerSpaceSpec:
        if self.labels is not None:
            validate_question("labels", self.labels, None)
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"duplicate labels in {list(self.labels)}")
        return self

    def prompt_hash(self) -> str:
        """sha256 of everything that fixes the prompt tokens (logged and returned with every answer)."""
        return prompt_hash(self.model_dump(mode="json"))

    def prompt_text(self) -> str:
        return self.prompt.text()


class LoraSpec(_Model):
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]

    def layout(self) -> LoraLayout:
        return LoraLayout(tuple(self.target_modules), tuple(self.layers), self.rank, self.alpha)


class Histogram(_Model):
    """Reference distribution of a score on validation data: ``len(counts) == len(edges) - 1``."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]


class Calibration(_Model):
    temperature: float = Field(default=1.0, gt=0)
    validation_metrics: dict[str, float] = {}
    undefined_metrics: dict[str, str] = {}  # metric → why it is undefined for this bundle (e.g. MI of one member)
    dtype: str | None = None  # compute dtype of the base the calibration ran on (the server's; None = unrecorded)
    reference_histograms: dict[str, Histogram] = {}
    drift: DriftReference | None = None  # no-drift alarm thresholds (core.drift); None: older bundles
    # guarantees from a held-out calibration split that fit nothing else (None: no split was held out)
    conformal: ConformalReference | None = None  # split-conformal answer sets (core.conformal)
    risk: RiskReference | None = None  # Learn-then-Test selective answering (core.risk_control)


class RuleCalibration(_Model):
    """How the bundle's served abstention rule was chosen and what it achieved on validation data.

    The rule is "answer iff every set threshold holds". ``coverage`` and ``risk`` (errors among answered)
    are those of exactly that rule on the ``n`` validation questions; ``met`` says whether it reached
    ``risk <= target_risk`` at ``coverage >= min_coverage``. When not, no threshold is stored, ``reason``
    says why and ``best_thresholds`` is the rule that reaches the risk target at ``best_coverage``, if any
    (a client may send it as request thresholds)."""

    scores: tuple[str, ...]
    target_risk: float
    min_coverage: float
    met: bool
    coverage: float
    risk: float
    n: int
    reason: str = ""
    best_thresholds: dict[str, float] | None = None
    best_coverage: float | None = None


class Thresholds(_Model):
    """Abstain when a score exceeds its threshold (None = never on that score)."""

    predictive_entropy: float | None = None
    mutual_information: float | None = None
    one_minus_max_probability: float | None = None
    one_minus_feu: float | None = None  # method moe only: 1 − FEU, the routers' functional-level uncertainty
    target: str = ""  # how they were chosen, e.g. "risk<=0.2 on validation"
    rule: RuleCalibration | None = None  # the calibration of exactly these thresholds together (None: older bundles)


class Provenance(_Model):
    git_sha: str = "unknown"
    created_at: str = ""
    uqserve_version: str = "0.1.0"


class BundleManifest(_Model):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN.pattern)
    version: str = "1"
    method: Method
    members: tuple[MemberSpec, ...]
    base_model: BaseModelRef
    answer_space: AnswerSpaceSpec = AnswerSpaceSpec()
    lora: LoraSpec
    training: dict[str, Any] = {}
    data_hashes: dict[str, str] = {}
    calibration: Calibration = Calibration()
    thresholds: Thresholds = Thresholds()
    provenance: Provenance = Provenance()
    artifacts: dict[str, str] = {}  # role → file name (safetensors or json), method-specific
    method_config: dict[str, Any] = {}

    def calibration_hash(self) -> str:
        payload = json.dumps(self.calibration.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def weights(self) -> torch.Tensor:
        """Member weights normalized to sum to 1: [M]."""
        w = torch.tensor([m.weight for m in self.members], dtype=torch.float64)
        return (w / w.sum()).float()


class Bundle:
    """A validated bundle in memory: manifest, member tensors (peft keys), artifact tensors."""

    def __init__(self, path: Path, manifest: BundleManifest, members: dict[str, dict[str, torch.Tensor]],
                 artifacts: dict[str, dict[str, torch.Tensor] | dict[str, Any]]) -> None:
        self.path = path
        self.manifest = manifest
        self.members = members
        self.artifacts = artifacts

    def check_base(self, info: BaseModelInfo) -> None:
        """Refuse a bundle made for another base model (IncompatibleBundleError lists every mismatch)."""
        ref, problems = self.manifest.base_model, []
        if ref.weight_hash != info.weight_hash:
            problems.append(f"base weight hash {ref.weight_hash[:12]}… ≠ loaded {info.weight_hash[:12]}…")
        if ref.num_layers != info.num_layers or ref.hidden_size != info.hidden_size:
            problems.append(f"base shape {ref.num_layers}×{ref.hidden_size} ≠ loaded "
                            f"{info.num_layers}×{info.hidden_size}")
        if max(self.manifest.lora.layers, default=-1) >= info.num_layers:
            problems.append(f"adapts layer {max(self.manifest.lora.layers)} but the base has {info.num_layers}")
        if problems:
            problems = [f"{MANIFEST}: {p}" for p in problems]
            raise IncompatibleBundleError(problems, bundle=self.manifest.name)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> Provenance:
    return Provenance(git_sha=git_sha(), created_at=datetime.now(UTC).isoformat(timespec="seconds"))


def _adapter_config(lora: LoraSpec, base_model_id: str) -> dict[str, Any]:
    from peft import LoraConfig

    alpha: Any = lora.alpha  # peft types alpha as int but accepts floats
    config = LoraConfig(r=lora.rank, lora_alpha=alpha, target_modules=list(lora.target_modules),
                        layers_to_transform=list(lora.layers), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model_id)
    return config.to_dict()


def write_bundle(path: Path, manifest: BundleManifest, members: dict[str, dict[str, torch.Tensor]],
                 artifacts: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a bundle atomically (temp dir, then rename); ``members`` maps member name → peft tensors."""
    artifacts = artifacts or {}
    if {m.name for m in manifest.members} != set(members):
        raise BundleError("manifest members and member tensors differ", bundle=manifest.name)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "members").mkdir(parents=True)
    config = _adapter_config(manifest.lora, manifest.base_model.model_id)
    for name, tensors in members.items():
        member_dir = tmp / "members" / name
        member_dir.mkdir()
        (member_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, default=list))
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(member_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    for role, tensors in artifacts.items():
        file = manifest.artifacts.get(role)
        if file is None or not file.endswith(".safetensors"):
            raise BundleError(f"artifact {role!r} needs a .safetensors entry in manifest.artifacts")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / file))
    (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(path)
    return path


def rewrite_manifest(path: Path, manifest: BundleManifest) -> None:
    """Replace a bundle's manifest atomically: a server reading the bundle sees the old or the new one."""
    tmp = Path(path) / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(manifest.model_dump_json(indent=2))
    os.replace(tmp, Path(path) / MANIFEST)


def read_bundle(path: Path | str, expect_base: BaseModelInfo | None = None) -> Bundle:
    """Read and validate a bundle; every problem found is reported in one BundleError, each naming its file.

    Total: whatever the directory holds, this raises nothing but BundleError (IncompatibleBundleError when a
    well-formed bundle was made for another base model than ``expect_base``)."""
    path = Path(path)
    label = path.name
    if not path.is_dir():
        raise BundleError(f"no bundle directory at {label}", bundle=label)
    problems = scan_tree(path)
    manifest = _read_manifest(path, problems)
    lora = manifest.lora if manifest is not None else None
    hidden = manifest.base_model.hidden_size if manifest is not None else None
    on_disk = member_dirs(path, problems)
    if manifest is not None:
        problems.extend(manifest_problems(manifest))
        listed = list(dict.fromkeys(m.name for m in manifest.members))
        problems.extend(f"members/{name}: not listed in {MANIFEST}" for name in on_disk if name not in listed)
    else:
        listed = on_disk  # no manifest to follow: still check every member directory there is
    members: dict[str, dict[str, torch.Tensor]] = {}
    for name in listed:
        try:
            tensors = check_member(path / "members" / name, name, lora, hidden, problems)
        except Exception as err:  # a last resort: the checks above are meant to be total
            problems.append(f"members/{name}: unexpected {type(err).__name__} while reading: {err}")
            tensors = None
        if tensors is not None:
            members[name] = tensors
    artifacts = read_artifacts(path, manifest.artifacts, problems) if manifest is not None else {}
    if problems or manifest is None:
        raise BundleError(list(dict.fromkeys(problems)), bundle=manifest.name if manifest is not None else label)
    bundle = Bundle(path, manifest, members, artifacts)
    if expect_base is not None:
        bundle.check_base(expect_base)
    return bundle


def _read_manifest(path: Path, problems: list[str]) -> BundleManifest | None:
    raw = read_json(path / MANIFEST, MANIFEST, problems)
    if raw is None:
        return None
    try:
        manifest = BundleManifest.model_validate(raw)
    except ValidationError as err:
        problems.extend(f"{MANIFEST}: {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}"
                        for e in err.errors())
        return None
    if manifest.schema_version != SCHEMA_VERSION:
        problems.append(f"{MANIFEST}: schema_version {manifest.schema_version} is not supported (this reader: "
                        f"{SCHEMA_VERSION})")
    if not manifest.members:
        problems.append(f"{MANIFEST}: no members")
    return manifest


def bundle_path(root: Path, name: str) -> Path:
    """Resolve a bundle *name* under ``root``; names are validated, never paths."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:  # fullmatch: "$" would allow a final "\n"
        raise BundleError(f"invalid bundle name {name!r}: letters, digits, '_', '-', '.' only")
    resolved = (root / name).resolve()
    if resolved.parent != root.resolve():
        raise BundleError(f"bundle name {name!r} escapes the bundle root")
    return resolved


def base_ref(info: BaseModelInfo) -> BaseModelRef:
    return BaseModelRef(model_id=info.model_id, weight_hash=info.weight_hash, num_layers=info.num_layers,
                        hidden_size=info.hidden_size)
