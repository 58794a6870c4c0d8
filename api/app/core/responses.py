"""OpenAPI descriptions of the error answers routes share, as the API really sends them.

Most errors are ``{"detail": "<message>"}``. A 422 is either FastAPI's list of what failed
validation (``api.app.core.errors`` sends it, inputs cut short) or a message from a service (a
password too short, an unknown model, a corrupt image): both arrive under ``detail``, so its
schema says "a message or that list". Answers the middleware gives before a route runs (413 for
a body past its limit, 401 for an upload without a token, 500 for a bug) are described here too.
"""

from typing import Any

from pydantic import BaseModel, Field

from api.app.core.errors import ErrorOut

Responses = dict[int | str, dict[str, Any]]
"""FastAPI's ``responses=`` argument: status code to OpenAPI response."""


class InputErrorOut(BaseModel):
    """One value the request got wrong, as FastAPI reports it."""

    type: str = Field(description="Kind of error, e.g. missing or int_parsing")
    loc: list[str | int] = Field(description="Where: body, query, path or header, then the field")
    msg: str
    input: Any = Field(default=None, description="The value sent, cut short when large")
    ctx: dict[str, Any] | None = Field(default=None, description="The constraint that failed, e.g. its limit")


class InvalidOut(BaseModel):
    """A 422: the request's values failed validation (a list), or a service refused one (a message)."""

    detail: str | list[InputErrorOut]


class ServerErrorOut(BaseModel):
    """A 500: a bug, logged with its traceback under the request id quoted here."""

    detail: str
    request_id: str


def _header(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "required": True, "schema": schema}


RETRY_AFTER = {"Retry-After": _header("Seconds to wait before trying again", {"type": "integer", "minimum": 0})}
CHALLENGE = {"WWW-Authenticate": _header("The scheme to authenticate with (RFC 6750)", {"type": "string"})}


def error(description: str, headers: dict[str, Any] | None = None, model: type[BaseModel] = ErrorOut) -> dict[str, Any]:
    """One OpenAPI response: its body's model (``{detail: message}`` unless told), what it means, its headers."""
    response: dict[str, Any] = {"model": model, "description": description}
    if headers:
        response["headers"] = headers
    return response


PLAIN_TEXT = {"text/plain": {"schema": {"type": "string"}}}
HEAD_TOO_LARGE = "a URL (path and query) of 64 KiB or more, which the HTTP server refuses as plain text"
"""What uvicorn (httptools) refuses before the API sees it: a URL it cannot parse. It sets no bound
on the size of headers (70 KiB of them are served)."""
UNPARSABLE: Responses = {400: {"description": f"The request cannot be parsed: {HEAD_TOO_LARGE}", "content": PLAIN_TEXT}}
BAD_REQUEST: Responses = {
    400: {
        **error(f"The body cannot be parsed (not UTF-8, a malformed form or multipart body), or {HEAD_TOO_LARGE}"),
        "content": PLAIN_TEXT,
    }
}
UNAUTHORIZED: Responses = {
    401: error("Missing, malformed, expired or revoked token or API key, or inactive account", headers=CHALLENGE)
}
FORBIDDEN: Responses = {403: error("Admins only, or an API key without the scope this needs")}
SCOPE: Responses = {403: error("An API key without the scope this needs: read for GET, predict otherwise")}
LOGIN_ONLY: Responses = {403: error("Sent with an API key: this needs a login token")}
NOT_FOUND: Responses = {404: error("No such resource, or not yours")}
CONFLICT: Responses = {409: error("Already exists")}
BODY_TOO_LARGE: Responses = {413: error("The request body is past its limit (64 KiB for JSON)")}
TOO_LARGE: Responses = {413: error("File, request body or image dimensions too large")}
UNSUPPORTED: Responses = {415: error("Not an image in a supported format")}
INVALID: Responses = {422: error("Invalid input: FastAPI's list of errors, or a message", model=InvalidOut)}
TOO_MANY: Responses = {429: error("Too many attempts or jobs in flight; see Retry-After", headers=RETRY_AFTER)}
INTERNAL: Responses = {500: error("A bug; quote the request id when reporting it", model=ServerErrorOut)}
UNAVAILABLE: Responses = {503: error("A dependency is down or the queue is full; see Retry-After", headers=RETRY_AFTER)}
TIMEOUT: Responses = {504: error("No result before the deadline")}

KEY_THROTTLED: Responses = {
    429: error("Too many failed API keys from this address; see Retry-After", headers=RETRY_AFTER)
}

AUTHED: Responses = {**UNAUTHORIZED, **SCOPE, **KEY_THROTTLED}
"""What a user route can answer before it runs: no valid token or key (401), a key without the
scope (403), too many failed keys from the client's address (429)."""
ADMIN: Responses = {**UNAUTHORIZED, **FORBIDDEN, **KEY_THROTTLED}
LOGIN: Responses = {**UNAUTHORIZED, **LOGIN_ONLY}
"""What a route only a login token may use answers before it runs: no valid token (401), an API key (403)."""
BODY: Responses = {**BAD_REQUEST, **BODY_TOO_LARGE, **INVALID}
"""What any route taking a JSON or form body can answer before it runs: unparsable (400), past the
size limit (413) or failing validation (422)."""
UPLOAD: Responses = {**BAD_REQUEST, **AUTHED, **TOO_LARGE, **UNSUPPORTED, **INVALID}
"""What an upload can answer: a malformed multipart body (400), no valid token before the body is
read (401), a file or image too large (413), not an image (415), a corrupt one or a bad field (422)."""
EVERY_ROUTE: Responses = {**UNPARSABLE, **INTERNAL, **UNAVAILABLE}
"""What any route may answer: a URL the HTTP server cannot parse (400, such as one of a hundred
thousand characters), a bug (500), PostgreSQL or Redis out of reach (503)."""
