"""Keyset ("cursor") paging of the lists that grow with a person's history.

A page is the next ``limit`` rows, newest first, after the last row of the previous page, found by
its ``(created_at, id)`` through an index that starts with the same columns: a page at any depth
reads ``limit`` index entries, where ``OFFSET`` reads and discards every row before the page.
See Markus Winand, "We need tool support for keyset pagination" (use-the-index-luke.com/no-offset).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

KeyedT = TypeVar("KeyedT")
RowT = TypeVar("RowT")


def opaque(raw: str) -> str:
    """``raw`` as an opaque, URL-safe cursor string (base64 without padding)."""
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def unwrap(text: str) -> str:
    """What ``opaque`` wrapped; ValueError for anything else."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("not a cursor this API gave") from exc


@dataclass(frozen=True)
class Cursor:
    """Where a page ends: the ``created_at`` and ``id`` of its last row."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        """An opaque, URL-safe string (base64 of ``<ISO time>|<uuid>``)."""
        return opaque(f"{self.created_at.isoformat()}|{self.id}")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The cursor ``encode`` made; ValueError for anything else."""
        try:
            when, _, key = unwrap(text).partition("|")
            created_at = datetime.fromisoformat(when)
            if created_at.tzinfo is None:
                raise ValueError("a cursor's time carries its zone")
            return cls(created_at, uuid.UUID(key))
        except ValueError as exc:
            raise ValueError("not a cursor this API gave") from exc


@dataclass(frozen=True)
class KeysetPage:
    """What a list route was asked for: at most ``limit`` rows after ``after`` (from the start
    when None), skipping ``skip`` first (classic offset paging, bounded), and the total or not."""

    limit: int
    after: Cursor | None = None
    skip: int = 0
    total: bool = False


SelectT = TypeVar("SelectT", bound="Select[*tuple[Any, ...]]")


def keyset_select(query: SelectT, entity: Any, page: KeysetPage) -> SelectT:
    """``query`` (rows of ``entity``, which has ``created_at`` and ``id``) narrowed to the page:
    the rows after ``page.after``, newest first, past ``page.skip``, and one more than
    ``page.limit`` so the caller can tell whether another page follows (see ``split_page``)."""
    if page.after is not None:
        query = query.where(tuple_(entity.created_at, entity.id) < tuple_(page.after.created_at, page.after.id))
    return query.order_by(entity.created_at.desc(), entity.id.desc()).offset(page.skip).limit(page.limit + 1)


def split_page(
    rows: list[RowT], page: KeysetPage, key: Callable[[RowT], tuple[datetime, uuid.UUID]]
) -> tuple[list[RowT], str | None]:
    """The page's rows out of ``keyset_select``'s (at most ``page.limit``) and the next page's
    cursor, made from ``key`` (``created_at`` and ``id``) of the last row; None on the last page."""
    more, rows = len(rows) > page.limit, rows[: page.limit]
    return rows, (Cursor(*key(rows[-1])).encode() if more and rows else None)


async def keyset_page(
    session: AsyncSession, entity: type[KeyedT], *where: ColumnElement[bool], page: KeysetPage
) -> tuple[list[KeyedT], int | None, str | None]:
    """One page of ``entity``'s rows matching ``where``, newest first (``created_at``, then
    ``id``, descending); the number of such rows when ``page.total`` (a count of all of them: asked
    for, not given by default); the cursor of the next page, None on the last one."""
    model: Any = entity
    found = list(await session.scalars(keyset_select(select(entity).where(*where), model, page)))
    rows, next_cursor = split_page(found, page, model_key)
    return rows, await count_of(session, entity, *where, page=page), next_cursor


def model_key(row: Any) -> tuple[datetime, uuid.UUID]:
    """A mapped row's keyset key: its ``created_at`` and ``id``."""
    return row.created_at, row.id


async def count_of(session: AsyncSession, entity: Any, *where: ColumnElement[bool], page: KeysetPage) -> int | None:
    """How many of ``entity``'s rows match ``where`` when ``page.total`` asks for it, else None."""
    if not page.total:
        return None
    return int(await session.scalar(select(func.count()).select_from(entity).where(*where)) or 0)
