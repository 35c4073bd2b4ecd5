"""The app factory: ``create_app(settings, engine=None)``. There is no module-level app.

Without an injected engine the lifespan loads the base model once, builds the multi-LoRA engine and
preloads ``settings.preload_bundles`` (a bundle that fails to load is logged and counted; the server
still starts and serves the rest). On shutdown the engine drains every queued request before stopping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from core.errors import UqserveError
from service.access import AuthBrake, KeyRing
from service.contract import install_contract
from service.docs import install_docs
from service.engine.base import Engine
from service.engine.errors import EngineError
from service.errors import install_error_handlers
from service.guards import BodyGuard
from service.metrics import LatencyMiddleware, ServiceMetrics, load_failure_reason
from service.routes import router
from service.settings import Settings

log = logging.getLogger("uqserve")
VERSION = "0.1.0"


def curl_example(settings: Settings, bundle: str | None) -> str:
    host = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host
    body = ('{"bundle": "%s", "question": "Which gas do plants take in from the air?", '
            '"choices": ["oxygen", "carbon dioxide", "helium", "nitrogen"]}') % (bundle or "default")
    return f"curl -s http://{host}:{settings.port}/v1/answer -H 'Content-Type: application/json' -d '{body}'"


async def preload(engine: Engine, settings: Settings, metrics: ServiceMetrics) -> None:
    for name in settings.preload_bundles:
        try:
            metrics.loaded(await engine.load_bundle(name))
        except EngineError as err:
            metrics.bundle_load_failures.labels(load_failure_reason(err)).inc()
            log.error("bundle %r was not loaded: %s", name, err)


def build_engine(settings: Settings) -> Engine:
    """The engine ``settings.engine`` names, on the configured base model (imports only what it needs)."""
    if settings.engine == "vllm":
        from service.engine.vllm_engine import VllmEngine

        return VllmEngine.from_settings(settings)
    from service.engine.engine import UQEngine  # torch and transformers load only when serving

    return UQEngine.from_settings(settings)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the HTTP app; pass ``engine`` to serve a prebuilt (or fake) engine instead of loading one."""
    settings = settings or Settings()
    metrics = ServiceMetrics(CollectorRegistry(auto_describe=True))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served = engine
        if served is None:
            try:
                served = await asyncio.to_thread(build_engine, settings)
            except UqserveError as err:  # a bad model path or setting: one clear line, then uvicorn exits
                log.error("cannot start the %s engine: %s", settings.engine, err)
                raise
        served.set_observer(metrics)
        metrics.attach(served)
        try:
            await served.start()
        except UqserveError as err:  # e.g. an unreachable prediction log: one clear line, then uvicorn exits
            log.error("cannot start the %s engine: %s", settings.engine, err)
            raise
        app.state.engine = served
        await preload(served, settings, metrics)
        loaded = [s.name for s in served.bundles()]
        log.info("uqserve ready with bundles %s; try:\n  %s", loaded or "none", curl_example(
            settings, loaded[0] if loaded else None))
        try:
            yield
        finally:
            log.info("draining in-flight requests")
            await served.stop()

    app = FastAPI(title="uqserve", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Calibrated multiple-choice answers with uncertainty from LoRA ensembles "
                              "(multi-LoRA batched serving, abstention, calibration-drift metrics).")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.api_keys = KeyRing.from_settings(settings)  # empty: the answer endpoints are open
    app.state.auth_brake = AuthBrake(settings.auth_failure_burst, settings.auth_failure_refill_s)
    install_error_handlers(app)
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    # outermost: a body over max_body_bytes (413) or slower than body_timeout_s (408) never reaches a route
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s)
    app.include_router(router)
    install_contract(app, settings)  # no slash redirects; the OpenAPI document states every status and limit
    install_docs(app)  # /docs and /redoc with packaged assets, no CDN
    return app
