"""The model catalogue: what the live workers serve (read from their heartbeats in Redis), and
which registry entries a request's model references name."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import cast

from fastapi import HTTPException
from pydantic import TypeAdapter, ValidationError
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.core import metrics
from api.app.core.config import Settings
from api.app.registry.models import ModelVersion
from contracts import keys, workers
from contracts.messages import FAILED_TO_LOAD, NOT_TRAINED_YET, Heartbeat, being_trained, without_progress
from contracts.registry import ModelEntry, Registry, parse_model_ref

NOT_SERVED = "no live model worker serves it"
MAX_REFS = 10
"""Most model versions one request may name."""
MAX_REF_LENGTH = 80
"""Longest model reference (a name of at most 64 characters, "@" and a version)."""
NOT_INSTALLED = "its model files are not installed on this server"
LOAD_FAILED = "its model files are on this server but failed to load"
"""Said when a worker found the files and could not load them (the error is in the admins' reason
and the worker's log)."""
NOT_TRAINED = "it has not been trained on this server yet"
"""Said without a promise when no training notes its progress (one that died says so in the
operators' log, ``python -m model.prepare``'s exit)."""
BEING_TRAINED_HERE = "it is being trained on this server: {epoch} of {epochs} epochs done"
"""Said while ``python -m model.prepare`` trains it and the workers read its progress note."""


def _progress(reason: str) -> tuple[int, int]:
    return being_trained(reason) or (-1, 0)


@dataclass
class ModelAvailability:
    workers: int = 0
    reasons: list[str] = field(default_factory=list)
    num_classes: int = 0
    random_weights: bool = False
    heldout_accuracy: float | None = None
    heldout_set: str | None = None
    """Which drawings ``heldout_accuracy`` was measured on (``ModelState.heldout_set``)."""
    heldout_size: int | None = None
    memory_mib: float | None = None
    """The most memory loading it took on any worker serving it (``ModelState.memory_mib``)."""

    @property
    def available(self) -> bool:
        return self.workers > 0

    def reason(self) -> str | None:
        """Why the version cannot answer, as its workers reported it (paths and errors included:
        for admins); None when it can."""
        if self.available:
            return None
        if self.reasons:
            # Workers reading the same missing file's progress note at their own moments say the
            # same but the epoch: the furthest says it for all (paths that differ all stay).
            kept: dict[str, str] = {}
            for reason in sorted(set(self.reasons)):
                same = without_progress(reason)
                if same not in kept or _progress(reason) > _progress(kept[same]):
                    kept[same] = reason
            return "; ".join(sorted(kept.values()))
        return NOT_SERVED

    def public_reason(self) -> str | None:
        """``reason`` in plain words, without the servers' paths, URLs and error text."""
        if self.available:
            return None
        if not self.reasons:
            return NOT_SERVED
        if any(r.startswith(FAILED_TO_LOAD) for r in self.reasons):
            return LOAD_FAILED
        if not all(r.startswith(NOT_TRAINED_YET) for r in self.reasons):
            return NOT_INSTALLED
        # The furthest any worker read: they read the note at different moments.
        progress = max((p for r in self.reasons if (p := being_trained(r)) is not None), default=None)
        return BEING_TRAINED_HERE.format(epoch=progress[0], epochs=progress[1]) if progress else NOT_TRAINED


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
                    entry.heldout_accuracy = state.heldout_accuracy
                    entry.heldout_set, entry.heldout_size = state.heldout_set, state.heldout_size
                    if state.memory_mib is not None:
                        entry.memory_mib = max(entry.memory_mib or 0.0, state.memory_mib)
                elif state.reason:
                    entry.reasons.append(state.reason)
        return result


async def model_labels(redis: Redis, entry: ModelEntry, *, session: AsyncSession | None = None) -> list[str] | None:
    """The version's labels as its workers publish them in Redis; with ``session``, else as
    PostgreSQL keeps them (``remember_labels``: a version no worker serves any more keeps its
    labels there after its Redis key went). None when neither knows them."""
    raw = await redis.get(keys.labels_key(entry.name, entry.version))
    if raw is not None:
        return cast(list[str], json.loads(raw))
    if session is None:
        return None
    return await session.scalar(
        select(ModelVersion.labels).where(ModelVersion.name == entry.name, ModelVersion.version == entry.version)
    )


_LABELS = TypeAdapter(list[str])
log = logging.getLogger("api.catalog")


async def remember_labels(*, session: AsyncSession, redis: Redis) -> int:
    """Copies into PostgreSQL the label lists the workers published in Redis for the versions
    whose labels it does not hold yet (a few rows: one per version ever registered); how many it
    stored. A label list never changes for a version (a new
    model file is a new version). Commits."""
    missing = (
        await session.execute(
            select(ModelVersion.id, ModelVersion.name, ModelVersion.version).where(ModelVersion.labels.is_(None))
        )
    ).all()
    if not missing:
        return 0
    found = await redis.mget([keys.labels_key(name, version) for _, name, version in missing])
    stored = 0
    for (row_id, name, version), raw in zip(missing, found, strict=True):
        if raw is None:
            continue
        try:
            labels = _LABELS.validate_json(raw)
        except ValidationError:
            # Not what a worker writes: kept out of PostgreSQL, where it would stay for good.
            log.warning("labels of %s@%s in Redis are not a list of labels; not kept", name, version)
            continue
        await session.execute(
            update(ModelVersion).where(ModelVersion.id == row_id, ModelVersion.labels.is_(None)).values(labels=labels)
        )
        stored += 1
    await session.commit()
    return stored


def listed_entries(registry: Registry, *, benchmark_mode: bool) -> list[ModelEntry]:
    return registry.served(benchmark_mode=benchmark_mode) if benchmark_mode else registry.public()


def _not_offered(registry: Registry, name: str, version: int | None, ref: str) -> str:
    """Why ``ref`` names no version people can ask: unknown (or a shadow), retired or disabled."""
    known = next((m for m in registry.models if m.name == name and m.version == version), None)
    if known is None or known.benchmark_only:
        return f"Unknown model {ref!r}"
    if known.channel == "retired":
        return f"Model {known.key} is retired"
    if not known.enabled:
        return f"Model {known.key} is disabled"
    return f"Unknown model {ref!r}"  # a shadow is not made known to people


def _unavailable(detail: str, settings: Settings) -> HTTPException:
    return HTTPException(status_code=503, detail=detail, headers={"Retry-After": str(settings.retry_after_seconds)})


def _available(entry: ModelEntry, availability: dict[str, ModelAvailability]) -> bool:
    state = availability.get(entry.key)
    return state is not None and state.available


_GOLDEN = (5**0.5 - 1) / 2


def _sticky_point(user_id: int, name: str) -> float:
    """Where in [0, 1) this user falls for this model: ``user_id`` times the golden ratio, modulo 1
    (a Weyl sequence), turned by an offset of the model's name. Consecutive users spread evenly, so
    even 50 users split 90/10 within a user or two of the weights (random hashing varies by +-3);
    a user stays on one version while the weights stay, and when a canary's weight grows only the
    users it gains move."""
    offset = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return (user_id * _GOLDEN + offset) % 1.0


def route(
    registry: Registry,
    name: str,
    *,
    user_id: int,
    availability: dict[str, ModelAvailability],
    benchmark_mode: bool,
) -> ModelEntry | None:
    """The version of ``name`` that answers this user: one of its stable or canary versions with
    traffic that a live worker serves, chosen by weight and sticky per user (``_sticky_point``; a
    canary split as KServe's, but per user rather than per request).
    With none of them served, the newest served stable version; None when there is none either.
    """
    versions = [
        m
        for m in registry.served(benchmark_mode=benchmark_mode)
        if m.name == name and m.channel in ("stable", "canary") and _available(m, availability)
    ]
    weighted = sorted((m for m in versions if m.traffic_weight > 0), key=lambda m: m.version)
    if not weighted:
        return max((m for m in versions if m.channel == "stable"), key=lambda m: m.version, default=None)
    point = _sticky_point(user_id, name) * sum(m.traffic_weight for m in weighted)
    for entry in weighted:
        point -= entry.traffic_weight
        if point < 0:
            return entry
    return weighted[-1]


def weight_shares(registry: Registry, *, benchmark_mode: bool) -> dict[tuple[str, int], float]:
    """Per (model, version) with traffic, the share of the model's routed requests its weight
    gives it (0 to 1), as ``route`` splits them when every such version is served."""
    weighted = [
        m
        for m in registry.served(benchmark_mode=benchmark_mode)
        if m.channel in ("stable", "canary") and m.traffic_weight > 0
    ]
    totals: dict[str, int] = {}
    for m in weighted:
        totals[m.name] = totals.get(m.name, 0) + m.traffic_weight
    return {(m.name, m.version): m.traffic_weight / totals[m.name] for m in weighted}


def default_entry(
    registry: Registry, availability: dict[str, ModelAvailability], *, benchmark_mode: bool, user_id: int = 0
) -> ModelEntry | None:
    """The version that answers this user for the first model of the registry's default order that
    a live worker serves (``user_id`` 0: a listing, not a request)."""
    for name in registry.default_order:
        entry = route(registry, name, user_id=user_id, availability=availability, benchmark_mode=benchmark_mode)
        if entry is not None:
            return entry
    return None


def shadow_copies(
    entries: list[ModelEntry],
    *,
    registry: Registry,
    availability: dict[str, ModelAvailability],
    sample_rate: float,
    benchmark_mode: bool,
) -> dict[str, list[ModelEntry]]:
    """For each entry (by key), the shadow versions of its model that get a copy of this request:
    each shadow a live worker serves, with probability ``sample_rate`` (Seldon's shadow deployments,
    sampled)."""
    copies: dict[str, list[ModelEntry]] = {}
    for entry in entries:
        shadows = [
            m
            for m in registry.served(benchmark_mode=benchmark_mode)
            if m.name == entry.name and m.channel == "shadow" and m != entry and _available(m, availability)
        ]
        chosen = [m for m in shadows if random.random() < sample_rate]
        if chosen:
            copies[entry.key] = chosen
    return copies


def requested_refs(*, form: list[str] | None, query: list[str] | None) -> list[str]:
    """The model references a request names, in the form or in the query (each value may list
    several, separated by commas; repeated fields add up). 422 when both name some: which one
    was meant cannot be told."""
    in_form = [ref.strip() for value in form or [] for ref in value.split(",") if ref.strip()]
    in_query = [ref.strip() for value in query or [] for ref in value.split(",") if ref.strip()]
    if in_form and in_query:
        raise HTTPException(status_code=422, detail="Give models in the form or in the query, not both.")
    return in_form or in_query


def resolve_models(
    refs: list[str],
    *,
    registry: Registry,
    availability: dict[str, ModelAvailability],
    settings: Settings,
    user_id: int,
    wait: bool = False,
) -> list[ModelEntry]:
    """Registry entries for the requested references (``name`` or ``name@version``), without
    repeats, in the order asked; the default model when ``refs`` is empty.

    Raises 422 for an unknown reference or a model its workers report broken, 503 (with
    Retry-After) when no live worker serves it yet, unless ``wait`` (a batch, which waits for
    its versions' workers): a version named then is taken all the same. The default model
    is the first one a live worker serves, so with none there is still no default (503).
    """
    bench = settings.benchmark_mode
    if len(refs) > MAX_REFS:
        raise HTTPException(status_code=422, detail=f"At most {MAX_REFS} models per request; got {len(refs)}.")
    if too_long := [ref for ref in refs if len(ref) > MAX_REF_LENGTH]:
        raise HTTPException(
            status_code=422,
            detail=f"A model reference is at most {MAX_REF_LENGTH} characters; got one of {len(too_long[0]):,}.",
        )
    if not refs:
        entry = default_entry(registry, availability, benchmark_mode=bench, user_id=user_id)
        if entry is None:
            raise _unavailable("No model worker is serving a default model now; retry shortly.", settings)
        metrics.ROUTED.labels(entry.name, str(entry.version)).inc()
        return [entry]
    entries: list[ModelEntry] = []
    for ref in refs:
        try:
            name, version = parse_model_ref(ref)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        routed = None
        if version is None:
            routed = route(registry, name, user_id=user_id, availability=availability, benchmark_mode=bench)
            if routed is not None:
                metrics.ROUTED.labels(routed.name, str(routed.version)).inc()
        entry = routed or registry.find(name, version, benchmark_mode=bench)
        if entry is not None and entry.channel == "shadow" and not bench:
            entry = None  # a shadow answers copies of requests, never a user
        if entry is None:
            # What can answer now: a listed version no worker serves would only earn a 503 or 422 next.
            served = sorted(
                m.key for m in listed_entries(registry, benchmark_mode=bench) if _available(m, availability)
            )
            raise HTTPException(
                status_code=422,
                detail=f"{_not_offered(registry, name, version, ref)}; models served now: {', '.join(served) or 'none'}",
            )
        state = availability.get(entry.key)
        if state is None or not state.available:
            if state is not None and state.reasons:
                raise HTTPException(
                    status_code=422, detail=f"Model {entry.key} is unavailable: {state.public_reason()}"
                )
            if not wait:
                raise _unavailable(f"No live model worker serves {entry.key} now; retry shortly.", settings)
        if entry not in entries:
            entries.append(entry)
    return entries
