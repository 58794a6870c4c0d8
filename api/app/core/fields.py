"""Bounds that every value reaching PostgreSQL respects, checked at the edge so that a client's
out-of-range or malformed value is its own 422, never a database error mistaken for an outage."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from pydantic import AfterValidator

INT32_MAX = 2**31 - 1
"""PostgreSQL's ``integer`` (user ids, versions): larger values are refused by the server."""
MAX_SKIP = 1_000_000
"""Offset paging deeper than this reads and throws away a million rows per page; page by key."""


def refuse_nul(value: str) -> str:
    """PostgreSQL text cannot hold the NUL character (U+0000); such input is refused, not stored cut."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[str, AfterValidator(refuse_nul)]
"""A string that can be stored as PostgreSQL text."""
UserId = Annotated[int, Path(ge=1, le=INT32_MAX, description="a user's id")]
Skip = Annotated[int, Query(ge=0, le=MAX_SKIP, description="rows to skip")]
