"""Login with throttling, and token revocation."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from fastapi import HTTPException, status
from sqlalchemy import CursorResult, bindparam, delete, exists, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from api.app.auth.models import RevokedToken
from api.app.core.config import Settings
from api.app.core.db import utcnow
from api.app.core.driver import DriverStatement, driver_connection
from api.app.core.fields import storable
from api.app.core.security import PasswordHasher, TokenClaims, create_access_token
from api.app.core.throttle import AttemptThrottle
from api.app.users import service as users_service
from api.app.users.models import User
from api.app.users.service import normalize_email

LOGIN_FAILED = "Incorrect email or password"
CREDENTIALS_ERROR = "Could not validate credentials"

# Compiled once and sent to the driver (``core.driver``): every authenticated request runs it.
# (attribute, column) of each of the user's columns, to build the ORM object from the row.
_USER_COLUMNS = [(attribute.key, attribute.columns[0].name) for attribute in User.__mapper__.column_attrs]
_USER_BY_TOKEN = DriverStatement(
    select(
        *User.__table__.columns,
        exists()
        .where(or_(RevokedToken.jti == bindparam("b_jti"), RevokedToken.jti == bindparam("b_sid")))
        .label("revoked"),
    ).where(User.id == bindparam("b_user_id"))
)


DEACTIVATED = "This account is deactivated: an administrator can reactivate it"
"""The 401 detail for a valid token or API key whose account an admin deactivated: its holder is
told why it stopped working, not that it expired or is wrong."""


def unauthorized(detail: str = CREDENTIALS_ERROR) -> HTTPException:
    """401 with the ``WWW-Authenticate: Bearer`` challenge RFC 6750 asks for."""
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": "Bearer"},
    )


async def get_token_user(*, engine: AsyncEngine, claims: TokenClaims) -> tuple[User | None, bool]:
    """A token's user (None when deleted) and whether the token or its login session was revoked,
    in one statement outside any transaction. The user comes detached, with every column loaded:
    a route that changes it adds it to its own session."""
    params = {"b_user_id": claims.user_id, "b_jti": claims.jti, "b_sid": claims.sid}
    async with driver_connection(engine) as connection:
        row = await _USER_BY_TOKEN.fetchrow(connection, params)
    if row is None:
        return None, False
    user = User(**{attribute: row[column] for attribute, column in _USER_COLUMNS})
    make_transient_to_detached(user)
    return user, bool(row["revoked"])


async def login(
    *,
    session: AsyncSession,
    throttle: AttemptThrottle,
    hasher: PasswordHasher,
    settings: Settings,
    email: str,
    password: str,
    client: str,
) -> str:
    """Returns an access token, or raises 401 (bad credentials), 403 (inactive) or 429 (too many
    attempts, counted before the password is checked)."""
    account = normalize_email(email)
    async with throttle.attempt(action="login", account=account, client=client) as attempt:
        # No account has an oversized password or a NUL in its email: refuse without hashing work.
        if len(password) > settings.password_max_length or not storable(email):
            raise unauthorized(LOGIN_FAILED)
        # The session begins as the account is read: a password change or a deactivation that
        # commits while this login checks the password it read then ends this session too.
        user, began = await users_service.get_user_for_login(session=session, email=email)
        # The connection goes back to the pool while the password is checked: in a burst of logins,
        # those waiting their turn to hash would otherwise hold every connection.
        await session.commit()
        ok, new_hash = await hasher.verify(password, user.hashed_password if user else None)
        if user is None or not ok:
            raise unauthorized(LOGIN_FAILED)
        attempt.succeeded = True
    if not user.is_active:
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="Account is deactivated")
    if new_hash is not None and user.hashed_password is not None:
        # Only over the hash that was checked: a password changed meanwhile is not undone.
        await session.execute(
            update(User)
            .where(User.id == user.id, User.hashed_password == user.hashed_password)
            .values(hashed_password=new_hash)
            .execution_options(synchronize_session=False)
        )
        await session.commit()
    token, _claims = create_access_token(user.id, settings, auth_time=began)
    return token


def refresh(*, settings: Settings, claims: TokenClaims) -> str:
    """A new token in the same login session, valid for ACCESS_TOKEN_EXPIRE_MINUTES from now:
    a client that calls this while it is used keeps its session, one left unused for that long
    loses it (expiry after inactivity, as OWASP's session management guide recommends). The
    tokens issued before stay valid until they expire, so two tabs of one session never log
    each other out; logging out revokes them all. The new token never outlives SESSION_MAX_HOURS
    after the login."""
    token, _claims = create_access_token(claims.user_id, settings, sid=claims.sid, auth_time=claims.auth_time)
    return token


async def revoke(*, session: AsyncSession, settings: Settings, claims: TokenClaims) -> None:
    """Refuses the token's login session, and so every token issued in it, from now until the
    last of them expires (none was issued later than now)."""
    last_expiry = max(claims.expires_at, utcnow() + timedelta(minutes=settings.access_token_expire_minutes))
    revocation = {"jti": claims.sid, "expires_at": last_expiry}
    statement = insert(RevokedToken).values(revocation)
    await session.execute(
        statement.on_conflict_do_update(index_elements=[RevokedToken.jti], set_={"expires_at": last_expiry})
    )
    await session.commit()


async def forget_expired_revocations(*, session: AsyncSession) -> int:
    """Deletes the revocations of tokens that have expired anyway; how many."""
    # An hour late: each API host checks expiry by its own clock, and the clocks may disagree.
    expired = delete(RevokedToken).where(RevokedToken.expires_at < utcnow() - timedelta(hours=1))
    deleted = cast(CursorResult[Any], await session.execute(expired)).rowcount
    await session.commit()
    return int(deleted or 0)
