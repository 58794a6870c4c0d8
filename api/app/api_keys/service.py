"""API keys: created, listed and revoked by their owner, and checked on every request that
carries one.

A key is ``ipk_`` and 32 random bytes (``secrets.token_urlsafe(32)``, 256 bits). Only its SHA-256
is stored, and a request's key is found by the SHA-256 of what it sent: with that much entropy a
key cannot be guessed or brute-forced from its hash, so a slow password hash (argon2) would add
cost to every request and no safety. This is how GitHub stores its tokens ("Behind GitHub's new
authentication token formats", github.blog, 2021) and what OWASP's Password Storage Cheat Sheet
reserves slow hashes for: low-entropy secrets people choose.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from fastapi import HTTPException, status
from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.api_keys.models import ApiKey
from api.app.auth.service import DEACTIVATED, unauthorized
from api.app.core.db import owned_page, utcnow
from api.app.users.models import User
from contracts.api_keys import DISPLAY_LENGTH, KEY_LENGTH, KEY_PREFIX, Scope

LAST_USED_EVERY = timedelta(minutes=1)
"""``last_used_at`` is written at most this often per key, so using a key does not write a row on
every request."""
REVOKED = "API key has been revoked"
VOIDED = "API key was made before its account was deactivated: make a new one"
EXPIRED = "API key has expired"
INVALID = "Invalid API key"

# Built once: every request made with a key runs it.
_KEY_WITH_OWNER = (
    select(ApiKey, User).join(User, User.id == ApiKey.owner_id).where(ApiKey.key_hash == bindparam("b_hash"))
)


@dataclass(frozen=True)
class KeyGrant:
    """What a request made with a key may do: the key's id and scopes."""

    key_id: uuid.UUID
    scopes: frozenset[Scope]


def is_key(credential: str) -> bool:
    """Whether a credential is meant as an API key (by its prefix); anything else is a login token."""
    return credential.startswith(KEY_PREFIX)


def hash_key(key: str) -> str:
    """Hex SHA-256 of the key's UTF-8 bytes (64 characters)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


async def create_api_key(
    *,
    session: AsyncSession,
    owner: User,
    name: str,
    scopes: list[Scope],
    expires_in_days: int | None,
) -> tuple[ApiKey, str]:
    """A new key of ``owner`` (the row and the key itself, which is not stored); expires
    ``expires_in_days`` days from now, or never when None. Raises 403 when a non-admin asks for
    the admin scope."""
    if Scope.admin in scopes and not owner.is_admin:
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="Only admins can give a key the admin scope")
    key = new_key()
    # PostgreSQL's clock, as for the owner's admin_since and keys_valid_after it is compared with:
    # API hosts' clocks play no part.
    now = func.clock_timestamp()
    row = ApiKey(
        owner_id=owner.id,
        name=name,
        prefix=key[:DISPLAY_LENGTH],
        key_hash=hash_key(key),
        scopes=[s.value for s in Scope if s in scopes],  # each once, in a fixed order
        created_at=now,
        expires_at=now + timedelta(days=expires_in_days) if expires_in_days is not None else None,
    )
    session.add(row)
    await session.commit()
    await session.refresh(row)
    return row, key


async def list_api_keys(*, session: AsyncSession, owner_id: int, skip: int, limit: int) -> tuple[list[ApiKey], int]:
    """A page of the owner's keys, revoked and expired ones included, newest first, and how many there are."""
    return await owned_page(session, ApiKey, owner_id=owner_id, skip=skip, limit=limit)


async def revoke_api_key(*, session: AsyncSession, owner_id: int, key_id: uuid.UUID) -> None:
    """Revokes one of the owner's keys from now on (a key revoked before keeps its time). Raises
    404 when the owner has no such key, so that other people's key ids cannot be probed."""
    key = await session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.owner_id == owner_id))
    if key is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail="API key not found")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    await session.commit()


async def get_api_key(*, session: AsyncSession, key_id: uuid.UUID) -> ApiKey | None:
    """The key row with id ``key_id``, or None."""
    return await session.get(ApiKey, key_id)


class KeyRefused(HTTPException):
    """401 for an API key; ``known``: the key was found (revoked, expired, or its owner
    deactivated), so whoever sent it holds a real key and was not guessing."""

    def __init__(self, detail: str | None = None, *, known: bool) -> None:
        refused = unauthorized() if detail is None else unauthorized(detail)
        super().__init__(status_code=refused.status_code, detail=refused.detail, headers=refused.headers)
        self.known = known


async def authenticate(*, session: AsyncSession, key: str) -> tuple[User, KeyGrant]:
    """The key's owner (detached from ``session`` once it closes) and what the key grants, in one
    round trip, plus one write at most once a minute for ``last_used_at``. Raises KeyRefused (401)
    for an unknown or malformed key, and, ``known``, for a revoked or expired key, for a
    deactivated owner (401 saying so, as for a login token) and for a key made before its owner
    was last deactivated."""
    if len(key) != KEY_LENGTH or not is_key(key):
        raise KeyRefused(INVALID, known=False)
    row = (await session.execute(_KEY_WITH_OWNER, {"b_hash": hash_key(key)})).first()
    if row is None:
        raise KeyRefused(INVALID, known=False)
    api_key, user = row
    now = utcnow()
    if api_key.revoked_at is not None:
        raise KeyRefused(REVOKED, known=True)
    if api_key.expires_at is not None and api_key.expires_at <= now:
        raise KeyRefused(EXPIRED, known=True)
    if not user.is_active:
        raise KeyRefused(DEACTIVATED, known=True)
    if voided_at(api_key, user) is not None:
        raise KeyRefused(VOIDED, known=True)
    if api_key.last_used_at is None or now - api_key.last_used_at >= LAST_USED_EVERY:
        await _mark_used(session=session, key_id=api_key.id, now=now)
    return user, KeyGrant(key_id=api_key.id, scopes=granted_scopes(api_key, user))


def voided_at(api_key: ApiKey, owner: User) -> datetime | None:
    """When ``api_key`` stopped working without being revoked: its owner's deactivation, for a key
    made before it (``User.keys_valid_after``); None for a key that was not voided so."""
    cutoff = owner.keys_valid_after
    return cutoff if cutoff is not None and api_key.created_at < cutoff else None


def granted_scopes(api_key: ApiKey, owner: User) -> frozenset[Scope]:
    """The scopes ``api_key`` grants now: its own, less ``admin`` when it was made before its owner
    was last made an admin (a demoted admin's key stays a user's key through a later promotion).
    Whether the owner is an admin now is checked per request, where the scope is needed."""
    scopes = frozenset(Scope(s) for s in api_key.scopes)
    if Scope.admin in scopes and owner.admin_since is not None and api_key.created_at < owner.admin_since:
        return scopes - {Scope.admin}
    return scopes


def scopes_in_force(api_key: ApiKey, owner: User) -> list[Scope]:
    """The scopes ``api_key`` acts with now, in ``Scope``'s order: ``granted_scopes``, and
    ``admin`` only while its owner is an admin. What its owner's key list and
    ``/v1/api-keys/current`` show."""
    granted = granted_scopes(api_key, owner)
    return [s for s in Scope if s in granted and (s != Scope.admin or owner.is_admin)]


async def _mark_used(*, session: AsyncSession, key_id: uuid.UUID, now: datetime) -> None:
    # Conditional, so that of the requests of one minute (in any API process) one writes.
    await session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - LAST_USED_EVERY),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    await session.commit()
