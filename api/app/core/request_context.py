"""Request ids and one log line per request, as a plain ASGI middleware.

Starlette's ``@app.middleware("http")`` wraps every request in an extra task and memory streams;
this does the same job on the ASGI messages directly.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.app.core.logging import request_id_var

log = logging.getLogger("api.request")

# What a client's X-Request-ID may be: it goes into log lines, response headers and job messages,
# so anything else (newlines, quotes, very long values) is replaced by a fresh id.
REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")


def request_id(given: bytes) -> str:
    """The client's ``X-Request-ID`` if it is 1-64 characters of ``[A-Za-z0-9._-]``, otherwise a
    fresh id (32 hex digits)."""
    return given.decode("ascii") if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestContextMiddleware:
    """Takes a well-formed ``X-Request-ID`` (or makes one), exposes it as ``request.state.request_id`` and to
    logging, echoes it in the response with the time the API spent on it (``Server-Timing``, so
    a client can tell the API's time from the network's), and logs method, path, status and
    duration."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        rid = request_id(given)
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                spent = f"app;dur={(time.perf_counter() - start) * 1000:.1f}".encode()
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", rid.encode("ascii")),
                    (b"server-timing", spent),
                ]
            await send(message)

        token = request_id_var.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={"request_id": rid, "duration_ms": round((time.perf_counter() - start) * 1000, 2)},
            )
