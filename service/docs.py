"""``/docs`` (Swagger UI) and ``/redoc`` served with their scripts, styles and favicon from the package.

FastAPI's own pages load these from a public CDN, which leaves them blank on an air-gapped host. The
files come from the ``fastapi-offline`` wheel (MIT; it vendors swagger-ui-dist 5 and the ReDoc 2 standalone
bundle), a dependency of the ``serve`` extra, and are served under ``/static/docs/``. The pages reference
no other host: no Google fonts, and Swagger UI's online validator badge is off.

Without the package installed (an environment set up before it was added) the pages fall back to the CDN,
with a warning in the log.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

log = logging.getLogger("uqserve")
STATIC_URL = "/static/docs"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def asset_dir() -> Path | None:
    """The directory holding :data:`ASSETS`, or None when ``fastapi-offline`` is not installed."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if all((static / name).is_file() for name in ASSETS) else None


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at ``docs_url`` and ReDoc at ``redoc_url`` from packaged assets.

    Build the app with ``docs_url=None, redoc_url=None`` so FastAPI's CDN pages are not registered too.
    """
    static = asset_dir()
    if static is None:
        log.warning("fastapi-offline is not installed: /docs and /redoc load their scripts from a CDN "
                    "(pip install 'uqserve[serve]')")
    else:
        app.mount(STATIC_URL, StaticFiles(directory=static), name="docs-static")
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = f"{docs_url}/oauth2-redirect"

    def asset(request: Request, name: str) -> str | None:
        return f"{request.scope.get('root_path', '')}{STATIC_URL}/{name}" if static is not None else None

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        urls: dict[str, Any] = {"swagger_js_url": asset(request, "swagger-ui-bundle.js"),
                "swagger_css_url": asset(request, "swagger-ui.css"),
                "swagger_favicon_url": asset(request, "favicon.png")}
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{oauth2_redirect_url}",
            swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})},
            **{key: url for key, url in urls.items() if url is not None})

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        urls: dict[str, Any] = {"redoc_js_url": asset(request, "redoc.standalone.js"),
                "redoc_favicon_url": asset(request, "favicon.png")}
        return get_redoc_html(openapi_url=f"{root}{openapi_url}", title=f"{app.title} - ReDoc",
                              with_google_fonts=static is None,
                              **{key: url for key, url in urls.items() if url is not None})
