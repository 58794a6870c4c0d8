"""OpenAPI descriptions of the error answers routes share."""

from typing import Any

from api.app.core.errors import ErrorOut


def _r(description: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": description}


UNAUTHORIZED = {401: _r("Missing, malformed, expired or revoked token, or inactive account")}
FORBIDDEN = {403: _r("Admins only")}
NOT_FOUND = {404: _r("No such resource, or not yours")}
CONFLICT = {409: _r("Already exists")}
TOO_MANY = {429: _r("Too many attempts or jobs in flight; see Retry-After")}
UNAVAILABLE = {503: _r("A dependency is down or the queue is full; see Retry-After")}
TIMEOUT = {504: _r("No result before the deadline")}
TOO_LARGE = {413: _r("File or image dimensions too large")}
UNSUPPORTED = {415: _r("Not an image in a supported format")}
INVALID = {422: _r("Invalid input")}

AUTHED = UNAUTHORIZED
ADMIN = {**UNAUTHORIZED, **FORBIDDEN}
