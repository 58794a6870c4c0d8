"""User accounts: plain functions over a session."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime

from email_validator import EmailNotValidError, validate_email
from fastapi import HTTPException, status
from redis.asyncio import Redis
from sqlalchemy import bindparam, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from api.app.core.config import Settings
from api.app.core.errors import DB_ERRORS, OWNER_GONE
from api.app.core.security import PasswordHasher
from api.app.core.throttle import AttemptThrottle
from api.app.images import service as images_service
from api.app.images.storage import LocalBlobStore
from api.app.users.models import Role, User
from api.app.users.schemas import UserUpdate
from contracts import keys

log = logging.getLogger(__name__)


def normalize_email(email: str) -> str:
    """The form an email is stored and looked up in: as ``EmailStr`` normalises it at sign-up
    (email-validator: Unicode NFC, an internationalised domain in Unicode rather than its
    ``xn--`` form), without surrounding whitespace, in lower case. A login with ``zoe@xn--bcher-kva.de``
    then finds the account registered as it; a string that is no valid address is only
    stripped and lowered (it finds no account)."""
    email = email.strip()
    with contextlib.suppress(EmailNotValidError):
        email = validate_email(email, check_deliverability=False).normalized
    return email.lower()


def check_password_policy(password: str, settings: Settings) -> None:
    if len(password) < settings.password_min_length:
        raise HTTPException(
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"Password must be at least {settings.password_min_length} characters long",
        )
    if len(password) > settings.password_max_length:
        raise HTTPException(
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"Password must be at most {settings.password_max_length} characters long",
        )


# Built once: every authenticated request loads its user, and building a statement costs more
# CPU than running it.
_USER_BY_ID = select(User).where(User.id == bindparam("b_user_id"))
_USERS_PAGE = select(User).order_by(User.id).offset(bindparam("b_skip")).limit(bindparam("b_limit"))
_COUNT_USERS = select(func.count()).select_from(User)
_ACTIVE_ADMINS = select(User.id).where(User.role == Role.admin.value, User.is_active.is_(True))
ADMINS_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended('active-admins', 0))")
"""Taken, to its transaction's end, by whatever demotes, deactivates or deletes an active admin:
such changes run one at a time, and each reads the active admins as the previous one left them.
An advisory lock rather than the admins' rows, which a login reads ``FOR SHARE``: deleting an
admin with a long history held every other admin's login for its whole transaction."""


async def get_user(*, session: AsyncSession, user_id: int) -> User | None:
    return await session.scalar(_USER_BY_ID, {"b_user_id": user_id})


async def get_user_for_login(*, session: AsyncSession, email: str) -> tuple[User | None, datetime]:
    """The account for a login, and the moment (PostgreSQL's clock) its session begins: as it is
    read. ``FOR SHARE`` waits for a password change or deactivation in progress on the row, so
    a login reads either the account before the change (and began before it: its session ends
    with it) or the changed one."""
    row = (
        await session.execute(
            select(User, func.clock_timestamp()).where(User.email == normalize_email(email)).with_for_update(read=True)
        )
    ).one_or_none()
    if row is None:
        return None, datetime.now(UTC)  # no session will begin
    return row[0], row[1]


async def get_user_by_email(*, session: AsyncSession, email: str) -> User | None:
    result = await session.execute(select(User).where(User.email == normalize_email(email)))
    return result.scalar_one_or_none()


async def list_users(*, session: AsyncSession, skip: int, limit: int) -> list[User]:
    return list(await session.scalars(_USERS_PAGE, {"b_skip": skip, "b_limit": limit}))


async def count_users(*, session: AsyncSession) -> int:
    return int(await session.scalar(_COUNT_USERS) or 0)


async def create_user(
    *,
    session: AsyncSession,
    hasher: PasswordHasher,
    email: str,
    password: str,
    name: str = "",
    role: Role = Role.user,
) -> User:
    """Creates a user; 409 when the email is taken (before any password is hashed). The caller
    checks the password policy."""
    if await session.scalar(select(User.id).where(User.email == normalize_email(email))) is not None:
        raise _email_taken()
    # The session is given back to the pool while the password is hashed.
    await session.rollback()
    user = User(
        email=normalize_email(email),
        name=name,
        role=role.value,
        hashed_password=await hasher.hash(password),
        is_active=True,
    )
    session.add(user)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise _email_taken() from None
    await session.refresh(user)
    return user


def _email_taken() -> HTTPException:
    return HTTPException(status_code=status.HTTP_409_CONFLICT, detail="A user with this email already exists")


async def _keep_an_admin(*, session: AsyncSession, actor: User, target: User, action: str) -> None:
    """Refuses ``action`` (demote, deactivate or delete) of an active admin: 409 on oneself; 403
    when the actor is no longer an active admin once ``ADMINS_LOCK`` is held (another admin
    demoted, deactivated or deleted them meanwhile); 409 when another change holds the target
    or ``ADMINS_LOCK`` past the connection's ``core.db.LOCK_TIMEOUT_MS``; 404 when the target was deleted
    meanwhile. The actor stays an active admin, so there always is one, and two admins demoting
    each other at once cannot both succeed. The target's row (read again, locked, so a promotion
    or reactivation since the caller's read counts) and the lock are held to the caller's commit."""
    if target.id == actor.id:
        # Only admins change others' accounts, so the actor is (or was, a moment ago) an admin.
        raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail=f"You cannot {action} yourself.")
    current = await session.scalar(
        select(User)
        .where(User.id == target.id)
        # FOR NO KEY UPDATE: waits for a promotion or reactivation in progress, not for the
        # user's own uploads (which hold the row FOR KEY SHARE).
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )
    removes_an_admin = current is not None and current.is_admin and current.is_active
    if removes_an_admin:
        await session.execute(ADMINS_LOCK)
    if current is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail="User not found")
    if not removes_an_admin:
        return
    # Read after the lock is granted: READ COMMITTED shows what the previous holder committed.
    admins = set(await session.scalars(_ACTIVE_ADMINS))
    if actor.id not in admins:
        # Demoted, deactivated or deleted by another admin while this waited for the lock.
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="You are no longer an active admin.")


async def update_user(*, session: AsyncSession, actor: User, user: User, changes: UserUpdate) -> User:
    """Applies the fields ``changes`` sets; making a user an admin sets ``admin_since`` (their
    earlier keys' admin scope stays void). Raises 409 when it would demote or deactivate the
    acting admin, 403 when another admin took the actor's rights meanwhile (``_keep_an_admin``)."""
    if changes.role is not None and changes.role != Role.admin:
        await _keep_an_admin(session=session, actor=actor, target=user, action="demote")
    if changes.is_active is False:
        await _keep_an_admin(session=session, actor=actor, target=user, action="deactivate")
    if changes.role == Role.admin and user.role != Role.admin.value:
        user.admin_since = func.clock_timestamp()  # PostgreSQL's clock, as its keys' created_at
    for field, value in changes.model_dump(exclude_unset=True).items():
        if value is not None:
            setattr(user, field, value.value if isinstance(value, Role) else value)
    if changes.is_active is False:
        # Reactivating the account later brings none of its sessions or API keys back.
        end_sessions(user)
        user.keys_valid_after = func.clock_timestamp()
    try:
        await session.commit()
    except StaleDataError:
        # Deleted by another admin while this waited for the row.
        await session.rollback()
        raise HTTPException(status_code=404, detail="User not found") from None
    await session.refresh(user)
    return user


def end_sessions(user: User) -> None:
    """Refuses every login session of ``user`` that began before this write, and none that
    begins after: the moment is PostgreSQL's ``clock_timestamp()`` when the row is written (it
    stays locked to the commit), the clock a login reads when it reads the account
    (``get_user_for_login``), so API hosts' clocks play no part. The caller commits."""
    user.sessions_valid_after = func.clock_timestamp()


async def set_password(*, session: AsyncSession, hasher: PasswordHasher, user: User, password: str) -> None:
    """Sets ``password`` and signs the user out of every session (a thief holding one loses it)."""
    session.add(user)  # the signed-in user comes detached from its own lookup
    user.hashed_password = await hasher.hash(password)
    end_sessions(user)
    try:
        await session.commit()
    except StaleDataError:
        # The account was deleted while this waited for its row.
        await session.rollback()
        raise HTTPException(status_code=401, detail=OWNER_GONE) from None


async def change_password(
    *,
    session: AsyncSession,
    hasher: PasswordHasher,
    throttle: AttemptThrottle,
    settings: Settings,
    user: User,
    current: str,
    new: str,
    client: str,
) -> None:
    """Sets ``new`` after checking ``current``, throttled as logins are (a stolen token must not
    become a password oracle). Raises 400 when ``current`` is wrong (an oversized one is wrong
    without being hashed), 422 when ``new`` breaks the password policy, 429 past the limits."""
    async with throttle.attempt(action="password", account=str(user.id), client=client) as attempt:
        ok = False
        if len(current) <= settings.password_max_length:
            ok, _ = await hasher.verify(current, user.hashed_password)
        if not ok:
            raise HTTPException(status_code=400, detail="Current password is incorrect")
        attempt.succeeded = True
    check_password_policy(new, settings)
    await set_password(session=session, hasher=hasher, user=user, password=new)


async def delete_user(*, session: AsyncSession, store: LocalBlobStore, actor: User, user: User) -> None:
    """Deletes the user with everything they own (one transaction: their uploads a few thousand
    per statement, ``images.service.delete_owned_images``, then the account), then the files of
    their uploads that no other upload references (``images.service.delete_blobs_in_chunks``: a
    hundred per transaction, each under its blob lock, so a history of any size can go). Those
    files are queued for deletion in the account's transaction (``images.service.queue_blob_deletions``):
    what that step could not delete (the database or the disk failing, the process stopped) is
    deleted later by ``images.service.retry_blob_deletions``; the account is deleted all the same. Raises 409 for the acting admin, 403 when the
    actor stopped being an active admin meanwhile."""
    await _keep_an_admin(session=session, actor=actor, target=user, action="delete")
    # The row first: an upload of theirs in progress (it holds the row FOR KEY SHARE, then its
    # blob lock) commits before this reads their files, and a later one waits, then finds them gone.
    await session.execute(select(User.id).where(User.id == user.id).with_for_update())
    blobs = await images_service.owned_blobs(session=session, owner_id=user.id)
    await images_service.delete_owned_images(session=session, owner_id=user.id)
    await images_service.queue_blob_deletions(session=session, sha256s=blobs)
    await session.delete(user)
    await session.commit()
    # Another user's upload of the same content, committed by now or waiting for the blob's lock,
    # keeps the file: each is counted again under its lock.
    try:
        await images_service.delete_blobs_in_chunks(session=session, store=store, sha256s=blobs, queued=True)
    except (*DB_ERRORS, OSError) as exc:
        # The account is gone, as answered; the files not reached stay queued for the next retry.
        await session.rollback()
        log.warning("user %d deleted; some of their files are left for the next retry: %r", user.id, exc)


FORGET_BATCH = 500
"""Keys unlinked per command when a deleted user's cached data is forgotten."""


async def forget_cached_data(*, redis: Redis, user_id: int) -> int:
    """Deletes the Redis keys holding what the user sent or was answered (``keys.owned_key_patterns``:
    cached answers, explanations), which would otherwise outlive the account by their TTLs (a day,
    a week); how many. SCAN walks the keyspace in steps, never blocking Redis; raises Redis's errors.
    Sets ``keys.deleted_owner_key`` first: an answer or explanation still being computed for them
    is not cached after the scan passed."""
    await redis.set(keys.deleted_owner_key(user_id), "1", ex=keys.DELETED_OWNER_TTL)
    forgotten = 0
    for pattern in keys.owned_key_patterns(user_id):
        batch: list[bytes] = []
        async for key in redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= FORGET_BATCH:
                forgotten += await redis.unlink(*batch)
                batch = []
        if batch:
            forgotten += await redis.unlink(*batch)
    return forgotten


async def ensure_admin(*, session: AsyncSession, hasher: PasswordHasher, email: str, password: str) -> bool:
    """Creates the first admin when missing; True when it was created."""
    if await get_user_by_email(session=session, email=email) is not None:
        return False
    try:
        await create_user(
            session=session,
            hasher=hasher,
            email=email,
            password=password,
            name="Administrator",
            role=Role.admin,
        )
    except HTTPException:
        return False  # created concurrently by another process
    return True
