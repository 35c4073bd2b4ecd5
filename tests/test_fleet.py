"""Real processes, real components: ``kill -9`` of a server under load loses no acknowledged answer and a
later label still joins; a fleet of two replicas sharing PostgreSQL behind nginx, scraped by Prometheus,
joins any label on any replica, survives a replica's ``kill -9``, and its recording-rule ECE equals the ECE
computed by hand from the same labels. PostgreSQL, nginx and Prometheus come from Debian's packages
(``.ci/run`` installs them); a test whose component is missing says so and skips."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from components import nginx_proxy, postgres_server, prometheus_query, prometheus_server, wait_for_targets_up
from replicas import Replica, bundles_for, load, tiny_model_dir

from tests.service.test_monitoring import naive_ece

sa = pytest.importorskip("sqlalchemy")
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A base model directory and a bundle root with bundle ``b`` for it, as server settings."""
    root = tmp_path_factory.mktemp("fleet")
    model_dir, base = tiny_model_dir(root / "model")
    bundles = bundles_for(base, root / "bundles")
    return {"UQSERVE_BASE_MODEL": str(model_dir), "UQSERVE_BUNDLE_ROOT": str(bundles), "UQSERVE_PRELOAD_BUNDLES": "b"}


def _logged(url: str) -> dict[str, dict[str, Any]]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        rows = {r.request_id: dict(r._mapping) for r in connection.execute(sa.text(
            "SELECT request_id, replica, label FROM predictions"))}
    engine.dispose()
    return rows


def _load_and_kill(url: str, victim: Replica, clients: int, before_kill: int,
                   after_kill_s: float) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Load ``url`` with ``clients`` concurrent clients; ``kill -9`` the victim once ``before_kill`` answers are
    acknowledged, go on for ``after_kill_s``; returns the acknowledged answers and the failures."""
    acknowledged: dict[str, dict[str, Any]] = {}
    errors: list[str] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(load(url, clients, stop, acknowledged, errors))
        deadline = time.monotonic() + 120
        while len(acknowledged) < before_kill and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(victim.kill9)
        await asyncio.sleep(after_kill_s)
        stop.set()
        await task

    asyncio.run(scenario())
    assert len(acknowledged) >= before_kill, errors[-5:]
    return acknowledged, errors


def _label_all(url: str, answers: dict[str, dict[str, Any]], seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    labels = {rid: rng.randrange(len(a["probabilities"])) for rid, a in sorted(answers.items())}
    with httpx.Client(timeout=30.0) as client:
        for rid, label in labels.items():
            r = client.post(f"{url}/v1/feedback", json={"request_id": rid, "correct_index": label})
            assert r.status_code == 200 and r.json()["result"] == "joined", r.text
    return labels


def _sample(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(metrics_text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_kill9_and_restart_lose_no_acknowledged_answer(served: dict[str, str], tmp_path: Path) -> None:
    replica = Replica("solo", tmp_path, {**served, "UQSERVE_STATE_DIR": str(tmp_path / "data")}).start()
    try:
        acknowledged, _ = _load_and_kill(replica.url, replica, clients=16, before_kill=150, after_kill_s=0.2)
        logged = _logged(f"sqlite:///{tmp_path / 'data' / 'predictions.db'}")
        missing = set(acknowledged) - set(logged)
        assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged answers are not in the log"
        print(f"kill -9 under load: {len(acknowledged)} acknowledged, all in the log")
        replica.start()  # the same data directory, as after a crash and a restart
        labels = _label_all(replica.url, acknowledged, seed=0)
        page = httpx.get(f"{replica.url}/metrics").text
        assert _sample(page, "uqserve_calibration_labelled_total", bundle="b") == len(labels)
        assert _sample(page, "uqserve_window_labelled", bundle="b") == min(len(labels), 500)
    finally:
        replica.stop()


def test_a_fleet_behind_nginx_shares_labels_survives_kill9_and_reports_fleet_ece(served: dict[str, str],
                                                                                  tmp_path: Path) -> None:
    with postgres_server(tmp_path / "pg") as database_url:
        env = {**served, "UQSERVE_DATABASE_URL": database_url}
        replicas = [Replica(name, tmp_path / name, env) for name in ("r1", "r2")]
        try:
            for replica in replicas:
                replica.start()
            upstreams = [f"127.0.0.1:{r.port}" for r in replicas]
            rules = [DEPLOY / "recording_rules.yml", DEPLOY / "alerts.yml"]
            with nginx_proxy(tmp_path / "nginx", upstreams) as port, \
                    prometheus_server(tmp_path / "prom", upstreams, rules) as prometheus:
                front = f"http://127.0.0.1:{port}"
                wait_for_targets_up(prometheus, 2, timeout_s=60)
                acknowledged, _ = _load_and_kill(front, replicas[0], clients=16, before_kill=120, after_kill_s=2.0)
                logged = _logged(database_url)
                missing = set(acknowledged) - set(logged)
                assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged answers are not in the log"
                answered_by = {logged[rid]["replica"] for rid in acknowledged}
                assert answered_by == {"r1", "r2"}, answered_by
                print(f"kill -9 of r1 under load: {len(acknowledged)} acknowledged, all in the log; "
                      f"{len(logged) - len(acknowledged)} logged but never acknowledged (in flight at the kill)")

                replicas[0].start()  # back, with no memory of the answers it gave before the kill
                wait_for_targets_up(prometheus, 2, timeout_s=60)
                labels = _label_all(front, acknowledged, seed=1)
                pages = [httpx.get(f"{r.url}/metrics").text for r in replicas]
                joined = [_sample(p, "uqserve_feedback_total", result="joined") for p in pages]
                assert sum(joined) == len(labels) and min(joined) > 0, joined  # each replica took labels
                assert all(row["label"] == labels[rid] for rid, row in _logged(database_url).items() if rid in labels)

                probabilities = [acknowledged[rid]["probabilities"] for rid in labels]
                hand = naive_ece(probabilities, list(labels.values()))
                _check_fleet_ece(prometheus, len(labels), hand)
        finally:
            for replica in replicas:
                replica.stop()


def _rule_health(prometheus: str) -> list[tuple[str, str, str]]:
    groups = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]
    return [(r["name"], r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]]


def _check_fleet_ece(prometheus: str, labelled: int, hand: float) -> None:
    """Prometheus' fleet ECE: exact from the scraped counters; the recording rule within increase()'s
    extrapolation to the range end (at most 1.1 scrape intervals over a series' sampled span)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = prometheus_query(prometheus, 'sum(uqserve_calibration_labelled_total{bundle="b"})')
        if found and float(found[0]["value"][1]) == labelled:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"Prometheus never scraped all {labelled} labels")
    exact = prometheus_query(prometheus, 'sum(abs(sum by (bin) (uqserve_calibration_correct_total{bundle="b"}) - '
                                         'sum by (bin) (uqserve_calibration_confidence_sum{bundle="b"}))) / '
                                         'sum(uqserve_calibration_labelled_total{bundle="b"})')
    assert abs(float(exact[0]["value"][1]) - hand) < 1e-9
    time.sleep(3.0)  # a few rule evaluations after the last scrape
    samples = prometheus_query(prometheus, 'min by (instance) (count_over_time('
                                           'uqserve_calibration_labelled_total{bundle="b", bin="0"}[1h]))')
    span = min(float(s["value"][1]) for s in samples) - 1  # scrape intervals covered by the shortest series
    recorded = prometheus_query(prometheus, 'uqserve:calibration_ece:1h{bundle="b"}')
    assert len(recorded) == 1, (recorded, _rule_health(prometheus))
    value = float(recorded[0]["value"][1])
    tolerance = 2 * 1.1 / span
    print(f"fleet ECE over {labelled} labels: by hand {hand:.6f}, from the counters {float(exact[0]['value'][1]):.6f},"
          f" recording rule {value:.6f} (relative {value / hand - 1:+.4f}, bound ±{tolerance:.4f})")
    assert abs(value / hand - 1) <= tolerance, (value, hand, tolerance)
