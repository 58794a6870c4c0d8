"""Request bodies are bounded before they are read, as a plain ASGI middleware.

FastAPI reads and parses a whole body (spooling a multipart upload to disk) before a route's
dependencies run, so without this a 1 GB upload without a token would be written to disk and
only then refused. Here a body that announces too large a size is refused at once (413), one
that grows past the limit while it is read is cut off with 413, a multipart body that ends before
its closing boundary (cut off on the way) is 400 rather than a form missing its file, and an upload whose request
carries no valid bearer token, nor anything shaped like an API key, is refused (401) before a byte
of its body is read. An API key is looked up before a batch's body is read (``check_key``: a
database lookup, as the route does again), and checked by the route for the other uploads: one
that only looks right can make the API read at most one image upload's limit (10 MB) before its
401, never a batch's (2 GiB). A body that no route
takes (a wrong address or method) is left to the app's 404 or 405, which never reads it. A body
sent to an upload route in an encoding it does not take (a raw image or zip, JSON, text) is
refused (415) whatever its size, before it is read. A body that stops arriving (no byte for
``body_idle_seconds``, a client gone quiet without closing) is answered 408 and the connection
closed: uvicorn sets no such limit, and the request would otherwise hold its connection and the
part of the body spooled to disk for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from python_multipart.multipart import parse_options_header
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.app.core.request_context import send_json
from api.app.core.security import TokenError, VerifiedTokens
from contracts.api_keys import KEY_LENGTH, KEY_PREFIX

UPLOAD_PATHS = frozenset({"/v1/images", "/model/predict", "/v1/batches"})
"""The routes that take a file: only these get the upload limit, and only for a signed-in caller."""
BATCH_PATHS = frozenset({"/v1/batches"})
"""The routes that take many files: the batch limit instead of one upload's."""
JSON_LIMIT = 64 * 1024
"""Largest JSON body, in bytes: the largest the routes take (a user, a feedback comment) is a few KiB."""
MULTIPART_OVERHEAD = 64 * 1024
"""Room for a multipart body's boundaries, part headers and form fields around the file."""


def _header(scope: Scope, name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), "")


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    # The body may be left unread: the connection closes after the answer.
    await send_json(send, status, {"detail": detail}, [(b"connection", b"close"), *(headers or [])])


CUT_OFF = (
    "The multipart body ends before its closing boundary: it was cut off on the way, so some of its "
    "parts may be missing. Send it again."
)


def _closing_delimiter(scope: Scope) -> bytes | None:
    """``--boundary--``, the line that ends a multipart body (RFC 2046, section 5.1.1), from the
    request's Content-Type; None without a boundary (the form parser refuses that itself)."""
    _, options = parse_options_header(_header(scope, b"content-type"))
    boundary = options.get(b"boundary")
    return b"--" + boundary + b"--" if boundary else None


BATCH_ENCODING = (
    "Send the batch as multipart/form-data (curl -F): file parts (images or zips of images), "
    "image_ids and models; a form of image_ids and models only may also be URL-encoded."
)
"""Why a batch sent in any other encoding (a raw zip, JSON, text) is refused (415)."""


def _unformed(scope: Scope) -> bool:
    """Whether the request carries a body that is not a URL-encoded form (the caller has ruled out
    multipart). A request without a body passes: the route answers that the batch is empty."""
    if _header(scope, b"content-type").lower().lstrip().startswith("application/x-www-form-urlencoded"):
        return False
    length = _header(scope, b"content-length").strip()
    return (length != "" and length != "0") or _header(scope, b"transfer-encoding") != ""


def _routed(scope: Scope) -> bool:
    """Whether a route of the app takes this method at this path (Starlette's own matching; a
    few dozen regular expressions, and only for bodies other than uploads)."""
    return any(route.matches(scope)[0] == Match.FULL for route in scope["app"].router.routes)


KeyCheck = Callable[[Scope, str], Awaitable[tuple[int, str, dict[str, str]] | None]]
"""Why an API key would be refused (status, detail, headers), or None: ``deps.refused_key``."""


class BodyLimitMiddleware:
    """Multipart bodies up to ``max_upload_bytes`` (``max_batch_bytes`` for a batch) plus
    ``MULTIPART_OVERHEAD``, needing a valid bearer token; other bodies up to ``JSON_LIMIT``.
    ``tokens`` is read from ``app.state`` once the app has started (the token cache lives there)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_upload_bytes: int,
        max_batch_bytes: int | None = None,
        body_idle_seconds: float = 60.0,
        check_key: KeyCheck | None = None,
    ) -> None:
        self.app = app
        self.check_key = check_key
        self.body_idle_seconds = body_idle_seconds
        self.upload_limit = max_upload_bytes + MULTIPART_OVERHEAD
        self.upload_mb = max_upload_bytes / (1024 * 1024)
        self.batch_limit = (max_batch_bytes or max_upload_bytes) + MULTIPART_OVERHEAD
        self.batch_mb = (max_batch_bytes or max_upload_bytes) / (1024 * 1024)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        content_type = _header(scope, b"content-type").lower().lstrip()
        # A form only: another multipart type (multipart/mixed, say) holds no fields the routes read.
        multipart = scope["path"] in UPLOAD_PATHS and content_type.startswith("multipart/form-data")
        if scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS - BATCH_PATHS and not multipart:
            # Else a raw image body would meet the JSON limit and be called too large.
            await _answer(send, 415, "Send the images as multipart/form-data, in fields named file.")
            return
        if scope["method"] == "POST" and scope["path"] in BATCH_PATHS and not multipart and _unformed(scope):
            # Else a raw zip or a JSON body would be read as an empty form (422) or called too
            # large for one (413), neither of which says what the route takes.
            await _answer(send, 415, BATCH_ENCODING)
            return
        batch = multipart and scope["path"] in BATCH_PATHS
        limit = (self.batch_limit if batch else self.upload_limit) if multipart else JSON_LIMIT
        announced = _header(scope, b"content-length")
        # A body no route takes is left to the app's 404 or 405, which never reads it and says more
        # than "too large" to someone who sent an image to a wrong address (checked only here, on
        # the way to a refusal, not on every request).
        if announced.isdigit() and int(announced) > limit and (multipart or _routed(scope)):
            await _answer(send, 413, self._too_large(multipart, batch, scope["path"] in BATCH_PATHS))
            return
        if multipart and not self._signed_in(scope):
            await _answer(
                send,
                401,
                "Sign in before uploading: the request has no valid bearer token or API key.",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        if batch and self.check_key is not None and (key := self._api_key(scope)):
            refused = await self.check_key(scope, key)
            if refused is not None:
                code, detail, headers = refused
                await _answer(send, code, detail, [(k.lower().encode(), v.encode()) for k, v in headers.items()])
                return
        received = 0
        answered = False
        body_done = False
        closing = _closing_delimiter(scope) if multipart else None
        closed, tail = closing is None, b""

        async def bounded_receive() -> Message:
            nonlocal received, answered, body_done, closed, tail
            if body_done or answered:
                # Past the body, receive() waits for the client to leave, as long as that takes.
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.body_idle_seconds)
                except TimeoutError:
                    await _answer(
                        send,
                        408,
                        f"The request body stopped arriving: nothing came for {self.body_idle_seconds:g} s. "
                        "Send it again.",
                    )
                    answered = True
                    return {"type": "http.disconnect"}
                if message["type"] != "http.request" or not message.get("more_body", False):
                    body_done = True
            if message["type"] == "http.request" and not answered:
                body = message.get("body", b"")
                received += len(body)
                if received > limit:
                    await _answer(send, 413, self._too_large(multipart, batch, scope["path"] in BATCH_PATHS))
                    answered = True
                elif not closed and closing is not None:
                    # The delimiter may straddle two chunks: the end of the last one is kept.
                    closed = closing in tail + body
                    tail = (tail + body)[-(len(closing) - 1) :]
                    if not closed and not message.get("more_body", False):
                        await _answer(send, 400, CUT_OFF)
                        answered = True
            # Past the limit, or cut off, the app sees the client gone, and its own answer is dropped.
            return {"type": "http.disconnect"} if answered else message

        async def guarded_send(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, bounded_receive, guarded_send)

    def _too_large(self, multipart: bool, batch: bool = False, batch_path: bool = False) -> str:
        if batch:
            return f"The batch is too large: at most {self.batch_mb:g} MB in all (MAX_BATCH_BYTES)."
        if multipart:
            return f"The upload is too large: at most {self.upload_mb:g} MB per file."
        if batch_path:
            # Thousands of image ids fit a multipart form, not a URL-encoded one.
            return (
                f"The request body is too large: at most {JSON_LIMIT // 1024} KiB unless sent as "
                f"multipart/form-data (curl -F), which takes up to {self.batch_mb:g} MB (MAX_BATCH_BYTES)."
            )
        return f"The request body is too large: at most {JSON_LIMIT // 1024} KiB."

    @staticmethod
    def _api_key(scope: Scope) -> str:
        """The API key the request authenticates with, as ``deps.get_caller`` reads it; "" for a
        login token or none."""
        scheme, _, token = _header(scope, b"authorization").strip().partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else ""
        key = bearer if bearer.startswith(KEY_PREFIX) else "" if bearer else _header(scope, b"x-api-key").strip()
        return key if len(key) == KEY_LENGTH and key.startswith(KEY_PREFIX) else ""

    def _signed_in(self, scope: Scope) -> bool:
        """Whether the request carries a bearer token with a valid signature and expiry (the
        route still checks revocation and the user's state), or an API key of the right shape
        (the route looks it up), as ``deps.get_caller`` reads them."""
        scheme, _, token = _header(scope, b"authorization").strip().partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else ""
        if bearer and not bearer.startswith(KEY_PREFIX):
            tokens: VerifiedTokens | None = getattr(scope["app"].state, "tokens", None)
            if tokens is None:
                return False
            try:
                tokens.decode(bearer)
            except TokenError:
                return False
            return True
        key = bearer or _header(scope, b"x-api-key").strip()
        return len(key) == KEY_LENGTH and key.startswith(KEY_PREFIX)
