"""How a process that cannot use its settings says so: one line, shared by the API and the
model side."""

from __future__ import annotations

from typing import Annotated

import redis.connection
from pydantic import AfterValidator, ValidationError


def settings_problems(exc: ValidationError, *, secret: frozenset[str]) -> str:
    """A settings validation error on one line: each setting refused by its variable's name and
    why, with the value given (``API_PORT=abc: Input should be a valid integer, ...``) unless its
    field is in ``secret`` (credentials, or a URL that may hold a password); a rule across
    settings by its own words."""
    problems = []
    for error in exc.errors():
        why = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:
            problems.append(why)
            continue
        field = str(error["loc"][0])
        value = error["input"]
        if field in secret:
            problems.append(f"{field.upper()}: {why}")
        else:
            # A value with a line break or a control character is quoted, so the line stays one.
            shown = value if isinstance(value, str) and value.isprintable() else repr(value)
            problems.append(f"{field.upper()}={shown}: {why}")
    return "; ".join(problems)


def readable_redis_url(value: str) -> str:
    """``value`` unchanged if the Redis client can read it as a URL (its scheme, database index,
    options), so that a URL it cannot take stops a process at start-up naming the setting. Raises
    the client's ValueError, whose words hold no password."""
    redis.connection.parse_url(value)
    return value


RedisUrl = Annotated[str, AfterValidator(readable_redis_url)]
"""A ``REDIS_URL`` setting, checked as the Redis client reads it (``readable_redis_url``)."""
