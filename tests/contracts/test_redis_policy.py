"""The eviction-policy check both services run, against private redis-servers configured as
managed Redis often is (each on a free port of its own; the suite's shared Redis is not touched)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from contracts.redis_policy import (
    ALLOW_SETTING,
    SAFE_POLICY,
    UNREADABLE,
    EvictionPolicyRefused,
    check_eviction_policy,
    check_eviction_policy_async,
    read_policy,
    read_policy_async,
)
from tests.support import RedisServer, free_port


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A private redis-server started with the options the test is parametrized with."""
    s = RedisServer(*request.param)
    s.start()
    yield s
    s.stop()


LRU = ("--maxmemory-policy", "allkeys-lru")
CONFIG_DISABLED = ("--maxmemory-policy", "volatile-lru", "--rename-command", "CONFIG", "")
# An ACL that forbids both ways of reading the policy (some providers restrict INFO too).
BOTH_FORBIDDEN = ("--user", "default", "on", "nopass", "~*", "&*", "+@all", "-config", "-info")


@pytest.mark.parametrize("server", [LRU], indirect=True)
def test_an_evicting_redis_is_refused_with_one_clear_line(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url)
    assert read_policy(client) == "allkeys-lru"
    with pytest.raises(EvictionPolicyRefused) as refused:
        check_eviction_policy(client, allow=False)
    message = str(refused.value)
    assert "\n" not in message
    assert "allkeys-lru" in message and f"--maxmemory-policy {SAFE_POLICY}" in message
    assert f"{ALLOW_SETTING}=true" in message


@pytest.mark.parametrize("server", [LRU], indirect=True)
async def test_allowed_it_is_a_warning(server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        check = await check_eviction_policy_async(client, allow=True)
        with pytest.raises(EvictionPolicyRefused):
            await check_eviction_policy_async(client, allow=False)
    finally:
        await client.aclose()
    assert check.policy == "allkeys-lru"
    assert check.warning is not None and "allkeys-lru" in check.warning and ALLOW_SETTING in check.warning


@pytest.mark.parametrize("server", [()], indirect=True)
def test_noeviction_passes_silently(server: RedisServer) -> None:
    check = check_eviction_policy(redis.Redis.from_url(server.url), allow=False)
    assert (check.policy, check.warning) == (SAFE_POLICY, None)


@pytest.mark.parametrize("server", [CONFIG_DISABLED], indirect=True)
async def test_without_config_the_policy_is_read_from_info(server: RedisServer) -> None:
    """Providers that disable CONFIG still answer INFO memory: the policy is read there, and an
    evicting one is refused all the same."""
    sync_client = redis.Redis.from_url(server.url)
    with pytest.raises(redis.exceptions.ResponseError):
        sync_client.config_get("maxmemory-policy")
    assert read_policy(sync_client) == "volatile-lru"
    with pytest.raises(EvictionPolicyRefused):
        check_eviction_policy(sync_client, allow=False)
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        assert await read_policy_async(client) == "volatile-lru"
    finally:
        await client.aclose()


@pytest.mark.parametrize("server", [BOTH_FORBIDDEN], indirect=True)
def test_a_policy_redis_will_not_tell_is_a_warning_not_a_refusal(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url)
    assert client.ping()
    assert read_policy(client) is None
    check = check_eviction_policy(client, allow=False)
    assert check.policy == UNREADABLE and check.warning is not None and SAFE_POLICY in check.warning


def test_an_unreachable_redis_raises_the_connection_error() -> None:
    """Redis down is not a verdict: the caller's outage handling retries later."""
    client = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.ConnectionError):
        check_eviction_policy(client, allow=False)
