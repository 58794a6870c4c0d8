"""OpenAPI descriptions of the error answers routes share."""

from typing import Any

from api.app.core.errors import ErrorOut

Responses = dict[int | str, dict[str, Any]]
"""FastAPI's ``responses=`` argument: status code to OpenAPI response."""


def _r(description: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": description}


UNAUTHORIZED: Responses = {401: _r("Missing, malformed, expired or revoked token, or inactive account")}
FORBIDDEN: Responses = {403: _r("Admins only")}
NOT_FOUND: Responses = {404: _r("No such resource, or not yours")}
CONFLICT: Responses = {409: _r("Already exists")}
TOO_MANY: Responses = {429: _r("Too many attempts or jobs in flight; see Retry-After")}
UNAVAILABLE: Responses = {503: _r("A dependency is down or the queue is full; see Retry-After")}
TIMEOUT: Responses = {504: _r("No result before the deadline")}
TOO_LARGE: Responses = {413: _r("File or image dimensions too large")}
UNSUPPORTED: Responses = {415: _r("Not an image in a supported format")}
INVALID: Responses = {422: _r("Invalid input")}

AUTHED: Responses = UNAUTHORIZED
ADMIN: Responses = {**UNAUTHORIZED, **FORBIDDEN}
