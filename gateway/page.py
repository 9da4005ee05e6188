"""The tenant's plan page and the API description, as bytes ready to serve.

The page is static (``gateway/static/``: HTML, CSS and a little JavaScript; no build step,
no CDN) and fetches ``{prefix}`` itself. It lives at ``{prefix}/ui`` with its assets as
siblings (``{prefix}/ui.css``, ``{prefix}/ui.js``), so its relative links work under any
prefix. Load once at start-up; serving is a dictionary look-up.

    assets = page_assets(settings, matrix)     # {"ui": (content_type, body), ...}
    found = assets.get(path[len(prefix) + 1:]) # for GET {prefix}/<name>
    if found: answer 200 with found[0], found[1] and PAGE_HEADERS
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.resources import files
from types import MappingProxyType

from gateway.config import Settings
from gateway.matrix import TierMatrix
from gateway.openapi import encode_openapi

# name under the prefix -> (file in gateway/static, Content-Type)
_STATIC: dict[str, tuple[str, str]] = {
    "ui": ("plan.html", "text/html; charset=utf-8"),
    "ui.css": ("plan.css", "text/css; charset=utf-8"),
    "ui.js": ("plan.js", "text/javascript; charset=utf-8"),
}

# For every asset: the page runs only its own script and style, talks only to its own
# origin, and cannot be framed (clickjacking an upgrade button).
PAGE_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-cache"),
)


def page_asset(name: str) -> tuple[str, bytes] | None:
    """``(content_type, body)`` of one page asset (``ui``, ``ui.css``, ``ui.js``), read
    from the package; None for any other name."""
    found = _STATIC.get(name)
    if found is None:
        return None
    filename, content_type = found
    return content_type, files("gateway").joinpath("static", filename).read_bytes()


def page_assets(
    settings: Settings, matrix: TierMatrix | None = None
) -> Mapping[str, tuple[str, bytes]]:
    """Everything the gateway serves under its prefix besides ``{prefix}`` itself and
    ``{prefix}/events``: the page, its assets and ``openapi.json`` (for ``matrix``), read
    and encoded once."""
    assets: dict[str, tuple[str, bytes]] = {}
    for name in _STATIC:
        asset = page_asset(name)
        assert asset is not None
        assets[name] = asset
    assets["openapi.json"] = ("application/json", encode_openapi(settings, matrix))
    return MappingProxyType(assets)
