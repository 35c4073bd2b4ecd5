"""HTTP routes: thin functions that validate, call one engine method, and map the result to the protocol."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.bundle import NAME_PATTERN
from service.access import AuthBrake, ClientDep, client_address, unless_disconnected
from service.contract import require_json
from service.engine.base import Engine
from service.engine.errors import (
    DuplicateFeedbackError,
    EngineError,
    EngineUnavailableError,
    FeedbackNotFoundError,
)
from service.errors import AdminAuthError
from service.metrics import UNKNOWN_BUNDLE, ServiceMetrics, load_failure_reason
from service.protocol import (
    BUNDLE_NAME_PATTERN,
    AnswerRequest,
    AnswerResponse,
    BatchAnswerRequest,
    BatchAnswerResponse,
    BundleActionResponse,
    BundleInfo,
    BundleList,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    HealthResponse,
    InvalidRequestError,
    ReadyResponse,
    check_limits,
)
from service.settings import Settings


def get_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise EngineUnavailableError("the engine is still starting")
    return engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
_bearer = HTTPBearer(auto_error=False, scheme_name="AdminBearer",
                     description="Authorization: Bearer <UQSERVE_ADMIN_KEY>")
_header = APIKeyHeader(name="X-Admin-Key", auto_error=False, scheme_name="AdminKeyHeader",
                       description="X-Admin-Key: <UQSERVE_ADMIN_KEY>")


def require_admin(request: Request, settings: SettingsDep,
                  _bearer_doc: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                  _header_doc: Annotated[str | None, Depends(_header)]) -> None:
    """Admin auth: every credential sent must hold the key, so a wrong (even empty or malformed) one is never
    ignored because the other header is right. The two security dependencies document the schemes."""
    if settings.admin_key is None:
        raise AdminAuthError(403, "admin endpoints are disabled: start the server with UQSERVE_ADMIN_KEY set",
                             "admin_disabled")
    given = []
    if "x-admin-key" in request.headers:
        given.append(request.headers["x-admin-key"])
    if "authorization" in request.headers:
        scheme, _, credentials = request.headers["authorization"].partition(" ")
        given.append(credentials.strip() if scheme.lower() == "bearer" else "")
    if not given:
        raise AdminAuthError(401, "admin key required: send 'Authorization: Bearer <key>' or "
                             "'X-Admin-Key: <key>'", "missing_admin_key")
    brake: AuthBrake = request.app.state.auth_brake
    address = client_address(request)
    brake.check(address)  # 429 once this client has sent too many wrong keys
    expected = settings.admin_key.get_secret_value().encode()
    # both headers sent: both must hold the key (a wrong credential is never ignored for a right one)
    if not all(hmac.compare_digest(key.encode("utf-8", "surrogatepass"), expected) for key in given):
        brake.failed(address)
        raise AdminAuthError(403, "wrong admin key", "invalid_admin_key")


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name) or ".." in name:  # = BUNDLE_NAME_PATTERN with maxLength 64 (tested)
        raise InvalidRequestError(f"invalid bundle name {name!r}: letters, digits, '_', '-', '.' only, "
                                  "no '..'", "name", code="invalid_bundle_name")


def _errors(*codes: int) -> dict[int | str, dict[str, object]]:
    return {code: {"model": ErrorResponse} for code in codes}


router = APIRouter()
JsonBody = [Depends(require_json)]  # 415 unless the body is declared JSON
# the pattern is stated, not enforced, here: _check_name refuses with its own code (invalid_bundle_name)
BundlePathName = Annotated[str, Path(json_schema_extra={"pattern": BUNDLE_NAME_PATTERN, "maxLength": 64},
                                     description="a bundle directory name: letters, digits, '_', '-', '.'; no '..'")]
admin = APIRouter(dependencies=[Depends(require_admin)], responses=_errors(401, 403, 429), tags=["admin"])


@router.post("/v1/answer", response_model=AnswerResponse, tags=["answers"], dependencies=JsonBody,
             responses=_errors(401, 404, 413, 422, 429, 503, 504))
async def answer(body: AnswerRequest, engine: EngineDep, settings: SettingsDep, metrics: MetricsDep,
                 client: ClientDep, request: Request) -> AnswerResponse:
    """Answer one multiple-choice question with the bundle's calibrated distribution and its uncertainty."""
    start = time.perf_counter()
    check_limits([body], settings)
    try:
        question = body.to_question("question", engine.labels(body.bundle))
        results = await unless_disconnected(request, engine.answer(body.bundle, [question], body.options(client)))
    except EngineError as err:
        metrics.failed(body.bundle, err)
        raise
    metrics.answered(results)
    return AnswerResponse.from_result(results[0], question, 1000 * (time.perf_counter() - start))


@router.post("/v1/answer/batch", response_model=BatchAnswerResponse, tags=["answers"], dependencies=JsonBody,
             responses=_errors(401, 404, 413, 422, 429, 503, 504))
async def answer_batch(body: BatchAnswerRequest, engine: EngineDep, settings: SettingsDep, metrics: MetricsDep,
                       client: ClientDep, request: Request) -> BatchAnswerResponse:
    """Answer up to ``max_batch_questions`` questions with one bundle; results come back in order."""
    start = time.perf_counter()
    check_limits(body.questions, settings, prefix="questions.")
    try:
        labels = engine.labels(body.bundle)
        questions = [q.to_question(f"questions.{i}", labels) for i, q in enumerate(body.questions)]
        results = await unless_disconnected(request, engine.answer(body.bundle, questions, body.options(client)))
    except EngineError as err:
        metrics.failed(body.bundle, err, len(questions))
        raise
    metrics.answered(results)
    total_ms = 1000 * (time.perf_counter() - start)
    return BatchAnswerResponse(results=[AnswerResponse.from_result(r, q, total_ms)
                                        for r, q in zip(results, questions, strict=True)])


@router.get("/v1/bundles", response_model=BundleList, tags=["bundles"])
async def list_bundles(engine: EngineDep) -> BundleList:
    """Loaded bundles with version, method, lineage hashes, slots and in-flight requests."""
    return BundleList(bundles=[BundleInfo.from_status(s) for s in engine.bundles()])


@admin.post("/v1/bundles/{name}", response_model=BundleActionResponse, responses=_errors(404, 409, 422, 503))
async def load_bundle(name: BundlePathName, engine: EngineDep, metrics: MetricsDep) -> BundleActionResponse:
    """Load a bundle by name from the bundle root, or hot-swap the loaded version (in-flight requests finish
    on the old version)."""
    _check_name(name)
    start = time.perf_counter()
    replacing = any(s.name == name for s in engine.bundles())
    try:
        status = await engine.load_bundle(name)
    except EngineError as err:
        metrics.bundle_load_failures.labels(load_failure_reason(err)).inc()
        raise
    metrics.loaded(status)
    return BundleActionResponse(action="replaced" if replacing else "loaded",
                                bundle=BundleInfo.from_status(status), seconds=time.perf_counter() - start)


@admin.delete("/v1/bundles/{name}", response_model=BundleActionResponse, responses=_errors(404, 422))
async def unload_bundle(name: BundlePathName, engine: EngineDep, metrics: MetricsDep) -> BundleActionResponse:
    """Stop serving a bundle; its slots are freed when its in-flight requests finish."""
    _check_name(name)
    start = time.perf_counter()
    status = await engine.unload_bundle(name)
    metrics.bundle_unloads.labels(name).inc()
    return BundleActionResponse(action="unloaded", bundle=BundleInfo.from_status(status),
                                seconds=time.perf_counter() - start)


@router.post("/v1/feedback", response_model=FeedbackResponse, tags=["feedback"], dependencies=JsonBody,
             responses=_errors(401, 404, 409, 422, 429, 503))
async def feedback(body: FeedbackRequest, engine: EngineDep, metrics: MetricsDep,
                   _client: ClientDep) -> FeedbackResponse:
    """Join the correct choice index to an answered request: committed to the prediction log (any replica
    sharing it takes any request's label), counted in the fleet calibration counters and the bundle's window."""
    try:
        outcome = await engine.feedback(body.request_id, body.correct_index)
    except FeedbackNotFoundError:
        metrics.feedback.labels(UNKNOWN_BUNDLE, "unknown_request").inc()
        raise
    except DuplicateFeedbackError as err:
        metrics.feedback.labels(err.bundle, "duplicate").inc()
        raise
    metrics.joined(outcome)
    return FeedbackResponse(request_id=outcome.request_id, bundle=outcome.bundle, result=outcome.result)


@router.get("/healthz", response_model=HealthResponse, tags=["health"])
async def healthz() -> HealthResponse:
    """Liveness: the process serves HTTP."""
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, tags=["health"], responses=_errors(503))
async def readyz(request: Request) -> ReadyResponse:
    """Readiness: the engine accepts requests (503 while starting or draining)."""
    engine = get_engine(request)
    if not engine.ready:
        raise EngineUnavailableError("not ready: the engine is starting or draining")
    return ReadyResponse(ready=True, bundles_loaded=len(engine.bundles()),
                         queue_depth_rows=engine.queue_depth_rows)


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    """Prometheus exposition of this app's registry."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


router.include_router(admin)
