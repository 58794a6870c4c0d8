"""Bounds that every value reaching PostgreSQL respects, checked at the edge so that a client's
out-of-range or malformed value is its own 422, never a database error mistaken for an outage."""

from __future__ import annotations

import unicodedata
from typing import Annotated

from fastapi import Path, Query
from pydantic import AfterValidator, BaseModel, ConfigDict

INT32_MAX = 2**31 - 1
"""PostgreSQL's ``integer`` (user ids, versions): larger values are refused by the server."""
MAX_SKIP = 10_000
"""Offset paging reads and throws away every skipped row; deeper than this, page by key (cursor)."""


def storable(value: str) -> bool:
    """Whether PostgreSQL can store ``value`` as text: UTF-8 encodable (no lone surrogates) and
    without the NUL character (U+0000)."""
    return "\x00" not in value and (value.isascii() or _encodes(value))


def _encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def refuse_unstorable(value: str) -> str:
    """Refuses text PostgreSQL cannot hold rather than storing it cut or mangled."""
    if not storable(value):
        raise ValueError("must be Unicode text without NUL characters or lone surrogates")
    return value


Text = Annotated[str, AfterValidator(refuse_unstorable)]
"""A string that can be stored as PostgreSQL text."""


def visible(text: str | None) -> bool:
    """Whether ``text`` has a character one can see: not only spaces, line breaks or invisible
    format characters (Unicode category Cf: a zero-width space, say)."""
    return text is not None and any(not ch.isspace() and unicodedata.category(ch) != "Cf" for ch in text)


BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Unicode's bidirectional embeddings, overrides and isolates (UAX #9, section 2): in a name they
reorder what is shown after them ("invoice\u202egnp.exe" shows as "invoiceexe.png")."""


LINE_BREAKING = frozenset({"Cc", "Zl", "Zp"})
"""Unicode categories of characters that break or control a line: controls (newline, tab, escape,
C1) and the line and paragraph separators (U+2028, U+2029)."""


def refuse_controls(value: str) -> str:
    """Refuses a one-line name holding a control character or a line or paragraph separator
    (``LINE_BREAKING``) or a bidirectional control (``BIDI_CONTROLS``): shown in tables and logs,
    it could break lines or make one name look like another."""
    if any(unicodedata.category(ch) in LINE_BREAKING or ch in BIDI_CONTROLS for ch in value):
        raise ValueError("must not hold control characters (newlines, tabs, escapes) or text-direction overrides")
    return value


IMPLICIT_DIRECTION_MARKS = frozenset("\u200e\u200f\u061c")
"""Unicode's left-to-right, right-to-left and Arabic letter marks (UAX #9, section 2.6): invisible,
and able to move the neutral characters around them (a name's dots and dashes)."""


def shown_safely(value: str) -> str:
    """``value`` (a file name as sent) with each control character, line or paragraph separator
    (``LINE_BREAKING``), bidirectional control (``BIDI_CONTROLS``) and direction mark
    (``IMPLICIT_DIRECTION_MARKS``) replaced by U+FFFD: a file
    name is kept rather than refused (a zip made elsewhere may hold any), but one shown in a
    table, a CSV or a log must not break its line or read as another name."""
    if value.isascii() and value.isprintable():
        return value
    unsafe = BIDI_CONTROLS | IMPLICIT_DIRECTION_MARKS
    return "".join("\ufffd" if unicodedata.category(ch) in LINE_BREAKING or ch in unsafe else ch for ch in value)


Name = Annotated[str, AfterValidator(refuse_unstorable), AfterValidator(refuse_controls)]
"""A one-line name people read (a user's, a key's): storable text without control characters."""
UserId = Annotated[int, Path(ge=1, le=INT32_MAX, description="a user's id")]
Skip = Annotated[int, Query(ge=0, le=MAX_SKIP, description="rows to skip (at most 10,000; deeper, use cursor)")]


class RequestBody(BaseModel):
    """A JSON body a route takes. A key it does not know is refused (422, naming the key): a
    misspelt or unsupported field ({"password": ...} to a user's update, say) must not be dropped
    while the request answers 200 as if it had done what was asked."""

    model_config = ConfigDict(extra="forbid")
