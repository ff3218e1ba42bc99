"""API docs that work on an air-gapped host: ``/docs`` (Swagger UI) and ``/redoc`` load their
scripts, styles and icon from this service, never from a CDN.

FastAPI's own pages point at cdn.jsdelivr.net (and ReDoc at Google Fonts), so on a host without
internet access they render blank. The assets here are the files the ``fastapi-offline`` package
ships (Swagger UI 5, which reads OpenAPI 3.1 as FastAPI writes it, and ReDoc's standalone
bundle), a dependency of the ``serve`` extra: nothing is vendored into this repository.
Swagger UI's validator badge, which would call validator.swagger.io, is switched off.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/static/docs"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png
ASSETS_DIR = files("fastapi_offline") / "static"


def install_docs(app: FastAPI) -> None:
    """Serve the assets under ``ASSETS_URL`` and the two doc pages; create ``app`` with
    ``docs_url=None, redoc_url=None`` so FastAPI's CDN pages are not registered too."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError(f"create the app with docs_url=None and redoc_url=None (got {app.docs_url!r}, "
                         f"{app.redoc_url!r}): install_docs serves both pages itself")
    app.mount(ASSETS_URL, StaticFiles(directory=str(ASSETS_DIR)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")  # behind a proxy that strips a prefix
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=f"{root}{oauth2_redirect}",
            swagger_ui_parameters={"validatorUrl": None})

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False)
