"""``/docs`` and ``/redoc`` work offline: every script, style and icon is served by the app itself.

The HTML checks run everywhere. With ``chromium`` on PATH (Debian: ``apt-get install chromium``) a headless
browser, with every host but loopback unresolvable, renders both pages from a live server and the test
asserts that Swagger UI and ReDoc drew the API's operations (and saves a screenshot of ``/docs``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from components import free_port
from fastapi.testclient import TestClient

from service.app import create_app
from service.docs import asset_dir
from service.server import server_config
from service.settings import Settings
from tests.live_uvicorn import serving
from tests.service.test_api_contract import FakeEngine

CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
_ABSOLUTE = re.compile(r"""https?://[^\s"'<>)]+""")
_REFERENCED = re.compile(r"""(?:src|href)=["']([^"']+)["']|url:\s*["']([^"']+)["']|spec-url=["']([^"']+)["']""")


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, preload_bundles=[], prediction_log=False, **values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    if asset_dir() is None:
        pytest.fail("fastapi-offline is not installed: pip install -e '.[serve]'")
    with TestClient(create_app(settings(), engine=FakeEngine())) as test_client:
        yield test_client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_reference_only_the_apps_own_assets(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not _ABSOLUTE.findall(html), f"{page} references other hosts: {_ABSOLUTE.findall(html)}"
    referenced = {next(url for url in match if url) for match in _REFERENCED.findall(html)}
    assets = {url for url in referenced if url.startswith("/static/docs/")}
    assert "/openapi.json" in referenced and len(assets) == (3 if page == "/docs" else 2), referenced
    for url in sorted(referenced):
        assert url.startswith("/"), url
        got = client.get(url)
        assert got.status_code == 200, url
        suffix = Path(url).suffix
        expected = CONTENT_TYPES.get(suffix, "application/json")
        assert got.headers["content-type"].split(";")[0] == expected, (url, got.headers["content-type"])
        assert len(got.content) > (100_000 if suffix in (".js", ".css") else 100), url


def test_swagger_ui_oauth2_redirect_and_no_cdn_defaults(client: TestClient) -> None:
    assert client.get("/docs/oauth2-redirect").status_code == 200
    html = client.get("/docs").text
    assert '"validatorUrl": null' in html  # no badge image from the online validator
    schema = client.get("/openapi.json").json()
    assert "/docs" not in schema["paths"] and "/static/docs/swagger-ui.css" not in str(schema)


# --- a real browser --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    port = free_port()
    app = create_app(settings(host="127.0.0.1", port=port), engine=FakeEngine())
    config = server_config(app, settings(host="127.0.0.1", port=port), log_level="warning", access_log=False)
    with serving(config):
        yield f"http://127.0.0.1:{port}"


def chromium(profile: Path, *args: str) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not on PATH (Debian: apt-get install -y chromium): the rendering check needs a browser")
    command = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               "--virtual-time-budget=15000", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_browser_renders_swagger_ui_offline(live_url: str, tmp_path: Path) -> None:
    dom = chromium(tmp_path / "profile", "--dump-dom", f"{live_url}/docs")
    operations = re.findall(r'class="opblock opblock-(?:get|post|delete)', dom)
    assert len(operations) >= 8, dom[:2000]  # one block per operation, drawn from /openapi.json
    assert "/v1/answer/batch" in dom
    screenshot = tmp_path / "docs.png"
    chromium(tmp_path / "profile", "--window-size=1280,1600", f"--screenshot={screenshot}", f"{live_url}/docs")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 30_000


def test_browser_renders_redoc_offline(live_url: str, tmp_path: Path) -> None:
    dom = chromium(tmp_path / "profile", "--dump-dom", f"{live_url}/redoc")
    sections = set(re.findall(r'data-section-id="operation/([\w]+)"', dom))
    assert len(sections) >= 8 and any("answer_batch" in s for s in sections), sorted(sections)
