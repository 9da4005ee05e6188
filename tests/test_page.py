"""The plan page's assets as served bytes: names, content types, security headers, and
nothing that would load from another origin (no CDN, no build step)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
import pytest

from gateway.config import load_settings
from gateway.openapi import openapi_document
from gateway.page import PAGE_HEADERS, page_asset, page_assets

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("name", "content_type", "marker"),
    [
        ("ui", "text/html; charset=utf-8", b"<!doctype html>"),
        ("ui.css", "text/css; charset=utf-8", b":focus-visible"),
        ("ui.js", "text/javascript; charset=utf-8", b'credentials: "same-origin"'),
    ],
)
def test_page_assets(name: str, content_type: str, marker: bytes) -> None:
    found = page_asset(name)
    assert found is not None
    assert found[0] == content_type
    assert marker in found[1]


@pytest.mark.parametrize("name", ["", "plan.html", "ui/", "../config.py", "openapi.json"])
def test_other_names_are_not_page_assets(name: str) -> None:
    assert page_asset(name) is None


def test_assets_include_the_openapi_document_for_the_settings() -> None:
    settings = load_settings(REPO / "gateway.toml")
    assets = page_assets(settings)
    assert set(assets) == {"ui", "ui.css", "ui.js", "openapi.json"}
    content_type, body = assets["openapi.json"]
    assert content_type == "application/json"
    assert msgspec.json.decode(body) == msgspec.json.decode(
        msgspec.json.encode(openapi_document(settings))
    )


def test_nothing_loads_from_another_origin() -> None:
    for name in ("ui", "ui.css", "ui.js"):
        found = page_asset(name)
        assert found is not None
        assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]", found[1]), name
    html = page_asset("ui")
    assert html is not None
    # Relative siblings of "ui", so the page works under any prefix.
    assert b'href="ui.css"' in html[1] and b'src="ui.js"' in html[1]
    assert b"<script>" not in html[1] and b"style=" not in html[1]  # the CSP allows neither


def test_security_headers() -> None:
    headers = dict(PAGE_HEADERS)
    csp = headers["Content-Security-Policy"]
    for directive in ("script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_the_static_files_ship_in_the_package() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "static/*" in pyproject["tool"]["setuptools"]["package-data"]["gateway"]
    assert {p.name for p in (REPO / "gateway" / "static").iterdir()} == {
        "plan.html",
        "plan.css",
        "plan.js",
    }
