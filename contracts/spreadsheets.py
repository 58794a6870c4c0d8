"""CSV cells that a spreadsheet shows as text: what people wrote (comments, file names) must never
run as a formula when an admin opens an export ("CSV injection", OWASP)."""

from __future__ import annotations

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""What spreadsheet programs read as the start of a formula."""


def cell(value: str) -> str:
    """``value`` with a leading apostrophe when it starts like a formula (OWASP's advice), as is
    otherwise."""
    return "'" + value if value.startswith(FORMULA_START) else value
