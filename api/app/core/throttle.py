"""Attempt throttling for logins, password changes, API keys and sign-ups: failures counted in Redis with the
``limits`` library's fixed windows, and one attempt at a time per account (redis-py's lock).

Taking turns per account is what makes the count exact: ten parallel guesses cannot all be
checked against the same count while the first ones are still being hashed, and a burst of
correct logins for one account is served in turn instead of refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, status
from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter
from redis.asyncio import Redis
from redis.exceptions import LockError

from api.app.core.config import Settings
from api.app.core.errors import is_outage

# An attempt holds its account's turn for one password check; a crashed process's turn lapses.
TURN_SECONDS = 30.0
# How long an attempt waits for its turn: a burst of logins for one account is served in turn.
WAIT_SECONDS = 60.0


@dataclass
class Attempt:
    succeeded: bool = False


def unjudged(exc: BaseException) -> bool:
    """Whether an attempt ended by ``exc`` was never judged: PostgreSQL or Redis could not be
    reached, or the portal failed otherwise (a 5xx), before the credential was checked. Such an
    attempt is no failed guess: counting it would lock a script out, every key of its address
    with it, for retrying through a database restart."""
    if isinstance(exc, HTTPException):
        return exc.status_code >= 500
    return is_outage(exc)


def _too_many(detail: str, retry_after: float) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_429_TOO_MANY_REQUESTS,
        detail=detail,
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


class AttemptThrottle:
    """At most ``LOGIN_MAX_FAILURES_PER_EMAIL`` failed attempts per account and
    ``LOGIN_MAX_FAILURES_PER_CLIENT`` per client address within ``LOGIN_WINDOW_SECONDS``; a success
    clears the account's count."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.redis = redis
        # On the API's own connection pool, whose commands retry once on a fresh connection: a
        # pool of the library's own would answer the first login after a Redis restart with 503.
        shared: dict[str, Any] = {"connection_pool": redis.connection_pool}  # typed str by the library
        self.storage = RedisStorage(
            settings.redis_url.replace("redis://", "async+redis://", 1),
            implementation="redispy",
            key_prefix="throttle",
            **shared,
        )
        self.limiter = FixedWindowRateLimiter(self.storage)
        window = settings.login_window_seconds
        self.per_account = RateLimitItemPerSecond(settings.login_max_failures_per_email, window)
        self.per_client = RateLimitItemPerSecond(settings.login_max_failures_per_client, window)
        self.signups_per_client = RateLimitItemPerSecond(settings.signup_max_per_client, window)
        self._local: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def _local_turn(self, name: str) -> AsyncIterator[None]:
        """Attempts of this process take turns on an asyncio lock first, so that at most one per
        process polls the shared lock in Redis."""
        lock, users = self._local.get(name, (asyncio.Lock(), 0))
        self._local[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._local[name]
            if users == 1:
                del self._local[name]
            else:
                self._local[name] = (lock, users - 1)

    @asynccontextmanager
    async def attempt(self, *, action: str, account: str, client: str) -> AsyncIterator[Attempt]:
        """One attempt of ``action`` (``login``, ``password``) on ``account`` from ``client``, in
        the account's turn. The caller sets ``succeeded`` once the password matched; otherwise
        (an exception included) the attempt counts as a failure, unless it was never judged
        (``unjudged``: PostgreSQL down, a 5xx). Raises 429 with Retry-After
        (seconds) when either count is full, or when the turn does not come within 60 s."""
        name = f"throttle:turn:{action}:{account}"
        async with self._local_turn(name):
            turn = self.redis.lock(name, timeout=TURN_SECONDS, blocking_timeout=WAIT_SECONDS, sleep=0.05)
            if not await turn.acquire():
                raise _too_many("Too many attempts at once; try again later", WAIT_SECONDS)
            try:
                counts = ((self.per_account, f"account:{account}"), (self.per_client, f"client:{client}"))
                for item, key in counts:
                    if not await self.limiter.test(item, action, key):
                        stats = await self.limiter.get_window_stats(item, action, key)
                        raise _too_many("Too many failed attempts; try again later", stats.reset_time - time.time())
                attempt = Attempt()
                try:
                    yield attempt
                except BaseException as exc:
                    if not attempt.succeeded and not unjudged(exc):
                        for item, key in counts:
                            await self.limiter.hit(item, action, key)
                    raise
                if attempt.succeeded:
                    await self.limiter.clear(self.per_account, action, f"account:{account}")
                else:
                    for item, key in counts:
                        await self.limiter.hit(item, action, key)
            finally:
                with contextlib.suppress(LockError):  # the turn lapsed during a very slow check
                    await turn.release()

    async def count_signup(self, *, client: str) -> None:
        """Counts a sign-up from ``client``, accepted or refused: each one costs a password hash
        and says whether an email has an account, so neither may be had without limit. Raises 429
        with Retry-After (seconds) beyond ``SIGNUP_MAX_PER_CLIENT`` within the window."""
        key = f"client:{client}"
        if not await self.limiter.hit(self.signups_per_client, "signup", key):
            stats = await self.limiter.get_window_stats(self.signups_per_client, "signup", key)
            raise _too_many("Too many sign-ups from this address; try again later", stats.reset_time - time.time())

    @asynccontextmanager
    async def client_attempt(self, *, action: str, client: str) -> AsyncIterator[Attempt]:
        """One attempt of ``action`` (``api_key``) from ``client``, counted against the per-client
        limit only and without taking turns: there is no account to count against, and the check
        is one indexed lookup, not a password hash, so parallel guesses gain next to nothing
        (nor could they guess a 256-bit key). As :meth:`attempt`: the caller sets ``succeeded``,
        anything else but an attempt never judged (``unjudged``) counts as a failure; raises 429 with Retry-After (seconds) when the count
        is full."""
        key = f"client:{client}"
        if not await self.limiter.test(self.per_client, action, key):
            stats = await self.limiter.get_window_stats(self.per_client, action, key)
            raise _too_many("Too many failed attempts; try again later", stats.reset_time - time.time())
        attempt = Attempt()
        try:
            yield attempt
        except BaseException as exc:
            if not attempt.succeeded and not unjudged(exc):
                await self.limiter.hit(self.per_client, action, key)
            raise
        if not attempt.succeeded:
            await self.limiter.hit(self.per_client, action, key)
