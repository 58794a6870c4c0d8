"""Which failures are outages: PostgreSQL or Redis out of reach become 503 answers (with one log
line per interval); what a request itself caused becomes a 4xx; the rest is a bug (500)."""

from __future__ import annotations

import errno
import json
import logging
import math
import socket
import time
import traceback
from collections.abc import Iterable
from typing import Any

import asyncpg
import sqlalchemy.exc
import sqlalchemy.orm.exc
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Route

from contracts.streams import REDIS_ERRORS

log = logging.getLogger("api.outage")


class ErrorOut(BaseModel):
    detail: str


class OutageLog:
    """Logs a dependency outage at most once per interval, so an outage is not a log storm."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def report(self, dependency: str, error: BaseException) -> None:
        now = time.monotonic()
        if now - self._last.get(dependency, -self.interval) < self.interval:
            self._suppressed[dependency] = self._suppressed.get(dependency, 0) + 1
            return
        suppressed = self._suppressed.pop(dependency, 0)
        self._last[dependency] = now
        log.error(
            "%s unavailable: %s: %s (%d similar errors since the last line)",
            dependency,
            type(error).__name__,
            error,
            suppressed,
        )


DB_ERRORS = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    ConnectionError,
)
"""The errors that mean PostgreSQL cannot be reached now (down, restarting, pool exhausted). The
driver's statements (core/driver.py) raise a lost connection as ``ConnectionLost``, a
``ConnectionError``; asyncpg's other errors are told apart by their SQLSTATE (``database_status``)."""

# Socket errors of a connection that could not be made or was lost; any other OSError is a bug.
_NETWORK_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EPIPE,
    errno.ENOTCONN,
}


CONCURRENT_CHANGE = {"40P01", "40001"}
"""PostgreSQL's deadlock_detected and serialization_failure: the request met another one changing
the same rows at the same time, and PostgreSQL rolled its transaction back; the client may send it
again."""


OWNER_GONE = "This account no longer exists."
"""The answer (401) to a request whose own account was deleted while it ran."""


def _owner_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is a row naming its owner (``owner_id``) refused because that user was
    deleted meanwhile (SQLSTATE 23503 on a ``fk_<table>_owner_id_users`` constraint): the
    request's own account, as rows are owned by the requester."""
    orig = getattr(exc, "orig", exc)
    constraint = str(getattr(orig, "constraint_name", None) or getattr(orig.__cause__, "constraint_name", "") or "")
    return _sqlstate(exc) == "23503" and constraint.endswith("_owner_id_users")


def _sqlstate(exc: BaseException) -> str:
    """PostgreSQL's error code: of asyncpg's error itself, or of the one SQLAlchemy wraps."""
    return str(getattr(getattr(exc, "orig", exc), "sqlstate", "") or "")


def _driver_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is asyncpg's timeout: a PostgreSQL that hangs rather than refuses (a frozen
    host, a cut network) lets the connect timeout or ``command_timeout`` (``core.db.make_engine``)
    run out, and asyncpg raises Python's own ``TimeoutError``, which SQLAlchemy passes through.
    Told apart by the driver's frames in its traceback: a timeout of any other origin is a bug."""
    candidate = getattr(exc, "orig", None) or exc
    if not isinstance(candidate, TimeoutError):
        return False
    frames = traceback.walk_tb(candidate.__traceback__)
    return any(str(frame.f_globals.get("__name__", "")).startswith("asyncpg") for frame, _ in frames)


def violated_constraint(exc: BaseException) -> str | None:
    """The name of the constraint PostgreSQL refused a statement for: of asyncpg's error itself,
    or of the one SQLAlchemy's wraps (its ``orig``, raised from asyncpg's)."""
    for candidate in (exc, getattr(exc, "orig", None), getattr(getattr(exc, "orig", None), "__cause__", None)):
        name = getattr(candidate, "constraint_name", None)
        if name:
            return str(name)
    return None


LOCK_NOT_AVAILABLE = "55P03"
"""PostgreSQL's lock_not_available: a lock was not granted within the transaction's
``lock_timeout``."""


def lock_not_available(exc: BaseException) -> bool:
    """Whether ``exc`` is PostgreSQL giving up a lock wait at its ``lock_timeout`` (``LOCK_NOT_AVAILABLE``)."""
    return _sqlstate(exc) == LOCK_NOT_AVAILABLE


def concurrent_change(exc: BaseException) -> bool:
    """Whether ``exc`` is PostgreSQL rolling a transaction back for a concurrent one (``CONCURRENT_CHANGE``)."""
    return _sqlstate(exc) in CONCURRENT_CHANGE


def database_status(exc: BaseException) -> int:
    """The HTTP status a database error deserves: 503 when PostgreSQL cannot be reached (the
    client may retry), 409 for a constraint the request broke or a concurrent request it met
    (``CONCURRENT_CHANGE``) or one that held a lock past ``lock_timeout``, 422 for a value PostgreSQL cannot
    hold (out of range, malformed), 500 for anything else (a bug of ours)."""
    if isinstance(exc, DB_ERRORS) or getattr(exc, "connection_invalidated", False):
        return 503
    if _driver_timeout(exc):
        return 503
    if isinstance(exc, socket.gaierror):
        # The server's name does not resolve now: a container being replaced drops out of DNS.
        return 503
    if isinstance(exc, OSError):
        # asyncio reports a refused connection to several addresses as one plain OSError.
        return 503 if exc.errno in _NETWORK_ERRNOS or str(exc).startswith("Multiple exceptions") else 500
    # PostgreSQL's SQLSTATE classes: 23 integrity constraint violation, 22 data exception, 08
    # connection exception, 53 insufficient resources, 57P operator intervention (shutting down).
    sqlstate = _sqlstate(exc)
    if isinstance(exc, sqlalchemy.exc.IntegrityError) or sqlstate.startswith("23"):
        return 409
    if sqlstate in CONCURRENT_CHANGE or sqlstate == LOCK_NOT_AVAILABLE:
        return 409
    if sqlstate.startswith(("08", "53", "57P")):
        return 503
    if (
        isinstance(exc, sqlalchemy.exc.DataError)
        or sqlstate.startswith("22")
        # asyncpg refuses some values before they reach the server (an int past 64 bits).
        or "invalid input for query argument" in str(exc)
    ):
        return 422
    return 500


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means Redis or PostgreSQL cannot be reached or refuses connections now (a
    restart, a shutdown, too many clients): the work is to be retried later, not given up."""
    return outage_of(exc) is not None


def outage_of(exc: BaseException) -> str | None:
    """The dependency ``exc`` finds out of reach, as ``OutageLog.report`` names it ("redis" or
    "postgresql"), or None for any other error. PostgreSQL counts whether it refuses (a
    ``DB_ERRORS``) or hangs (asyncpg's ``TimeoutError``, ``_driver_timeout``)."""
    if isinstance(exc, REDIS_ERRORS):
        return "redis"
    if database_status(exc) == 503:
        return "postgresql"
    return None


ECHO_LIMIT = 200
"""Longest input a validation error quotes back, in characters of its JSON."""


def _json_safe(value: Any) -> Any:
    """``value`` with infinities and NaN as strings: JSON has no such numbers, and a body holding
    them is refused by strict parsers (JavaScript's JSON.parse among them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


NOT_A_FILE = (
    "Expected a file: send it as a multipart part with a filename "
    "(a part without one arrives as text, so its content is not repeated here)."
)


TOO_MANY_PARTS = (
    "A request takes at most 1,000 file parts and 1,000 other form fields. Send more images as a "
    "zip in one file part (a batch takes up to 10,000 by default: MAX_BATCH_IMAGES), and more "
    "image ids in more than one batch."
)
"""Why a batch's form past Starlette's parser limits is refused (413), instead of its bare 400."""
TOO_MANY_PARTS_FOR_ONE = (
    "This route takes one image, in one file part named file, and a few form fields; the request "
    "sent more than 1,000 parts. Send many images as a batch (POST /v1/batches)."
)
"""The same for a route that takes one image."""
TEXT_PART_TOO_LARGE = (
    "A form field is over 1 MB: a file must be sent as a multipart part with a filename "
    "(a part without one is read as text, which is limited to 1 MB)."
)


def _multipart_reason(exc: BaseException) -> str | None:
    """The multipart parser's own message behind Starlette's "Invalid multipart data." (such as
    "Maximum header size exceeded" for a file name of thousands of characters), found in the
    exceptions ``exc`` was raised while handling."""
    seen: BaseException | None = exc.__context__
    while seen is not None:
        if type(seen).__module__.startswith(("python_multipart", "multipart")):
            return str(seen) or None
        seen = seen.__cause__ or seen.__context__
    return None


def _readable(error: dict[str, Any]) -> dict[str, Any]:
    """One of FastAPI's validation errors as the 422 gives it: a large input cut (``_short``),
    and a file part sent without a filename (Starlette then reads it as a text field) said so,
    without the file's bytes as text."""
    if "Expected UploadFile" in str(error.get("msg", "")):
        return {"type": "value_error", "loc": error.get("loc"), "msg": NOT_A_FILE}
    return {**error, "input": _short(error["input"])} if "input" in error else error


def _short(value: Any) -> Any:
    """``value`` as a 422 quotes it: whole when small, else cut (a string) or summarised; never
    a number JSON cannot write."""
    if isinstance(value, bytes | bytearray):
        # A body that is no JSON (an image sent where JSON was expected): FastAPI quotes its raw
        # bytes, which need not be text.
        value = bytes(value).decode("utf-8", errors="replace")
    value = _json_safe(jsonable_encoder(value))
    encoded = json.dumps(value, default=str)
    if len(encoded) <= ECHO_LIMIT:
        return value
    if isinstance(value, str):
        return value[:ECHO_LIMIT] + "..."
    return f"({type(value).__name__} of {len(encoded):,} characters, not repeated)"


def unavailable(detail: str, retry_after: int) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": detail}, headers={"Retry-After": str(retry_after)})


def install_allow_header(app: FastAPI, routes: Iterable[BaseRoute]) -> None:
    """A 405 names in ``Allow`` every method its path takes (RFC 9110), from ``routes``: the
    router names only the methods of the first route whose path matched, but one path often has
    several routes (GET and POST /v1/users; GET /v1/images/{id} here, DELETE in another router)."""
    table = [(route.path_regex, route.methods) for route in routes if isinstance(route, Route) and route.methods]

    async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
        path = request.scope["path"]
        methods = sorted({m for regex, allowed in table if regex.match(path) for m in allowed})
        return JSONResponse(
            status_code=405, content={"detail": "Method Not Allowed"}, headers={"Allow": ", ".join(methods)}
        )

    app.add_exception_handler(405, method_not_allowed)


class BlobMissing(FileNotFoundError):
    """A stored file of an image is gone: the image was deleted while a request read it (answered 404)."""


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
"""Writing to STORAGE_DIR failed because the volume is full, over its quota or read-only."""
STORAGE_UNWRITABLE = "The portal's storage is full or read-only; retry later."


def install_outage_handlers(app: FastAPI, outage_log: OutageLog, retry_after: int) -> None:
    """Redis and PostgreSQL outages, and a storage volume full or read-only, become 503 with
    Retry-After (logged once per interval);
    database errors the request caused become 409 or 422; an image's file gone because the image
    was deleted meanwhile (``BlobMissing``) 404; the rest propagates as a 500."""

    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        outage_log.report("redis", exc)
        return unavailable("A service the portal needs (Redis) is unavailable; retry shortly.", retry_after)

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            # The portal's own disk, full or read-only: an operator's to mend, not the request's.
            outage_log.report("storage", exc)
            return unavailable(STORAGE_UNWRITABLE, retry_after)
        status = database_status(exc)
        if status == 503:
            outage_log.report("postgresql", exc)
            return unavailable("The database is unavailable; retry shortly.", retry_after)
        if status == 409 and _owner_gone(exc):
            return JSONResponse(status_code=401, content={"detail": OWNER_GONE})
        if status == 409 and concurrent_change(exc):
            detail = "Another request changed the same data at the same time; retry."
            return JSONResponse(status_code=409, content={"detail": detail}, headers={"Retry-After": "1"})
        if status == 409 and lock_not_available(exc):
            detail = "Another change to the same data is in progress (an account being deleted, say); retry shortly."
            return JSONResponse(status_code=409, content={"detail": detail}, headers={"Retry-After": "5"})
        if status == 409:
            return JSONResponse(status_code=409, content={"detail": "The request conflicts with existing data."})
        if status == 422:
            return JSONResponse(
                status_code=422, content={"detail": "A value in the request is out of range or malformed."}
            )
        raise exc

    async def changed_meanwhile(request: Request, exc: Exception) -> JSONResponse:
        # The ORM's UPDATE or DELETE found no row: another request deleted it (its user, for one).
        detail = "What this request changes was deleted or changed meanwhile; reload and retry."
        return JSONResponse(status_code=409, content={"detail": detail})

    async def invalid_request(request: Request, exc: Exception) -> Response:
        # FastAPI's own answer, except that a large input is not sent back to its sender.
        assert isinstance(exc, RequestValidationError)
        errors = [_readable(error) for error in exc.errors()]
        # ASCII JSON: an input holding a lone surrogate is escaped, where UTF-8 could not encode it.
        body = json.dumps({"detail": _json_safe(jsonable_encoder(errors))}, default=str, allow_nan=False)
        return Response(status_code=422, content=body, media_type="application/json")

    async def blob_missing(request: Request, exc: Exception) -> JSONResponse:
        # Found before an OSError's handler: the image was deleted while this request read it.
        # Logged: a store that lost files, or a wrong STORAGE_DIR, shows the same way.
        log.warning("a stored file was missing for %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(status_code=404, content={"detail": "Image not found: it was deleted meanwhile."})

    async def bad_request(request: Request, exc: Exception) -> Response:
        # Starlette reads a multipart part without a filename as text, which it caps at 1 MB: a
        # photo sent that way was told "Part exceeded maximum size of 1024KB." under a 10 MB limit.
        assert isinstance(exc, StarletteHTTPException)
        if str(exc.detail).startswith("Part exceeded maximum size"):
            return JSONResponse(status_code=422, content={"detail": TEXT_PART_TOO_LARGE})
        if str(exc.detail).startswith(("Too many files.", "Too many fields.")):
            # Starlette's form parser takes at most 1,000 files and 1,000 fields a request,
            # whatever the route's own limits: a batch of more images goes as a zip.
            detail = TOO_MANY_PARTS if request.url.path.startswith("/v1/batches") else TOO_MANY_PARTS_FOR_ONE
            return JSONResponse(status_code=413, content={"detail": detail})
        if exc.detail == "Invalid multipart data." and (reason := _multipart_reason(exc)):
            return JSONResponse(status_code=400, content={"detail": f"Invalid multipart data: {reason}."})
        return await http_exception_handler(request, exc)

    app.add_exception_handler(400, bad_request)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(sqlalchemy.orm.exc.StaleDataError, changed_meanwhile)
    app.add_exception_handler(BlobMissing, blob_missing)
    for redis_error in REDIS_ERRORS:
        app.add_exception_handler(redis_error, redis_down)
    for db_error in (*DB_ERRORS, sqlalchemy.exc.DBAPIError, asyncpg.PostgresError, OSError):
        app.add_exception_handler(db_error, database_error)
