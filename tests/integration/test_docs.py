"""The API docs pages on an air-gapped host: every asset /docs and /redoc load comes from the
service itself (same origin), and each answers 200 with the content type a browser needs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from app.main import create_app
from tests.integration.test_api import LiveServer, client_for, run_dir, settings_for

__all__ = ["run_dir"]  # the session fixture, imported so pytest finds it here

EXPECTED_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture(scope="module")
def docs_client(run_dir: Path) -> Iterator[httpx.Client]:
    with LiveServer(create_app(settings_for(run_dir))) as server, client_for(server) as client:
        yield client


def referenced_urls(html: str) -> list[str]:
    """Every URL the page loads: src= and href= attributes, and url: / openapi URLs in its script."""
    attrs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    script = re.findall(r"""(?:url|spec-url|oauth2RedirectUrl)\s*[:=]\s*['"]([^'"]+)['"]""", html)
    return attrs + script


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_load_only_same_origin_assets(docs_client: httpx.Client, page: str) -> None:
    r = docs_client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = referenced_urls(r.text)
    assert any(u.endswith(".js") for u in urls), urls  # the page does load a script
    origin = urlsplit(str(docs_client.base_url))
    for url in urls:
        absolute = urlsplit(urljoin(str(r.url), url))
        assert (absolute.scheme, absolute.netloc) == (origin.scheme, origin.netloc), f"{page} loads {url}"
    assert "fonts.googleapis" not in r.text and "cdn.jsdelivr" not in r.text
    if page == "/docs":
        assert "validatorUrl" in r.text and '"validatorUrl": null' in r.text  # no call to validator.swagger.io
        assert "/openapi.json" in urls
    for url in urls:
        path = urlsplit(url).path
        if suffix := next((s for s in EXPECTED_TYPES if path.endswith(s)), None):
            asset = docs_client.get(url)
            assert asset.status_code == 200, url
            assert EXPECTED_TYPES[suffix] in asset.headers["content-type"], (url, asset.headers["content-type"])
            assert len(asset.content) > 1000, url


def test_the_openapi_document_and_swagger_bundle_fit(docs_client: httpx.Client) -> None:
    """FastAPI writes OpenAPI 3.1, which Swagger UI reads from version 5 on (4.x shows an error
    instead of the operations): the bundle served must be a 5.x one."""
    spec = docs_client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1") and "/v1/recommend" in spec["paths"]
    bundle = docs_client.get("/static/docs/swagger-ui-bundle.js").text
    version = re.search(r'PACKAGE_VERSION:"(\d+)\.(\d+)\.(\d+)"', bundle)  # Swagger UI's build info
    assert version is not None and int(version[1]) >= 5, version
