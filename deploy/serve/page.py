"""The page for the person at the device (``GET /``): plain HTML, CSS and JavaScript shipped as
package data (``deploy/serve/static/``), no build step, nothing fetched from the internet. A strict
Content-Security-Policy allows only our own files: no inline script, no other origin."""

from __future__ import annotations

from importlib import resources

from fastapi.responses import Response

STATIC_TYPES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def static_bytes(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def page_response() -> Response:
    return Response(static_bytes("index.html"), media_type=STATIC_TYPES["index.html"], headers=SECURITY_HEADERS)


def static_file(name: str) -> Response:
    if name not in STATIC_TYPES or name == "index.html":  # a fixed list: no path ever reaches the file system
        return Response(b"not found", status_code=404, media_type="text/plain")
    return Response(static_bytes(name), media_type=STATIC_TYPES[name], headers=SECURITY_HEADERS)
