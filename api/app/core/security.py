"""Password hashing (argon2id through passlib) and access tokens (HS256 through python-jose)."""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from anyio import CapacityLimiter, to_thread
from jose import JWTError, jwt
from passlib.context import CryptContext

from api.app.core.config import Settings
from api.app.core.fields import INT32_MAX

JTI = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""A token id as this portal issues them, within the revocations table's key length."""
ALGORITHM = "HS256"


class PasswordHasher:
    """argon2id with the configured cost, hashed in worker threads off the event loop, at most
    PASSWORD_HASH_THREADS at a time: in the shared thread pool a burst of logins ran up to 40
    hashes at once and starved the event loop, so every other request waited for the burst."""

    def __init__(self, settings: Settings) -> None:
        self.context = CryptContext(
            schemes=["argon2"],
            deprecated="auto",
            argon2__type="ID",
            argon2__memory_cost=settings.argon2_memory_kib,
            argon2__rounds=settings.argon2_time_cost,
            argon2__parallelism=settings.argon2_parallelism,
        )
        self.limiter = CapacityLimiter(settings.password_hash_threads)
        # Unknown emails are checked against this so that they cost as much as known ones.
        self.dummy_hash = self.context.hash(secrets.token_urlsafe(16))

    def hash_sync(self, password: str) -> str:
        return self.context.hash(password)

    async def hash(self, password: str) -> str:
        return await to_thread.run_sync(self.context.hash, password, limiter=self.limiter)

    async def verify(self, password: str, hashed: str | None) -> tuple[bool, str | None]:
        """(matches, new hash when the stored one used other parameters)."""
        if hashed is None:
            await to_thread.run_sync(self.context.verify, password, self.dummy_hash, limiter=self.limiter)
            return False, None
        return await to_thread.run_sync(self.context.verify_and_update, password, hashed, limiter=self.limiter)


@dataclass(frozen=True)
class TokenClaims:
    user_id: int
    jti: str
    expires_at: datetime
    sid: str = ""
    """The login session the token belongs to (OpenID Connect's ``sid`` claim): a login starts
    one, each refresh carries it on, and logging out revokes it with every token it issued. A
    token without one is its own session (its ``jti``)."""
    auth_time: datetime | None = None
    """When the password was given for this session (OpenID Connect's ``auth_time``, to the
    microsecond, where ``iat`` and ``exp`` carry whole seconds); refreshes keep it. None: the
    token's own issue time."""

    def __post_init__(self) -> None:
        if not self.sid:
            object.__setattr__(self, "sid", self.jti)


class TokenError(Exception):
    """The token is malformed, tampered with, expired or signed another way."""


def create_access_token(
    user_id: int, settings: Settings, sid: str | None = None, auth_time: datetime | None = None
) -> tuple[str, TokenClaims]:
    """A token valid for ACCESS_TOKEN_EXPIRE_MINUTES from now, but never past SESSION_MAX_HOURS
    after ``auth_time``, in login session ``sid`` (a new session, authenticated now, when None).

    ``auth_time`` is written to the microsecond (RFC 7519 numeric dates may have a fraction), as
    PostgreSQL's clock gives it at login, so that ending a user's sessions
    (``users.sessions_valid_after``) also ends one that began earlier in the same second, and
    never one that begins after it."""
    auth_time = auth_time or datetime.now(UTC)
    now = datetime.now(UTC).replace(microsecond=0)
    expires = min(
        now + timedelta(minutes=settings.access_token_expire_minutes),
        (auth_time + timedelta(hours=settings.session_max_hours)).replace(microsecond=0),
    )
    jti = uuid.uuid4().hex
    sid = sid or jti
    payload = {
        "sub": str(user_id),
        "iat": now,
        "exp": expires,
        "jti": jti,
        "sid": sid,
        "auth_time": round(auth_time.timestamp(), 6),
    }
    token = jwt.encode(payload, settings.secret_key, algorithm=ALGORITHM)
    return token, TokenClaims(user_id=user_id, jti=jti, expires_at=expires, sid=sid, auth_time=auth_time)


def decode_access_token(token: str, settings: Settings) -> TokenClaims:
    try:
        header = jwt.get_unverified_header(token)
        # Only HS256 is ever accepted: no "none", no algorithm confusion.
        if header.get("alg") != ALGORITHM:
            raise TokenError("unexpected signing algorithm")
        payload = jwt.decode(
            token,
            settings.secret_key,
            algorithms=[ALGORITHM],
            options={"require_exp": True, "require_iat": True, "require_sub": True, "require_jti": True},
        )
        sub, jti = str(payload["sub"]), str(payload["jti"])
        sid = str(payload.get("sid") or jti)
        if not (sub.isascii() and sub.isdigit() and JTI.fullmatch(jti) and JTI.fullmatch(sid)):
            raise TokenError("malformed subject or token id")
        user_id = int(sub)
        if not 1 <= user_id <= INT32_MAX:
            raise TokenError("subject or token id out of range")
        return TokenClaims(
            user_id=user_id,
            jti=jti,
            expires_at=datetime.fromtimestamp(int(payload["exp"]), UTC),
            sid=sid,
            auth_time=datetime.fromtimestamp(round(float(payload.get("auth_time") or payload["iat"]), 6), UTC),
        )
    except (JWTError, ValueError, KeyError, TypeError, OverflowError, OSError) as exc:
        raise TokenError(str(exc)) from exc


class VerifiedTokens:
    """The claims of tokens this process has already verified, so that a client's every request
    does not check the same signature again.

    A token's claims never change, so only its expiry is checked again on each use; a token that
    failed verification is not kept. Revocation and the user's state are not cached: the caller
    checks those on every request. At most ``size`` tokens are kept, the oldest dropped first.
    """

    def __init__(self, settings: Settings, size: int = 10_000) -> None:
        self.settings = settings
        self.size = size
        self._claims: dict[str, TokenClaims] = {}

    def __len__(self) -> int:
        return len(self._claims)

    def decode(self, token: str) -> TokenClaims:
        claims = self._claims.get(token)
        if claims is None:
            claims = decode_access_token(token, self.settings)
            if len(self._claims) >= self.size:
                del self._claims[next(iter(self._claims))]
            self._claims[token] = claims
        # As python-jose decides: a token is expired once the current second is past "exp".
        if claims.expires_at.timestamp() < int(datetime.now(UTC).timestamp()):
            del self._claims[token]
            raise TokenError("Signature has expired.")
        return claims
