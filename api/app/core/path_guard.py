"""Paths holding control characters are refused before routing, as a plain ASGI middleware.

The ASGI server hands the app the percent-decoded path, and Starlette matches routes with regular
expressions ending in ``$``, which in Python also matches just before a trailing newline: without
this, ``GET /metrics%0A`` would reach ``/metrics`` while a proxy in front, which denies the exact
path ``/metrics``, saw another path and let it through. No route of the API has a control
character in it, so a request whose decoded path holds one (C0, DEL or C1) is answered 404, as
any path without a route is (every route with a path parameter documents 404), and never
routed: no route is reachable by a path other than its own.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Receive, Scope, Send

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""A control character: C0 (newline, carriage return, NUL...), DEL, or C1."""
DETAIL = "Not Found: the path holds a control character."


def has_control_character(path: str) -> bool:
    """Whether ``path`` (as decoded by the server) holds a control character."""
    return CONTROL.search(path) is not None


class PathGuardMiddleware:
    """Answers 404 to an HTTP request, and refuses a WebSocket handshake, whose path holds a control
    character; passes everything else on untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not has_control_character(scope["path"]):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": DETAIL}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
