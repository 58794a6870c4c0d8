"""Attempt throttling for logins, password changes, API keys and sign-ups: failures counted in Redis with the
``limits`` library's fixed windows, and one attempt at a time per account (redis-py's lock).

Taking turns per account is what makes the account's count exact: ten parallel guesses cannot
all be checked against the same count while the first ones are still being hashed, and a burst
of correct logins for one account is served in turn instead of refused. Attempts on different
accounts from one address do not take turns, so each takes its place in the address's count
before its password is checked (``hit`` first, an atomic INCR) and gives it back unless it fails.
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
from limits import RateLimitItem, RateLimitItemPerSecond
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

    async def _refusal(self, item: RateLimitItem, action: str, key: str) -> HTTPException:
        stats = await self.limiter.get_window_stats(item, action, key)
        return _too_many("Too many failed attempts; try again later", stats.reset_time - time.time())

    async def _give_back(self, item: RateLimitItem, action: str, key: str) -> None:
        """Returns the place that ``hit`` took in ``key``'s count for an attempt that does not
        count (it succeeded, was never judged, or was refused)."""
        name = item.key_for(action, key)
        if await self.storage.incr(name, item.get_expiry(), amount=-1) < 0:
            # The window ended since the place was taken, and the place with it: the next window
            # must not start below zero (one more failure than the limit).
            await self.storage.incr(name, item.get_expiry(), amount=1)

    @asynccontextmanager
    async def attempt(self, *, action: str, account: str, client: str) -> AsyncIterator[Attempt]:
        """One attempt of ``action`` (``login``, ``password``) on ``account`` from ``client``, in
        the account's turn. The caller sets ``succeeded`` once the password matched; otherwise
        (an exception included) the attempt counts as a failure, unless it was never judged
        (``unjudged``: PostgreSQL down, a 5xx). Raises 429 with Retry-After
        (seconds) when either count is full, or when the turn does not come within 60 s."""
        name = f"throttle:turn:{action}:{account}"
        per_account, per_client = f"account:{account}", f"client:{client}"
        async with self._local_turn(name):
            turn = self.redis.lock(name, timeout=TURN_SECONDS, blocking_timeout=WAIT_SECONDS, sleep=0.05)
            if not await turn.acquire():
                raise _too_many("Too many attempts at once; try again later", WAIT_SECONDS)
            try:
                # The account's count is exact in its turn; the address's is shared with attempts
                # on other accounts running now, so each takes its place there first (one INCR)
                # and gives it back unless it fails: no more passwords are checked than it allows.
                if not await self.limiter.test(self.per_account, action, per_account):
                    raise await self._refusal(self.per_account, action, per_account)
                if not await self.limiter.hit(self.per_client, action, per_client):
                    await self._give_back(self.per_client, action, per_client)
                    raise await self._refusal(self.per_client, action, per_client)
                attempt = Attempt()
                failed = True
                try:
                    yield attempt
                    failed = not attempt.succeeded
                except BaseException as exc:
                    failed = not attempt.succeeded and not unjudged(exc)
                    raise
                finally:
                    if failed:
                        await self.limiter.hit(self.per_account, action, per_account)
                    else:
                        await self._give_back(self.per_client, action, per_client)
                if attempt.succeeded:
                    await self.limiter.clear(self.per_account, action, per_account)
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
        anything else but an attempt never judged (``unjudged``) counts as a failure; raises 429
        with Retry-After (seconds) when the count is full, and in place of the failure's own error
        for a failure counted past the limit (parallel failures that all found the count open)."""
        key = f"client:{client}"
        if not await self.limiter.test(self.per_client, action, key):
            raise await self._refusal(self.per_client, action, key)
        # Counted once judged, not reserved first as a password attempt's place is: a valid key is
        # the common case, and a script's parallel requests must not hold each other's places.
        # INCR numbers the failures, so exactly the limit's worth are answered as such.
        attempt = Attempt()
        try:
            yield attempt
        except BaseException as exc:
            if attempt.succeeded or unjudged(exc):
                raise
            if not await self.limiter.hit(self.per_client, action, key):
                raise await self._refusal(self.per_client, action, key) from None
            raise
        if not attempt.succeeded and not await self.limiter.hit(self.per_client, action, key):
            raise await self._refusal(self.per_client, action, key)
