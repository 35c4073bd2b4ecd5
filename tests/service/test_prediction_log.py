"""The prediction log on a real SQLite file: what an answer records, durable and idempotent feedback across
a restart (windows rebuilt from the log), group commit, a failed commit never acknowledged, migrations
(an older database upgraded, a newer one refused, the schema module equal to the migrations), retention,
export, and the fleet calibration counters against naive references."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

sa = pytest.importorskip("sqlalchemy")
from alembic.autogenerate import compare_metadata  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402

from core import metrics  # noqa: E402
from service.app import create_app  # noqa: E402
from service.engine.monitoring import calibration_terms  # noqa: E402
from service.predlog import AlreadyLabelledError, PredictionLogError, PredictionRecord, texts_hash  # noqa: E402
from service.predlog.export import write_rows  # noqa: E402
from service.predlog.migrate import head_revision, upgrade  # noqa: E402
from service.predlog.schema import metadata, predictions  # noqa: E402
from service.predlog.sql import SqlPredictionStore, open_database  # noqa: E402
from tests.service.test_monitoring import _answer_and_label, _question, naive_brier, naive_ece, naive_nll  # noqa: E402


def _rows(url: str) -> list[dict[str, Any]]:
    engine = open_database(url)
    with engine.connect() as connection:
        rows = [dict(r._mapping) for r in connection.execute(sa.select(predictions).order_by(predictions.c.created_at))]
    engine.dispose()
    return rows


def _gauge(client: TestClient, name: str, **labels: str) -> float | None:
    return client.app.state.metrics.registry.get_sample_value(name, labels)  # type: ignore[attr-defined]


def test_an_answer_is_logged_with_its_lineage_scores_and_decision(engine_factory: Any, bundle_maker: Any,
                                                                   bundle_root: Path) -> None:
    bundle_maker(bundle_root, "b", members=3, scale=0.3)
    engine = engine_factory(bundle_root, preload_bundles=["b"], abstain_predictive_entropy=0.5)
    with TestClient(create_app(engine.settings, engine)) as client:
        body = {**_question(1), "context": "some passage"}
        answer = client.post("/v1/answer", json=body).json()
    (row,) = _rows(engine.settings.log_database_url())
    assert row["request_id"] == answer["request_id"]
    assert (row["bundle"], row["version"], row["method"]) == ("b", answer["bundle"]["version"], "ensemble")
    assert row["calibration_hash"] == answer["bundle"]["calibration_hash"]
    assert row["base_model_hash"] == answer["bundle"]["base_model_hash"]
    assert (row["question"], row["context"], row["choices"]) == (body["question"], "some passage", body["choices"])
    assert row["texts_hash"] == texts_hash(body["question"], "some passage", body["choices"])
    assert row["probabilities"] == answer["probabilities"] and row["num_choices"] == len(body["choices"])
    for name in ("predictive_entropy", "mutual_information", "expected_entropy", "max_probability"):
        assert row[name] == answer[name]
    assert row["abstained"] == answer["abstained"] and row["abstain_reasons"] == answer["abstain_reasons"]
    assert row["thresholds"]["values"]["predictive_entropy"] == 0.5
    assert row["thresholds"]["sources"]["predictive_entropy"] == "settings"
    assert row["latency_ms"] > 0 and row["label"] is None and len(row["prompt_hash"]) == 64


def test_texts_off_logs_only_their_hash(engine_factory: Any, bundle_maker: Any, bundle_root: Path) -> None:
    bundle_maker(bundle_root, "b", members=2)
    engine = engine_factory(bundle_root, preload_bundles=["b"], log_texts=False)
    with TestClient(create_app(engine.settings, engine)) as client:
        client.post("/v1/answer", json=_question(2))
    (row,) = _rows(engine.settings.log_database_url())
    q = _question(2)
    assert row["question"] is None and row["choices"] is None and row["context"] is None
    assert row["texts_hash"] == texts_hash(q["question"], None, q["choices"])


def test_labels_join_after_a_restart_and_the_windows_are_rebuilt(engine_factory: Any, bundle_maker: Any,
                                                                 bundle_root: Path) -> None:
    bundle_maker(bundle_root, "b", members=3, scale=0.3)
    first = engine_factory(bundle_root, preload_bundles=["b"], feedback_window=50)
    with TestClient(create_app(first.settings, first)) as client:
        labelled, labels = _answer_and_label(client, 30, seed=3)  # labelled before the restart
        pending = [client.post("/v1/answer", json=_question(100 + i)).json() for i in range(25)]
    second = engine_factory(bundle_root, preload_bundles=["b"], feedback_window=50)
    with TestClient(create_app(second.settings, second)) as client:
        # the window gauges come back from the log, computed as before the restart
        rows = [a["probabilities"] for a in labelled]
        assert _gauge(client, "uqserve_window_labelled", bundle="b") == 30
        assert math.isclose(_gauge(client, "uqserve_window_ece", bundle="b") or -1, naive_ece(rows, labels),
                            abs_tol=1e-12)
        late = [random.Random(i).randrange(len(a["probabilities"])) for i, a in enumerate(pending)]
        for answer, label in zip(pending, late, strict=True):
            r = client.post("/v1/feedback", json={"request_id": answer["request_id"], "correct_index": label})
            assert r.status_code == 200, r.text
        again = client.post("/v1/feedback", json={"request_id": pending[0]["request_id"], "correct_index": 0})
        assert again.status_code == 409 and again.json()["error"]["code"] == "duplicate"
        unknown = client.post("/v1/feedback", json={"request_id": "f" * 32, "correct_index": 0})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_request"
        fresh = client.post("/v1/answer", json=_question(7)).json()
        wrong = client.post("/v1/feedback", json={"request_id": fresh["request_id"], "correct_index": 9})
        assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "correct_index"
        window = (rows + [a["probabilities"] for a in pending])[-50:], (labels + late)[-50:]
        assert _gauge(client, "uqserve_window_labelled", bundle="b") == 50
        assert math.isclose(_gauge(client, "uqserve_window_brier", bundle="b") or -1, naive_brier(*window),
                            abs_tol=1e-12)
        assert math.isclose(_gauge(client, "uqserve_window_nll", bundle="b") or -1, naive_nll(*window), abs_tol=1e-12)
    stored = {r["request_id"]: r["label"] for r in _rows(second.settings.log_database_url())}
    assert all(stored[a["request_id"]] == y for a, y in zip(labelled + pending, labels + late, strict=True))


def test_fleet_calibration_counters_add_up_to_the_ece_brier_and_nll(engine_factory: Any, bundle_maker: Any,
                                                                     bundle_root: Path) -> None:
    bundle_maker(bundle_root, "b", members=3, scale=0.5)
    engine = engine_factory(bundle_root, preload_bundles=["b"])
    with TestClient(create_app(engine.settings, engine)) as client:
        version = client.get("/v1/bundles").json()["bundles"][0]["version"]
        assert _gauge(client, "uqserve_calibration_labelled_total", bundle="b", version=version, bin="7") == 0
        answers, labels = _answer_and_label(client, 80, seed=5)

        def per_bin(name: str) -> list[float]:
            return [_gauge(client, name, bundle="b", version=version, bin=str(b)) or 0.0 for b in range(15)]

        n, correct, conf = (per_bin(m) for m in ("uqserve_calibration_labelled_total",
                                                  "uqserve_calibration_correct_total",
                                                  "uqserve_calibration_confidence_sum"))
        rows = [a["probabilities"] for a in answers]
        assert sum(n) == 80
        assert math.isclose(sum(abs(c - s) for c, s in zip(correct, conf, strict=True)) / sum(n),
                            naive_ece(rows, labels), abs_tol=1e-12)
        both = {"bundle": "b", "version": version}
        assert math.isclose((_gauge(client, "uqserve_calibration_brier_sum", **both) or 0) / 80,
                            naive_brier(rows, labels), abs_tol=1e-12)
        assert math.isclose((_gauge(client, "uqserve_calibration_nll_sum", **both) or 0) / 80,
                            naive_nll(rows, labels), abs_tol=1e-12)
        assert _gauge(client, "uqserve_calibration_ece_threshold", **both, min_labelled="50") is not None


def test_calibration_terms_bin_like_core_metrics() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(400, 4, generator=gen, dtype=torch.float64) * 2, -1)
    edge_cases = torch.tensor([[b / 15, 1 - b / 15] for b in range(8, 15)], dtype=torch.float64)  # conf on an edge
    probs = torch.cat([probs, torch.nn.functional.pad(edge_cases, (0, 2)), torch.tensor([[1.0, 0, 0, 0]])])
    labels = torch.randint(0, 4, (len(probs),), generator=gen)
    terms = [calibration_terms(p.tolist(), int(y)) for p, y in zip(probs, labels, strict=True)]
    bins = metrics.reliability_bins(probs.max(-1).values, probs.argmax(-1) == labels)
    assert [sum(t.bin == b for t in terms) for b in range(15)] == bins.count.tolist()
    assert math.isclose(sum(t.brier for t in terms) / len(terms), metrics.brier(probs, labels), abs_tol=1e-12)
    assert math.isclose(sum(t.nll for t in terms) / len(terms), metrics.nll(probs, labels), abs_tol=1e-12)
    assert sum(t.correct for t in terms) / len(terms) == metrics.accuracy(probs, labels)


# --- the store itself -------------------------------------------------------------------------------------


def _record(i: int, created: datetime | None = None) -> PredictionRecord:
    return PredictionRecord(
        request_id=f"{i:032x}", created_at=created or datetime.now(UTC), bundle="b", version="1",
        method="ensemble", base_model_hash="h", calibration_hash="c", prompt_hash="p", question=f"q{i}",
        context=None, choices=["x", "y"], texts_hash="t", probabilities=[0.25, 0.75], answer_index=1,
        max_probability=0.75, predictive_entropy=0.56, expected_entropy=0.5, mutual_information=0.06, feu=None,
        thresholds={"values": {"predictive_entropy": None}, "sources": {}}, abstained=False, abstain_reasons=[],
        latency_ms=1.0)


def test_group_commit_covers_many_concurrent_answers_in_few_commits(tmp_path: Path) -> None:
    store = SqlPredictionStore(f"sqlite:///{tmp_path / 'log.db'}", replica="r")
    commits = []
    sa.event.listen(store.engine, "commit", lambda connection: commits.append(1))

    async def scenario() -> None:
        await store.start()
        commits.clear()
        await asyncio.gather(*(store.write([_record(i)]) for i in range(300)))
        await store.stop()

    asyncio.run(scenario())
    assert len(_rows(store.url)) == 300
    assert len(commits) < 100, f"{len(commits)} commits for 300 concurrent answers"


def test_two_replicas_racing_for_one_label_join_it_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    a, b = SqlPredictionStore(url, replica="a"), SqlPredictionStore(url, replica="b")

    async def scenario() -> list[Any]:
        await a.start()
        await b.start()
        await a.write([_record(i) for i in range(20)])
        outcomes = await asyncio.gather(*(s.label(f"{i:032x}", 1) for i in range(20) for s in (a, b)),
                                        return_exceptions=True)
        await a.stop()
        await b.stop()
        return outcomes

    outcomes = asyncio.run(scenario())
    for i in range(20):
        pair = outcomes[2 * i: 2 * i + 2]
        assert sum(isinstance(o, AlreadyLabelledError) for o in pair) == 1, pair
        assert sum(not isinstance(o, Exception) for o in pair) == 1, pair


def test_a_failed_commit_is_not_acknowledged(engine_factory: Any, bundle_maker: Any, bundle_root: Path) -> None:
    bundle_maker(bundle_root, "b", members=2)
    engine = engine_factory(bundle_root, preload_bundles=["b"])
    with TestClient(create_app(engine.settings, engine)) as client:
        assert client.post("/v1/answer", json=_question(1)).status_code == 200
        with engine.store.engine.begin() as connection:  # the database loses its table under the server
            connection.execute(sa.text("DROP TABLE predictions"))
        r = client.post("/v1/answer", json=_question(2))
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert "not recorded" in r.json()["error"]["message"]


def test_retention_deletes_only_old_answers(tmp_path: Path) -> None:
    store = SqlPredictionStore(f"sqlite:///{tmp_path / 'log.db'}", replica="r", retention_days=30)

    async def scenario() -> None:
        await store.start()
        old = datetime.now(UTC) - timedelta(days=31)
        await store.write([_record(1, old), _record(2, old + timedelta(days=2)), _record(3)])
        await store.stop()

    asyncio.run(scenario())
    assert store.purge() == 1
    assert [r["request_id"][-1] for r in _rows(store.url)] == ["2", "3"]


def test_export_csv_and_parquet_round_trip(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    store = SqlPredictionStore(f"sqlite:///{tmp_path / 'log.db'}", replica="r")
    start = datetime.now(UTC) - timedelta(hours=1)

    async def scenario() -> None:
        await store.start()
        await store.write([_record(i, start + timedelta(seconds=i)) for i in range(30)])
        await store.label(f"{3:032x}", 0)
        await store.stop()

    asyncio.run(scenario())
    since = start + timedelta(seconds=10)
    assert write_rows(store.rows(since=since), "csv", tmp_path / "out.csv") == 20
    with (tmp_path / "out.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["request_id"] == f"{10:032x}" and json.loads(rows[0]["probabilities"]) == [0.25, 0.75]
    assert datetime.fromisoformat(rows[0]["created_at"]) == since
    assert write_rows(store.rows(labelled_only=True), "parquet", tmp_path / "out.parquet", chunk=7) == 1
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert table[0]["label"] == 0 and table[0]["probabilities"] == [0.25, 0.75] and table[0]["replica"] == "r"
    assert write_rows(store.rows(), "parquet", tmp_path / "all.parquet", chunk=7) == 30
    assert pq.read_table(tmp_path / "all.parquet").num_rows == 30


# --- migrations ---------------------------------------------------------------------------------------------


def test_an_older_database_is_upgraded_with_its_rows(tmp_path: Path, engine_factory: Any, bundle_maker: Any,
                                                     bundle_root: Path) -> None:
    bundle_maker(bundle_root, "b", members=2)
    engine = engine_factory(bundle_root, preload_bundles=["b"])
    url = engine.settings.log_database_url()
    database = open_database(url)
    assert upgrade(database, "0001") == "0001"  # the schema an older server wrote
    with database.begin() as connection:
        connection.execute(sa.insert(predictions), [_record(1).row("old")])
    database.dispose()
    with TestClient(create_app(engine.settings, engine)) as client:
        answer = client.post("/v1/answer", json=_question(1)).json()
        ok = client.post("/v1/feedback", json={"request_id": f"{1:032x}", "correct_index": 1})
        assert ok.status_code == 200  # a label for an answer the older server logged
    database = open_database(url)
    with database.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head_revision()
        indexes = {i["name"] for i in sa.inspect(connection).get_indexes("predictions")}
    database.dispose()
    assert "ix_predictions_bundle_labelled" in indexes
    assert {r["request_id"] for r in _rows(url)} == {f"{1:032x}", answer["request_id"]}


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    database = open_database(url)
    upgrade(database)
    with database.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    store = SqlPredictionStore(url, replica="r")
    with pytest.raises(PredictionLogError, match="newer uqserve"):
        asyncio.run(store.start())


def test_the_schema_module_matches_the_migrations(tmp_path: Path) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'log.db'}")
    upgrade(database)
    with database.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), metadata)
    database.dispose()
    assert diff == []


def test_log_command_line_upgrades_and_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from uqserve.cli import main

    url = f"sqlite:///{tmp_path / 'log.db'}"
    assert main(["log", "--database-url", url, "upgrade"]) == 0
    assert f"schema revision {head_revision()}" in capsys.readouterr().out
    database = open_database(url)
    with database.begin() as connection:
        connection.execute(sa.insert(predictions), [_record(i).row("r") for i in range(5)])
    database.dispose()
    out = tmp_path / "out.csv"
    assert main(["log", "--database-url", url, "export", "--since", "2000-01-01", "--format", "csv",
                 "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 6
    with pytest.raises(SystemExit):  # a bad time is an argparse error, not a traceback
        main(["log", "--database-url", url, "export", "--since", "yesterday", "--format", "csv", "--out", str(out)])


def test_an_unreachable_database_stops_the_server_with_one_clear_error(engine_factory: Any, bundle_root: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("psycopg")
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = engine_factory(bundle_root, database_url=f"postgresql+psycopg://uqserve@127.0.0.1:{port}/uqserve")
    with pytest.raises(PredictionLogError, match="cannot open the prediction log at postgresql"), \
            TestClient(create_app(engine.settings, engine)):
        pass
    assert any("cannot start the torch engine" in r.getMessage() for r in caplog.records)


def test_a_load_whose_log_cannot_be_read_is_unavailable_not_a_crash(engine_factory: Any, bundle_maker: Any,
                                                                     bundle_root: Path) -> None:
    from service.engine.errors import EngineUnavailableError

    bundle_maker(bundle_root, "b", members=2)
    engine = engine_factory(bundle_root)

    async def scenario() -> None:
        await engine.start()
        with engine.store.engine.begin() as connection:
            connection.execute(sa.text("DROP TABLE predictions"))
        try:
            with pytest.raises(EngineUnavailableError, match="cannot rebuild 'b'"):
                await engine.load_bundle("b")
            assert engine.bundles() == []  # nothing placed, nothing half-loaded
        finally:
            await engine.stop()

    asyncio.run(scenario())
