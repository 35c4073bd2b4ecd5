"""Schemathesis against the app (fake engine, in process over ASGI): every operation, every check, 0 failures.

Positive and negative data, the coverage phase (boundary values, unexpected methods, missing headers), the
fuzzing phase and stateful sequences all run, with a fixed seed and a bounded number of examples per
operation (a few seconds on one core). A failure names the check, the request and the response.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.core.failures import Failure  # noqa: E402
from schemathesis.engine import Status, events  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from tests.service.test_api_contract import ADMIN, make_client  # noqa: E402

MAX_EXAMPLES = 30
OPERATIONS = {"POST /v1/answer", "POST /v1/answer/batch", "GET /v1/bundles", "POST /v1/bundles/{name}",
              "DELETE /v1/bundles/{name}", "POST /v1/feedback", "GET /healthz", "GET /readyz", "GET /metrics"}
# Refusals that depend on the bundle, not on the request's shape, so no schema can state them: omitted
# choices are valid for a label-set bundle only, given choices must equal its labels. The fake engine's
# bundle has no label set.
BUNDLE_DEPENDENT = {"choices_required", "choices_mismatch"}


def _distinct_as_sent(body: Any) -> bool:
    """Every choices list in ``body`` is pairwise distinct as raw strings (what ``uniqueItems`` can state)."""
    questions = body.get("questions", [body]) if isinstance(body, dict) else []
    lists = [q.get("choices") or [] for q in questions if isinstance(q, dict)]
    return all(len(set(choices)) == len(choices) for choices in lists)


@schemathesis.check
def positive_data_acceptance_of_uqserve(ctx: Any, response: Any, case: Any) -> bool | None:
    """Schemathesis's positive_data_acceptance, but for two refusals a JSON schema cannot express: a
    bundle-dependent one (:data:`BUNDLE_DEPENDENT`) and duplicate choices that differ only before
    normalization (NFC, surrounding whitespace or zero-width characters), which ``uniqueItems`` cannot
    see. Every other 4xx for schema-valid data still fails."""
    try:
        return positive_data_acceptance(ctx, response, case)  # type: ignore[no-any-return]
    except Failure:
        code = json.loads(response.content)["error"]["code"] if response.status_code == 422 else None
        if code in BUNDLE_DEPENDENT or (code == "duplicate_choices" and _distinct_as_sent(case.body)):
            return None
        raise


def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    # schemathesis sends deliberately wrong admin keys from one address: the brake on wrong keys (429, tested
    # in its own tests) would otherwise answer its ignored_auth probes before the key is compared
    client, _ = make_client(tmp_path, admin_key=ADMIN, auth_failure_burst=1_000_000)
    config = schemathesis.Config.from_dict({
        "seed": 20240607,
        "headers": {"X-Admin-Key": ADMIN},
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
        # every check; the built-in positive_data_acceptance is replaced by the variant above
        "checks": {"enabled": True, "positive_data_acceptance": {"enabled": False}},
    })
    failures: list[str] = []
    errors: list[str] = []
    tested: set[str] = set()
    cases = 0
    with client:
        schema = schemathesis.openapi.from_asgi("/openapi.json", client.app, config=config)
        for event in schemathesis.engine.from_schema(schema).execute():
            if isinstance(event, events.NonFatalError):
                errors.append(f"{event.label}: {event.value!r}")
            if not isinstance(event, events.ScenarioFinished):
                continue
            recorder = event.recorder
            tested.add(recorder.label)
            cases += len(recorder.cases)
            for case_id, nodes in recorder.checks.items():
                for node in nodes:
                    if node.status != Status.FAILURE or node.failure_info is None:
                        continue
                    case = recorder.cases[case_id].value
                    response = recorder.find_response(case_id=case_id)
                    failures.append(f"{recorder.label} [{node.name}] {node.failure_info.failure.title}: "
                                    f"{case.method} {case.formatted_path} headers={case.headers} "
                                    f"body={case.body!r:.300} -> {response and response.status_code} "
                                    f"{response and response.content[:300]!r}")
    print(f"schemathesis: {cases} cases over {len(tested & OPERATIONS)} operations, {len(failures)} failures")
    assert not errors, "\n".join(errors)
    assert not failures, "\n".join(failures[:20])
    assert tested >= OPERATIONS, OPERATIONS - tested
    assert cases >= len(OPERATIONS) * 10
