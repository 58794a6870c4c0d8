"""Request ids and one log line per request, as a plain ASGI middleware.

Starlette's ``@app.middleware("http")`` wraps every request in an extra task and memory streams;
this does the same job on the ASGI messages directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.app.core.logging import request_id_var
from contracts import keys

log = logging.getLogger("api.request")

# On every answer: browsers must not guess a content type (an upload served back as HTML), and
# no URL of the portal leaks to other sites through Referer.
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]

# What a client's X-Request-ID may be: it goes into log lines, response headers and job messages,
# so anything else (newlines, quotes, very long values) is replaced by a fresh id.
REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")


_BATCH_PREFIX = keys.BATCH_REQUEST_PREFIX.encode()

# What the request in hand stored that goes on without it, for the answer a shutdown cuts it with.
# A dict made per request, so that a note made in a task the request's context was copied into
# still reaches the middleware.
_stored_var: ContextVar[dict[str, str] | None] = ContextVar("stored", default=None)


def note_stored_job(job_id: uuid.UUID) -> None:
    """Records that the request in hand stored the prediction job ``job_id``, which goes on
    whatever becomes of the request: were the server to cut the request as it stops, its 503
    names the job (``job_id`` and where to read its answer) instead of asking for the upload again,
    which would make a duplicate. Does nothing outside a request."""
    stored = _stored_var.get()
    if stored is not None:
        stored["job_id"] = str(job_id)


def request_id(given: bytes) -> str:
    """The client's ``X-Request-ID`` if it is 1-64 characters of ``[A-Za-z0-9._-]``, otherwise a
    fresh id (32 hex digits). A client's id never starts with ``keys.BATCH_REQUEST_PREFIX``: that
    marks a batch's jobs, which are kept out of a person's in-flight cap."""
    if REQUEST_ID.fullmatch(given) and not given.startswith(_BATCH_PREFIX):
        return given.decode("ascii")
    return uuid.uuid4().hex


async def send_json(
    send: Send, status: int, content: dict[str, str], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answers with ``content`` as JSON from an ASGI middleware, before the app has answered."""
    body = json.dumps(content).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Takes a well-formed ``X-Request-ID`` (or makes one), exposes it as ``request.state.request_id`` and to
    logging, echoes it in the response with the time the API spent on it (``Server-Timing``, so
    a client can tell the API's time from the network's), and logs method, path, status and
    duration. A request the server cancels as it shuts down (past its graceful-shutdown time)
    is answered 503 with ``Retry-After`` when nothing was answered yet, not 500: another
    process, or this one restarted, takes it when it is sent again. A request that stored a job
    which goes on without it (``note_stored_job``) names it instead: ``job_id`` in the body."""

    def __init__(self, app: ASGIApp, *, retry_after_seconds: int = 5) -> None:
        self.app = app
        self.retry_after = str(retry_after_seconds).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        rid = request_id(given)
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        start = time.perf_counter()

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                spent = f"app;dur={(time.perf_counter() - start) * 1000:.1f}".encode()
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", rid.encode("ascii")),
                    (b"server-timing", spent),
                    *SECURITY_HEADERS,
                ]
            await send(message)

        token = request_id_var.set(rid)
        stored: dict[str, str] = {}
        stored_token = _stored_var.set(stored)
        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # The server stopping: uvicorn cancels what is left after its graceful-shutdown time
            # and would answer 500. Answered 503 first; the cancellation then goes on as asked.
            log.warning("%s %s cancelled: the server is shutting down", scope["method"], scope["path"])
            if not started:
                detail = "The server is restarting; send the request again."
                if job_id := stored.get("job_id"):
                    detail = (
                        "The server is restarting; the prediction was stored and goes on:"
                        f" GET /v1/predictions/{job_id} gives its answer."
                    )
                # No Retry-After with a stored job: a client retrying as told would make a second job.
                retry = [] if stored else [(b"retry-after", self.retry_after)]
                await send_json(
                    send_with_id,
                    503,
                    {"detail": detail, "request_id": rid, **stored},
                    [*retry, (b"connection", b"close")],
                )
            raise
        except Exception:
            # Our bug: logged here once, with its traceback and request id, and answered as a 500
            # that names the request id, so a report can be matched with the log line.
            log.exception("unhandled error in %s %s", scope["method"], scope["path"], extra={"request_id": rid})
            if started:
                raise
            await send_json(
                send_with_id,
                500,
                {"detail": "Internal server error; quote this request id when reporting it.", "request_id": rid},
            )
        finally:
            _stored_var.reset(stored_token)
            request_id_var.reset(token)
            log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={"request_id": rid, "duration_ms": round((time.perf_counter() - start) * 1000, 2)},
            )
