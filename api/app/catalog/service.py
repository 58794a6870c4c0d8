"""What the live workers serve, read from their heartbeats in Redis."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from contracts import keys, workers
from contracts.messages import Heartbeat
from contracts.registry import ModelEntry, Registry


@dataclass
class ModelAvailability:
    workers: int = 0
    reasons: list[str] = field(default_factory=list)
    num_classes: int = 0
    random_weights: bool = False

    @property
    def available(self) -> bool:
        return self.workers > 0

    def reason(self) -> str | None:
        if self.available:
            return None
        if self.reasons:
            return "; ".join(sorted(set(self.reasons)))
        return "no live model worker serves it"


class WorkerDirectory:
    """Heartbeats of live workers, cached for a moment so that requests do not each ask Redis."""

    def __init__(self, redis: Redis, ttl: float = 1.0) -> None:
        self.redis = redis
        self.ttl = ttl
        self._cached: tuple[float, list[Heartbeat]] | None = None

    async def heartbeats(self, *, fresh: bool = False) -> list[Heartbeat]:
        now = time.monotonic()
        if not fresh and self._cached is not None and now - self._cached[0] < self.ttl:
            return self._cached[1]
        beats = await workers.live_heartbeats_async(self.redis)
        self._cached = (now, beats)
        return beats

    async def availability(self, *, fresh: bool = False) -> dict[str, ModelAvailability]:
        result: dict[str, ModelAvailability] = {}
        for beat in await self.heartbeats(fresh=fresh):
            for state in beat.models:
                entry = result.setdefault(f"{state.name}@{state.version}", ModelAvailability())
                if state.ready:
                    entry.workers += 1
                    entry.num_classes = state.num_classes
                    entry.random_weights = state.random_weights
                elif state.reason:
                    entry.reasons.append(state.reason)
        return result


async def model_labels(redis: Redis, entry: ModelEntry) -> list[str] | None:
    raw = await redis.get(keys.labels_key(entry.name, entry.version))
    return json.loads(raw) if raw is not None else None


def listed_entries(registry: Registry, *, benchmark_mode: bool) -> list[ModelEntry]:
    return registry.served(benchmark_mode=benchmark_mode) if benchmark_mode else registry.public()
