"""Login with throttling, and token revocation."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from fastapi import HTTPException, status
from sqlalchemy import CursorResult, bindparam, delete, exists, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.auth.models import RevokedToken
from api.app.core.config import Settings
from api.app.core.db import utcnow
from api.app.core.fields import storable
from api.app.core.security import PasswordHasher, TokenClaims, create_access_token
from api.app.core.throttle import AttemptThrottle
from api.app.users import service as users_service
from api.app.users.models import User
from api.app.users.service import normalize_email

LOGIN_FAILED = "Incorrect email or password"
CREDENTIALS_ERROR = "Could not validate credentials"

# Built once: every authenticated request runs it, and building a statement costs more CPU than
# running it.
_USER_BY_TOKEN = select(User, exists().where(RevokedToken.jti == bindparam("b_jti"))).where(
    User.id == bindparam("b_user_id")
)


def unauthorized(detail: str = CREDENTIALS_ERROR) -> HTTPException:
    """401 with the ``WWW-Authenticate: Bearer`` challenge RFC 6750 asks for."""
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": "Bearer"},
    )


async def get_token_user(*, session: AsyncSession, user_id: int, jti: str) -> tuple[User | None, bool]:
    """A token's user (None when deleted) and whether the token was revoked, in one round trip."""
    row = (await session.execute(_USER_BY_TOKEN, {"b_user_id": user_id, "b_jti": jti})).first()
    return (row[0], bool(row[1])) if row is not None else (None, False)


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
        user = await users_service.get_user_by_email(session=session, email=email)
        # The connection goes back to the pool while the password is checked: in a burst of logins,
        # those waiting their turn to hash would otherwise hold every connection.
        await session.commit()
        ok, new_hash = await hasher.verify(password, user.hashed_password if user else None)
        if user is None or not ok:
            raise unauthorized(LOGIN_FAILED)
        attempt.succeeded = True
    if not user.is_active:
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="Account is deactivated")
    if new_hash is not None:
        user.hashed_password = new_hash
        await session.commit()
    token, _claims = create_access_token(user.id, settings)
    return token


async def revoke(*, session: AsyncSession, claims: TokenClaims) -> None:
    """Refuses the token from now until it expires."""
    revocation = {"jti": claims.jti, "expires_at": claims.expires_at}
    await session.execute(insert(RevokedToken).values(revocation).on_conflict_do_nothing())
    await session.commit()


async def forget_expired_revocations(*, session: AsyncSession) -> int:
    """Deletes the revocations of tokens that have expired anyway; how many."""
    # An hour late: each API host checks expiry by its own clock, and the clocks may disagree.
    expired = delete(RevokedToken).where(RevokedToken.expires_at < utcnow() - timedelta(hours=1))
    deleted = cast(CursorResult[Any], await session.execute(expired)).rowcount
    await session.commit()
    return int(deleted or 0)
