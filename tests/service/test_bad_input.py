"""Hostile input: every class a hostile-client review found gets a documented 4xx in the one error schema.

Most tests run against the fake engine (tests/service/test_api_contract.py); the tokenizer path (text a
tokenizer cannot encode) also runs through the real engine on the tiny model. Each response's status must
be listed for its operation in the app's OpenAPI document.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.answers import Question, validate_question
from core.bundle import NAME_PATTERN, bundle_path
from core.errors import BundleError, InvalidQuestionError
from core.text import TEXT_PATTERN, is_blank
from service.app import create_app
from service.protocol import BUNDLE_NAME_PATTERN
from tests.service.test_api_contract import ADMIN, assert_error, body, make_client

JSON = {"Content-Type": "application/json"}
ADMIN_HEADERS = {"X-Admin-Key": ADMIN}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    c, _ = make_client(tmp_path, admin_key=ADMIN)
    with c:
        yield c


def send(c: TestClient, path: str, payload: Any, method: str = "POST") -> Any:
    """POST ``payload`` as ASCII JSON: lone surrogates travel as ``\\udc00`` escapes, as a client would send."""
    return c.request(method, path, content=json.dumps(payload).encode(), headers=JSON)


def refused(c: TestClient, response: Any, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The error body, after checking status, schema, code, param, and that the status is documented."""
    err = assert_error(response, status, param=param)
    if code is not None:
        assert err["code"] == code, err
    request = response.request
    path = request.url.path
    operations = c.get("/openapi.json").json()["paths"]
    template = next((p for p in operations if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", p), path)), None)
    if template is not None and request.method.lower() in operations[template]:
        assert str(status) in operations[template][request.method.lower()]["responses"], (status, path)
    return err


def batch(*questions: dict[str, Any]) -> dict[str, Any]:
    return {"bundle": "default", "questions": list(questions)}


def q(**fields: Any) -> dict[str, Any]:
    return {"question": "Which gas?", "choices": ["oxygen", "helium"], **fields}


# --- text a tokenizer cannot encode, control characters, blank text -----------------------------------------


@pytest.mark.parametrize("field, value, param", [
    ("question", "Which\udc00 gas?", "question"),
    ("context", "A passage\ud800.", "context"),
    ("choices", ["a\udc00", "b"], "choices.0"),
    ("choices", ["a", "\udbff"], "choices.1"),
])
def test_lone_surrogates_are_422_in_every_field(client: TestClient, field: str, value: Any, param: str) -> None:
    refused(client, send(client, "/v1/answer", body(**{field: value})), 422, "invalid_text", param)
    refused(client, send(client, "/v1/answer/batch", batch(q(), q(**{field: value}))), 422, "invalid_text",
            f"questions.1.{param}")


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f", "\x85", "\x9f"])
@pytest.mark.parametrize("field, param", [("question", "question"), ("context", "context"),
                                          ("choices", "choices.1")])
def test_control_characters_are_422(client: TestClient, char: str, field: str, param: str) -> None:
    value: Any = ["oxygen", f"hel{char}ium"] if field == "choices" else f"text {char} here"
    err = refused(client, send(client, "/v1/answer", body(**{field: value})), 422, "invalid_text", param)
    assert f"U+{ord(char):04X}" in err["message"]


def test_tab_newline_carriage_return_are_text(client: TestClient) -> None:
    r = send(client, "/v1/answer", body(question="Line one\nline\ttwo\r\n", context="a\tb\nc",
                                        choices=["x\ty", "z\n"]))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("blank", ["\u200b", "\u2060", "\ufeff", " \u200b\u200c\u200d ", "\u00a0\u3000",
                                   "\u180e", "\u3164", "\ufe0f", "\U000e0001"])
def test_zero_width_or_whitespace_only_text_is_blank(client: TestClient, blank: str) -> None:
    refused(client, send(client, "/v1/answer", body(choices=["oxygen", blank])), 422, "blank_text", "choices.1")
    refused(client, send(client, "/v1/answer", body(question=blank)), 422, "blank_text", "question")
    assert is_blank(blank) and not re.fullmatch(TEXT_PATTERN, blank)


def test_blank_context_is_allowed_but_must_be_valid_text(client: TestClient) -> None:
    assert send(client, "/v1/answer", body(context="\u200b ")).status_code == 200
    refused(client, send(client, "/v1/answer", body(context="\x00")), 422, "invalid_text", "context")


# --- duplicate choices ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("choices, param", [
    (["oxygen", "helium", "oxygen"], "choices.2"),
    (["oxygen", " oxygen\n"], "choices.1"),  # the prompt strips whitespace
    (["caf\u00e9", "cafe\u0301"], "choices.1"),  # NFC: the same text, two encodings
    (["oxygen", "\u200boxygen\ufeff"], "choices.1"),  # zero-width padding
])
def test_duplicate_choices_are_422(client: TestClient, choices: list[str], param: str) -> None:
    refused(client, send(client, "/v1/answer", body(choices=choices)), 422, "duplicate_choices", param)
    refused(client, send(client, "/v1/answer/batch", batch(q(choices=choices))), 422, "duplicate_choices",
            f"questions.0.{param}")


def test_choices_differing_in_case_or_inner_space_are_distinct(client: TestClient) -> None:
    assert send(client, "/v1/answer", body(choices=["CO", "Co", "C O"])).status_code == 200


# --- strict types and numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, param", [
    ({"return_members": "yes"}, "return_members"),
    ({"return_members": 1}, "return_members"),
    ({"thresholds": {"predictive_entropy": "0.5"}}, "thresholds.predictive_entropy"),
    ({"thresholds": {"mutual_information": True}}, "thresholds.mutual_information"),
    ({"alpha": "0.1"}, "alpha"),
    ({"question": 42}, "question"),
    ({"choices": ["a", 2]}, "choices.1"),
    ({"bundle": ["default"]}, "bundle"),
])
def test_no_coercion(client: TestClient, extra: dict[str, Any], param: str) -> None:
    refused(client, send(client, "/v1/answer", body(**extra)), 422, "validation_error", param)


def test_an_int_is_a_number_and_an_integral_float_an_integer(client: TestClient) -> None:
    r = send(client, "/v1/answer", body(thresholds={"predictive_entropy": 1}))
    assert r.status_code == 200, r.text
    request_id = r.json()["request_id"]
    assert send(client, "/v1/feedback", {"request_id": request_id, "correct_index": 1.0}).status_code == 200
    refused(client, send(client, "/v1/feedback", {"request_id": request_id, "correct_index": 1.5}), 422,
            "validation_error", "correct_index")
    refused(client, send(client, "/v1/feedback", {"request_id": request_id, "correct_index": "1"}), 422,
            "validation_error", "correct_index")


@pytest.mark.parametrize("literal, param", [
    (b'"thresholds": {"predictive_entropy": Infinity}', "thresholds.predictive_entropy"),
    (b'"thresholds": {"mutual_information": -Infinity}', "thresholds.mutual_information"),
    (b'"alpha": NaN', "alpha"),
    (b'"thresholds": {"predictive_entropy": 1e999}', "thresholds.predictive_entropy"),  # overflows to inf
])
def test_non_finite_numbers_are_422(client: TestClient, literal: bytes, param: str) -> None:
    raw = b'{"bundle": "default", "question": "q", "choices": ["a", "b"], ' + literal + b"}"
    refused(client, client.post("/v1/answer", content=raw, headers=JSON), 422, "validation_error", param)


@pytest.mark.parametrize("digits", [40, 5000])
def test_huge_integers(client: TestClient, digits: int) -> None:
    raw = b'{"request_id": "req0", "correct_index": ' + b"9" * digits + b"}"
    r = client.post("/v1/feedback", content=raw, headers=JSON)
    if digits > 4300:  # over Python's int-from-string limit: the body cannot be read
        refused(client, r, 400, "invalid_body")
    else:
        refused(client, r, 422, "validation_error", "correct_index")


# --- bodies that are not JSON ----------------------------------------------------------------------------------


def test_non_utf8_body_is_400(client: TestClient) -> None:
    raw = '{"bundle": "default", "question": "caf\u00e9?", "choices": ["a", "b"]}'.encode("latin-1")
    err = refused(client, client.post("/v1/answer", content=raw, headers=JSON), 400, "invalid_body")
    assert "UTF-8" in err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b'{"bundle": "default",}', b"", b"[]", b"null", b'"text"'])
def test_invalid_json_is_422(client: TestClient, raw: bytes) -> None:
    r = client.post("/v1/answer", content=raw, headers=JSON)
    refused(client, r, 422)
    assert r.json()["error"]["code"] in ("invalid_json", "validation_error")


def test_deeply_nested_json(client: TestClient) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    refused(client, client.post("/v1/answer", content=deep, headers=JSON), 400, "invalid_body")
    nested = b'{"bundle": "default", "question": "q", "choices": ["a", "b"], "thresholds": '
    nested += b'{"a": ' * 500 + b"1" + b"}" * 501
    refused(client, client.post("/v1/answer", content=nested, headers=JSON), 422, "validation_error")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
@pytest.mark.parametrize("path", ["/v1/answer", "/v1/answer/batch", "/v1/feedback"])
def test_wrong_content_type_is_415(client: TestClient, content_type: str | None, path: str) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = client.post(path, content=json.dumps(body()).encode(), headers=headers)
    refused(client, r, 415, "unsupported_media_type")


def test_json_subtypes_are_json(client: TestClient) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.uqserve+json"):
        r = client.post("/v1/answer", content=json.dumps(body()).encode(), headers={"Content-Type": content_type})
        assert r.status_code == 200, (content_type, r.text)


# --- paths and methods -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/answer/", "/v1/bundles/", "/healthz/", "/v1/feedback/"])
def test_trailing_slash_is_a_json_404_not_a_redirect(client: TestClient, path: str) -> None:
    r = client.post(path, json=body(), follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers
    refused(client, r, 404, "not_found")


@pytest.mark.parametrize("method, path, allow", [
    ("OPTIONS", "/v1/bundles/default", "DELETE, POST"),
    ("PUT", "/v1/bundles/default", "DELETE, POST"),
    ("GET", "/v1/bundles/default", "DELETE, POST"),
    ("OPTIONS", "/v1/answer", "POST"),
    ("GET", "/v1/answer", "POST"),
    ("DELETE", "/v1/bundles", "GET"),
    ("POST", "/healthz", "GET"),
])
def test_405_lists_every_method_of_the_path(client: TestClient, method: str, path: str, allow: str) -> None:
    r = client.request(method, path, headers=ADMIN_HEADERS)
    refused(client, r, 405, "method_not_allowed")
    assert r.headers["Allow"] == allow


@pytest.mark.parametrize("name", ["default%0A", "default%0D", "%D9%A1%D9%A2", "abc%EF%BC%91", "a..b", "..", "a%2F..",
                                  ".hidden", "x" * 65, "a%20b", "a%00b"])
def test_bad_bundle_names_are_422(tmp_path: Path, name: str) -> None:
    c, engine = make_client(tmp_path, admin_key=ADMIN)
    with c:
        for method in ("POST", "DELETE"):
            r = c.request(method, f"/v1/bundles/{name}", headers=ADMIN_HEADERS)
            assert r.status_code in (404, 422), r.text  # 404: an encoded "/" leaves the route
            refused(c, r, r.status_code)
            if r.status_code == 422:
                assert r.json()["error"]["param"] == "name" and r.json()["error"]["code"] == "invalid_bundle_name"
        assert set(engine.loaded) == {"default"}


def test_bundle_name_pattern_matches_the_core_check() -> None:
    names = ["a", "a.b", "a.", "a-b_c", "A9", "a..b", "a...", ".a", "-a", "_a", "a\n", "a b", "a/b", "١٢", "ａ",
             "a" * 64, "a" * 65, "a.-b", "a._", "a.b.c.d", "x..", "é"]
    for name in names:
        core_ok = bool(NAME_PATTERN.fullmatch(name)) and ".." not in name
        schema_ok = bool(re.fullmatch(BUNDLE_NAME_PATTERN.strip("^$"), name)) and len(name) <= 64
        assert core_ok == schema_ok, name
    with pytest.raises(BundleError):
        bundle_path(Path("/tmp"), "default\n")


# --- sizes and counts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, param", [
    (body(question="x" * 101), "question"),
    (body(context="x" * 201), "context"),
    (body(choices=["a", "y" * 21]), "choices.1"),
    (body(choices=[f"c{i}" for i in range(27)]), "choices"),
    (body(choices=["only"]), "choices"),
])
def test_over_long_texts_and_counts(client: TestClient, payload: dict[str, Any], param: str) -> None:
    refused(client, send(client, "/v1/answer", payload), 422, param=param)


def test_batch_sizes(client: TestClient) -> None:
    refused(client, send(client, "/v1/answer/batch", batch(*[q()] * 4)), 422, "limit_exceeded", "questions")
    refused(client, send(client, "/v1/answer/batch", batch()), 422, "validation_error", "questions")
    refused(client, send(client, "/v1/answer/batch", {"bundle": "default", "questions": {"0": q()}}), 422,
            "validation_error", "questions")


# --- feedback --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["a b", "req0\n", "req0\x00", "<script>", "ü", "../x", "", "x" * 65])
def test_odd_request_ids_are_422(client: TestClient, request_id: str) -> None:
    r = send(client, "/v1/feedback", {"request_id": request_id, "correct_index": 0})
    refused(client, r, 422, "validation_error", "request_id")


@pytest.mark.parametrize("extra", [{"bundle": "default"}, {"note": "x"}, {"correct_index_": 1}])
def test_feedback_with_extra_fields_is_422(client: TestClient, extra: dict[str, Any]) -> None:
    request_id = send(client, "/v1/answer", body()).json()["request_id"]
    r = send(client, "/v1/feedback", {"request_id": request_id, "correct_index": 0, **extra})
    refused(client, r, 422, "validation_error", next(iter(extra)))


# --- the OpenAPI document states the server's rules ----------------------------------------------------------


def test_openapi_states_limits_patterns_and_every_error_status(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    question = schemas["QuestionIn"]["properties"]
    assert question["question"]["maxLength"] == 100 and question["question"]["pattern"] == TEXT_PATTERN
    choices = next(v for v in question["choices"]["anyOf"] if v.get("type") == "array")
    assert choices["items"]["maxLength"] == 20 and choices["items"]["pattern"] == TEXT_PATTERN
    assert schemas["BatchAnswerRequest"]["properties"]["questions"]["maxItems"] == 3
    assert "HTTPValidationError" not in schemas
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            errors = {s: r for s, r in operation["responses"].items() if not s.startswith("2")}
            assert {"405", "408", "413", "500", "503"} <= set(errors), (method, path)
            for status, response in errors.items():
                assert response["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
    answer = doc["paths"]["/v1/answer"]["post"]["responses"]
    assert {"400", "401", "403", "404", "415", "422", "429", "504"} <= set(answer)


# --- core: one definition of valid text ------------------------------------------------------------------------


def test_question_refuses_unencodable_and_blank_text_but_training_data_keeps_controls_and_duplicates() -> None:
    for bad in (dict(question="q\udc00"), dict(choices=("a", "\u200b")), dict(context="\ud800")):
        fields: dict[str, Any] = {"question": "q", "choices": ("a", "b"), **bad}
        with pytest.raises(InvalidQuestionError):
            Question(**fields)
    # shipped datasets hold C1 mojibake and duplicate choices: the lenient (training) check keeps them
    Question("What\x94s this?", ("12", "4", "12"))
    with pytest.raises(InvalidQuestionError) as err:
        validate_question("What\x94s this?", ("12", "4"), None, strict=True)
    assert err.value.code == "invalid_text" and err.value.param == "question"
    with pytest.raises(InvalidQuestionError) as err:
        validate_question("q", ("12", "4", "12"), None, strict=True)
    assert err.value.code == "duplicate_choices" and err.value.param == "choices.2"


# --- the tokenizer path: the real engine on the tiny model -----------------------------------------------------


def test_real_engine_refuses_unencodable_text_with_422_not_500(bundle_maker: Any, engine_factory: Any,
                                                               bundle_root: Path, tiny_tokenizer: Any) -> None:
    with pytest.raises(TypeError):  # the root cause: the tokenizer cannot take a lone surrogate (was a 500)
        tiny_tokenizer(" a\udc00", add_special_tokens=False)
    bundle_maker(bundle_root, "tiny", members=1)
    engine = engine_factory(bundle_root, preload_bundles=["tiny"])
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as c:
        ok = send(c, "/v1/answer", body(bundle="tiny"))
        assert ok.status_code == 200, ok.text
        for field, value, param in [("choices", ["a\udc00", "b"], "choices.0"), ("context", "x\udc00", "context"),
                                    ("question", "q\udc00", "question"), ("choices", ["a\x00", "b"], "choices.0")]:
            refused(c, send(c, "/v1/answer", body(bundle="tiny", **{field: value})), 422, "invalid_text", param)
            r = send(c, "/v1/answer/batch", {"bundle": "tiny", "questions": [q(**{field: value})]})
            refused(c, r, 422, "invalid_text", f"questions.0.{param}")
