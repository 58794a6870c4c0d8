"""Redis's eviction policy, which the API and the model workers both check before they trust Redis.

The job streams, the result stream and the consumer groups live in Redis with no copy elsewhere
until a result is stored. A Redis whose ``maxmemory-policy`` is anything but ``noeviction``
deletes keys when it reaches ``maxmemory``, streams included, without an error to anyone: jobs
and answers vanish and requests wait for their deadline. Managed Redis often ships
``volatile-lru`` or ``allkeys-lru``. So, as BullMQ and Sidekiq do, both sides read the policy when
they connect: ``noeviction`` is fine, anything else is refused unless ALLOW_REDIS_EVICTION=true,
which turns the refusal into a loud warning (and a field of the API's ``/health/ready``).

The policy is read with ``CONFIG GET maxmemory-policy``; providers that disable or rename CONFIG
(or an ACL that forbids it) still answer ``INFO memory``, whose ``maxmemory_policy`` says the same.

Each helper has a synchronous form (the model worker) and an asynchronous one (the API) side by
side, as ``contracts.streams`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis
import redis.asyncio
import redis.exceptions

SAFE_POLICY = "noeviction"
"""The one policy under which Redis never deletes a key to make room."""
ALLOW_SETTING = "ALLOW_REDIS_EVICTION"
"""The setting (of the API and of the model workers) that lets them run on an evicting Redis."""
UNREADABLE = "unknown"
"""What ``EvictionCheck.policy`` says when Redis answered neither CONFIG GET nor INFO memory."""


class EvictionPolicyRefused(RuntimeError):
    """Redis may evict keys and ALLOW_REDIS_EVICTION is not set; the message is one line that says
    what is wrong and both ways out."""


@dataclass(frozen=True)
class EvictionCheck:
    """What a check found: ``policy`` as Redis named it (``UNREADABLE`` when it would not say), and
    ``warning``, one line for the logs and ``/health/ready``, or None when the policy is safe."""

    policy: str
    warning: str | None


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) and value else None


def _from_config(reply: object) -> str | None:
    # redis-py answers CONFIG GET with a dict of the matching parameters (empty if none match).
    return _text(reply.get("maxmemory-policy")) if isinstance(reply, Mapping) else None


def _from_info(reply: object) -> str | None:
    return _text(reply.get("maxmemory_policy")) if isinstance(reply, Mapping) else None


def read_policy(client: redis.Redis) -> str | None:
    """Redis's ``maxmemory-policy``, from CONFIG GET or else INFO memory; None when Redis refuses
    both. Raises redis-py's ConnectionError or TimeoutError when Redis cannot be reached."""
    try:
        if policy := _from_config(client.config_get("maxmemory-policy")):
            return policy
    except redis.exceptions.ResponseError:
        # CONFIG disabled or renamed by the provider, or forbidden by an ACL (NOPERM).
        pass
    try:
        return _from_info(client.info("memory"))
    except redis.exceptions.ResponseError:
        return None


async def read_policy_async(client: redis.asyncio.Redis) -> str | None:
    """``read_policy`` for an asyncio client."""
    try:
        if policy := _from_config(await client.config_get("maxmemory-policy")):
            return policy
    except redis.exceptions.ResponseError:
        pass
    try:
        return _from_info(await client.info("memory"))
    except redis.exceptions.ResponseError:
        return None


def judge(policy: str | None, *, allow: bool) -> EvictionCheck:
    """The verdict on a policy read with ``read_policy``: safe (no warning), allowed with a warning,
    or refused. Raises EvictionPolicyRefused for an evicting policy when ``allow`` is false. A
    policy Redis would not tell is a warning, never a refusal: nothing says it is wrong."""
    if policy is None:
        return EvictionCheck(
            UNREADABLE,
            "Redis answered neither CONFIG GET maxmemory-policy nor INFO memory: check by other means "
            f"that its maxmemory-policy is {SAFE_POLICY}, or queued jobs may be deleted under memory pressure.",
        )
    if policy == SAFE_POLICY:
        return EvictionCheck(policy, None)
    risk = (
        f"Redis's maxmemory-policy is {policy}: when it reaches maxmemory it deletes keys, queued jobs "
        "and results among them, without an error to anyone."
    )
    if not allow:
        raise EvictionPolicyRefused(
            f"{risk} Set it to {SAFE_POLICY} (redis-server --maxmemory-policy {SAFE_POLICY}, or the "
            f"provider's parameter), or set {ALLOW_SETTING}=true to run anyway."
        )
    return EvictionCheck(policy, f"{risk} Running anyway because {ALLOW_SETTING}=true.")


def check_eviction_policy(client: redis.Redis, *, allow: bool) -> EvictionCheck:
    """``judge(read_policy(client), allow=allow)``: raises EvictionPolicyRefused, or redis-py's
    ConnectionError or TimeoutError when Redis cannot be reached."""
    return judge(read_policy(client), allow=allow)


async def check_eviction_policy_async(client: redis.asyncio.Redis, *, allow: bool) -> EvictionCheck:
    """``check_eviction_policy`` for an asyncio client."""
    return judge(await read_policy_async(client), allow=allow)
