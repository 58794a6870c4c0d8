"""Attempt throttling for logins, password changes, API keys and sign-ups: failures counted in Redis with the
``limits`` library's fixed windows, and one attempt at a time per account (redis-py's lock).

Taking turns per account is what makes the account's count exact: ten parallel guesses cannot
all be checked against the same count while the first ones are still being hashed, and a burst
of correct logins for one account is served in turn instead of refused. Attempts on different
accounts from one address do not take turns: each is admitted only while the address's failures
plus its attempts in progress stay below the limit. Attempts in progress are kept apart from the
failures, in a sorted set per address whose members expire at their deadline, so an attempt whose
process died holds its place for at most ``TURN_SECONDS``, and a correct login never counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
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
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from api.app.core.config import Settings
from api.app.core.errors import is_outage
from contracts.streams import REDIS_ERRORS

# An attempt holds its account's turn for one password check; a crashed process's turn lapses.
TURN_SECONDS = 30.0
# How long an attempt waits for its turn: a burst of logins for one account is served in turn.
WAIT_SECONDS = 60.0
# How often an attempt asks again for a place among its address's attempts in progress.
POLL_SECONDS = 0.05
# Retry-After when the address's attempts in progress stayed full: places free as checks end.
BUSY_RETRY_SECONDS = 5
KEY_PREFIX = "throttle"

# Admits one attempt from an address. KEYS: the address's attempts in progress (a sorted set of
# attempt ids by deadline, in ms of Redis's clock), its failure count (the ``limits`` counter).
# ARGV: the attempt id, the limit, the deadline from now (ms). Returns 1 (admitted), 0 (attempts
# in progress fill what the failures leave) or -1 (the failures alone reach the limit). Atomic, so
# parallel attempts on different accounts cannot all find the last place free.
_ADMIT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local failures = tonumber(redis.call('GET', KEYS[2]) or '0')
local limit = tonumber(ARGV[2])
if failures >= limit then
    return -1
end
if failures + redis.call('ZCARD', KEYS[1]) >= limit then
    return 0
end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now_ms + ttl, ARGV[1])
-- Every member has the same time to live: the newest one's deadline is the set's.
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""


@dataclass
class Attempt:
    succeeded: bool = False


def unjudged(exc: BaseException) -> bool:
    """Whether an attempt ended by ``exc`` was never judged: PostgreSQL or Redis could not be
    reached, or the portal failed otherwise (a 5xx), before the credential was checked. Such an
    attempt is no failed guess: counting it would lock a script out, every key of its address
    with it, for retrying through a database restart. A cancelled attempt (the server shutting
    down, answered 503) was never judged either: its client is told nothing of the credential."""
    if isinstance(exc, asyncio.CancelledError):
        return True
    if isinstance(exc, HTTPException):
        return exc.status_code >= 500
    return is_outage(exc)


def _running_key(action: str, client: str) -> str:
    """The sorted set of ``client``'s attempts of ``action`` in progress, by deadline."""
    return f"{KEY_PREFIX}:running:{action}:client:{client}"


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
            key_prefix=KEY_PREFIX,
            **shared,
        )
        self.limiter = FixedWindowRateLimiter(self.storage)
        window = settings.login_window_seconds
        self.per_account = RateLimitItemPerSecond(settings.login_max_failures_per_email, window)
        self.per_client = RateLimitItemPerSecond(settings.login_max_failures_per_client, window)
        self.signups_per_client = RateLimitItemPerSecond(settings.signup_max_per_client, window)
        self._local: dict[str, tuple[asyncio.Lock, int]] = {}
        self._admit = redis.register_script(_ADMIT)

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

    async def _admit_from(self, *, action: str, client: str, attempt_id: str, until: float, turn: Lock) -> None:
        """Takes a place for ``attempt_id`` among ``client``'s attempts in progress, polling until
        ``until`` (``time.monotonic``) while they are full, and keeping the account's ``turn`` meanwhile.
        Raises 429 with Retry-After: the window's end when the address's failures alone reach the
        limit, a few seconds when its attempts in progress stayed full."""
        failures = f"{KEY_PREFIX}:{self.per_client.key_for(action, f'client:{client}')}"
        running = _running_key(action, client)
        limit, ttl_ms = self.per_client.amount, int(TURN_SECONDS * 1000)
        while True:
            admitted = await self._admit(keys=[running, failures], args=[attempt_id, limit, ttl_ms])
            if admitted == 1:
                return
            if admitted == -1:
                raise await self._refusal(self.per_client, action, f"client:{client}")
            if time.monotonic() >= until:
                raise _too_many("Too many attempts at once; try again in a few seconds", BUSY_RETRY_SECONDS)
            await asyncio.sleep(POLL_SECONDS)
            # The wait may outlast the turn's own timeout; the account stays ours until checked.
            await turn.reacquire()

    @asynccontextmanager
    async def attempt(self, *, action: str, account: str, client: str) -> AsyncIterator[Attempt]:
        """One attempt of ``action`` (``login``, ``password``) on ``account`` from ``client``, in
        the account's turn and in a place among the address's attempts in progress. The caller sets
        ``succeeded`` once the password matched; otherwise (an exception included) the attempt
        counts as a failure, unless it was never judged (``unjudged``: PostgreSQL down, a 5xx, a
        cancellation). Raises 429 with Retry-After (seconds) when either failure count is full, or
        when the turn and a place do not come within 60 s."""
        name = f"{KEY_PREFIX}:turn:{action}:{account}"
        per_account, per_client = f"account:{account}", f"client:{client}"
        until = time.monotonic() + WAIT_SECONDS
        async with self._local_turn(name):
            turn = self.redis.lock(name, timeout=TURN_SECONDS, blocking_timeout=WAIT_SECONDS, sleep=0.05)
            if not await turn.acquire():
                raise _too_many("Too many attempts at once; try again later", WAIT_SECONDS)
            attempt_id = secrets.token_hex(8)
            try:
                if not await self.limiter.test(self.per_account, action, per_account):
                    raise await self._refusal(self.per_account, action, per_account)
                await self._admit_from(action=action, client=client, attempt_id=attempt_id, until=until, turn=turn)
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
                        await self.limiter.hit(self.per_client, action, per_client)
                if attempt.succeeded:
                    await self.limiter.clear(self.per_account, action, per_account)
            finally:
                # After the failure is counted, so that no waiting attempt finds it in neither.
                # Also when never admitted: the script may have run before a cancellation. Left
                # behind (Redis out of reach, the process killed), the place lapses at its deadline.
                with contextlib.suppress(*REDIS_ERRORS):
                    await self.redis.zrem(_running_key(action, client), attempt_id)
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
