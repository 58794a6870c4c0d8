"""The model worker: pulls jobs from Redis Streams, batches them per model version, answers.

Delivery is at least once (a job is acknowledged only together with its result, in one
transaction: ``model.streams``); the API stores each answer once, so a job redelivered after a
crash is never answered twice.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import redis
import redis.exceptions

from contracts import keys, registry_live, streams, workers
from contracts.imaging import trim_heap
from contracts.messages import (
    FAILED_TO_LOAD,
    NOT_TRAINED_YET,
    Heartbeat,
    LabelScore,
    ModelState,
    PredictionStatus,
    ResultMessage,
    Timings,
)
from contracts.redis_policy import EvictionPolicyRefused, check_eviction_policy
from contracts.registry import ModelEntry, Registry, RegistryUnreadable, read_registry
from contracts.streams import REDIS_ERRORS, group_missing
from model import preprocessing
from model.affinity import narrowed_cpus, spread_over
from model.config import ModelRefInvalid, ModelSettings, load_model_settings
from model.runtimes import (
    FailedLoads,
    LoadedModel,
    ModelLoadFailed,
    ModelUnavailable,
    configure_tensorflow,
    load_model,
    not_trained_reason,
    resolve,
    top_k,
)
from model.stall import LoopWatch
from model.streams import DeadLetter, Delivery, JobStreams

log = logging.getLogger("model.worker")

STOPPED_WORKER_MIN_IDLE_MS = 1000
"""A stopped worker's job is taken over once delivered this long ago: its heartbeat, gone only
HEARTBEAT_TTL_S after the worker stopped, is what tells; this only skips a job delivered at that
very moment."""


@dataclass
class Input:
    """One job's preprocessed image, ready to be stacked into a batch."""

    delivery: Delivery
    x: np.ndarray
    preprocess_ms: float


class Worker:
    """Serves the model versions it loads: fills a batch per version from its job stream, triages,
    preprocesses and infers it, and announces itself with a heartbeat thread."""

    def __init__(self, settings: ModelSettings, registry: Registry | None = None) -> None:
        """``registry``: serve these entries for good; None: follow the registry the API publishes
        (the file's until one is published)."""
        self.settings = settings
        self._all_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        """The CPUs the worker started with: people's jobs run on all of them."""
        self._narrowed = False
        """A batch job ran on fewer CPUs since people's jobs last got them all back (``spread_over``)."""
        self._people_answered_at = 0.0
        """When (``time.monotonic``) this worker last answered people's jobs."""
        self._held: dict[str, dict[bytes, tuple[Delivery, float]]] = defaultdict(dict)
        """Batch jobs taken and waiting for people's jobs to pause (``_bulk_may_run``), with when
        they were taken, by stream and entry id: a job taken back from the stream (a stall past
        VISIBILITY_TIMEOUT_MS) replaces its earlier delivery instead of being answered twice."""
        self._held_since: float | None = None
        """When the batch jobs held began to wait (BATCH_MAX_DEFER_MS runs from here). Not the
        oldest time in ``_held``: a job taken back after a stall gets a new delivery time there
        but has waited since this."""
        self.worker_id = settings.resolved_worker_id()
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=1, socket_timeout=5, health_check_interval=15
        )
        self.follows_registry = registry is None
        self.revision: tuple[str, int] | None = None
        """(source, revision) of the published registry this worker serves; None: not one yet."""
        if registry is not None:
            self.entries = settings.served_entries(registry)
        else:
            file = registry = read_registry(settings.registry_path)
            with contextlib.suppress(*REDIS_ERRORS):  # Redis down: the file now, the published one later
                if (snapshot := registry_live.read_snapshot(self.redis)) is not None:
                    registry, self.revision = snapshot.registry, (snapshot.source, snapshot.revision)
            # Without a published registry SERVE_MODELS names versions the file serves; with one,
            # a model whose versions are all retired for now is waited for, and only a reference
            # to no version at all stops the worker (it would serve nothing while looking healthy).
            self.entries = (
                settings.served_entries(file) if self.revision is None else settings.published_entries(registry, file)
            )
        self.registry = registry
        self.jobs = JobStreams(self.redis, self.worker_id)
        self.models: dict[str, LoadedModel] = {}
        """The models loaded, by the job stream they serve."""
        self.states: dict[str, ModelState] = {}
        self._states_lock = threading.Lock()
        self.started_at = time.time()
        self.stopping = threading.Event()
        self._last_outage_log = 0.0
        self._last_reclaim = 0.0
        self._last_forget = 0.0
        self._own_taken_back: set[str] = set()
        """The streams where the jobs held under this worker's own name were taken back since it
        (re)connected to Redis: those left by an earlier process of its name, or delivered to it
        just as Redis went away (the reply lost, the delivery kept)."""
        self.peers = 1
        """Live workers, this one included, as last counted by the heartbeat thread."""
        self.loop = LoopWatch(process=f"worker {self.worker_id}", stall_s=settings.serving_stall_s)
        """When the serving loop last came round: the heartbeat thread withholds the heartbeat
        once it is SERVING_STALL_S old (``beat``)."""
        self.failed = FailedLoads(settings)
        """Wanted versions whose last load failed: loaded again once their spec or model file
        changes (``follow``, ``load_appeared``), not at every check."""
        self._changes_lock = threading.Lock()
        self._incoming: dict[str, LoadedModel] = {}
        """Versions loaded and warmed up by the registry thread, for the serving loop to take on."""
        self._outgoing: set[str] = set()
        """Job streams of versions the registry no longer has this worker serve."""
        self._warned_policy: str | None = None
        """The evicting Redis policy last warned about (ALLOW_REDIS_EVICTION)."""
        self.inference_cpu_seconds = 0.0
        """Process CPU time inside inference calls (``Heartbeat.inference_cpu_seconds``)."""

    # --- start-up -------------------------------------------------------------------------

    def check_eviction(self) -> None:
        """Reads Redis's eviction policy, at start and whenever the worker reconnects (Redis may
        come back reconfigured, or be another server): logs the warning when an evicting policy is
        allowed (ALLOW_REDIS_EVICTION). Raises EvictionPolicyRefused when it is not, or redis-py's
        ConnectionError or TimeoutError when Redis cannot be reached."""
        check = check_eviction_policy(self.redis, allow=self.settings.allow_redis_eviction)
        # Said once per policy, not at every reconnection to the same Redis.
        if check.warning and check.policy != self._warned_policy:
            log.warning("%s", check.warning)
        self._warned_policy = check.policy if check.warning else None

    def load_models(self) -> None:
        configure_tensorflow(self.settings)
        for entry in self.entries:
            if (loaded := self._load(entry)) is not None:
                self.models[keys.job_stream(entry.name, entry.version)] = loaded
                self._set_state(entry, self._ready_state(loaded))

    def _load(self, entry: ModelEntry) -> LoadedModel | None:
        """The version loaded and warmed up by one inference per batch size it will see; None
        (with the reason in its state) when it cannot be."""
        start = time.perf_counter()
        self.failed.trying(entry)
        before = resident_mib()
        try:
            loaded = load_model(entry, self.settings)
            loaded.warm_up(tuple(sorted({1, self.settings.max_batch_size})))
            if before is not None and (after := resident_mib()) is not None:
                loaded.extra["memory_mib"] = round(max(after - before, 0.0), 1)
        except ModelUnavailable as exc:
            reason = f"{FAILED_TO_LOAD}: {exc}" if isinstance(exc, ModelLoadFailed) else str(exc)
            self._set_state(entry, ModelState(name=entry.name, version=entry.version, ready=False, reason=reason))
            log.warning("model %s unavailable: %s", entry.key, exc)
            return None
        except Exception as exc:  # a broken model must not stop the others from serving
            self._set_state(
                entry,
                ModelState(name=entry.name, version=entry.version, ready=False, reason=f"{FAILED_TO_LOAD}: {exc}"),
            )
            log.exception("model %s failed to load", entry.key)
            return None
        log.info("model %s ready in %.1f s (warmed up)", entry.key, time.perf_counter() - start)
        self.failed.forget(entry)
        return loaded

    @staticmethod
    def _ready_state(loaded: LoadedModel) -> ModelState:
        return ModelState(
            name=loaded.entry.name,
            version=loaded.entry.version,
            ready=True,
            num_classes=len(loaded.labels),
            random_weights=loaded.random_weights,
            heldout_accuracy=loaded.heldout_accuracy,
            heldout_set=loaded.heldout_set,
            heldout_size=loaded.heldout_size,
            memory_mib=cast(float | None, loaded.extra.get("memory_mib")),
        )

    def _set_state(self, entry: ModelEntry, state: ModelState | None) -> None:
        # Replaced whole, never changed in place: the heartbeat thread reads it at any moment.
        # Under a lock: the registry thread and the serving loop both set states.
        with self._states_lock:
            states = dict(self.states)
            if state is None:
                states.pop(entry.key, None)
            else:
                states[entry.key] = state
            self.states = states

    # --- following the registry -----------------------------------------------------------

    def _registry_loop(self) -> None:
        """Listens for announcements of a new registry revision and checks the revision every
        REGISTRY_CHECK_S besides; loads what a new revision adds (here, while the serving loop goes
        on) and hands it over, with what it drops, to the serving loop."""
        pubsub = None
        while not self.stopping.is_set():
            try:
                if pubsub is None:
                    pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(keys.REGISTRY_CHANNEL)
                pubsub.get_message(timeout=self.settings.registry_check_s)
                published = registry_live.published_revision(self.redis)
                if published is not None and published != self.revision:
                    snapshot = registry_live.read_snapshot(self.redis)
                    if snapshot is not None:
                        self.follow(snapshot.registry)
                        self.revision = (snapshot.source, snapshot.revision)
                self.load_appeared()
            except REDIS_ERRORS as exc:
                self._outage(exc)
                if pubsub is not None:
                    with contextlib.suppress(*REDIS_ERRORS):
                        pubsub.close()
                pubsub = None
                self.stopping.wait(1)
            except Exception:
                log.exception("registry follower error")
                self.stopping.wait(1)
        if pubsub is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                pubsub.close()

    def follow(self, registry: Registry) -> None:
        """Brings the versions served in line with ``registry``: loads each new version (or one whose
        spec changed) and queues it for the serving loop, and queues the removal of those it no
        longer serves. A version that fails to load is reported in the heartbeat, not retried until
        its spec or its model file changes (``load_appeared``)."""
        wanted = {keys.job_stream(e.name, e.version): e for e in self.settings.live_entries(registry)}
        with self._changes_lock:
            current = {s: m.entry for s, m in self.models.items() if s not in self._outgoing}
            current.update({s: m.entry for s, m in self._incoming.items()})
        for stream, entry in wanted.items():
            have = current.get(stream)
            if have is not None and have.spec() == entry.spec():
                continue
            known = self.states.get(entry.key)
            if have is None and known is not None and not known.ready and self.failed.unchanged(entry):
                continue
            log.info("registry: loading %s", entry.key)
            if (loaded := self._load(entry)) is not None:
                with self._changes_lock:
                    self._incoming[stream] = loaded
                    self._outgoing.discard(stream)
        dropped = [s for s in current if s not in wanted]
        with self._changes_lock:
            for stream in dropped:
                self._incoming.pop(stream, None)
                self._outgoing.add(stream)
        # A version that could not be loaded and is no longer wanted stops being reported.
        wanted_keys = {e.key for e in wanted.values()}
        serving = {m.entry.key for m in self.models.values()}
        for key, state in self.states.items():
            if key not in wanted_keys and key not in serving and not state.ready:
                name, _, version = key.partition("@")
                self._set_state(ModelEntry.model_construct(name=name, version=int(version)), None)
        self.failed.keep(wanted_keys)
        self.registry = registry

    def load_appeared(self) -> None:
        """Loads each wanted version that could not be loaded once its model file appears or
        changes, as when ``python -m model.prepare`` finishes training it while the portal
        already serves (``make run``): its folder appears whole, by a rename. Runs in the
        registry thread, like ``follow``."""
        for entry in self.failed.waiting():
            self._renew_not_trained(entry)
        for entry in self.failed.changed():
            log.info("%s: its model file appeared or changed; loading it", entry.key)
            if (loaded := self._load(entry)) is not None:
                stream = keys.job_stream(entry.name, entry.version)
                with self._changes_lock:
                    self._incoming[stream] = loaded
                    self._outgoing.discard(stream)

    def _renew_not_trained(self, entry: ModelEntry) -> None:
        """Reports how far a version's training is (``not_trained_reason``) while its model file
        is still missing; a version that failed for another reason keeps that reason."""
        state = self.states.get(entry.key)
        if state is None or not state.reason or not state.reason.startswith(NOT_TRAINED_YET) or not entry.file:
            return
        reason = not_trained_reason(resolve(entry, entry.file, self.settings))
        if reason != state.reason:
            self._set_state(entry, state.model_copy(update={"reason": reason}))

    def apply_changes(self) -> bool:
        """Takes on the versions the registry thread loaded and lets go of those it dropped (their
        memory returned to the system); True when anything changed. Runs in the serving loop,
        between batches, so a batch never loses its model."""
        with self._changes_lock:
            incoming, outgoing = self._incoming, self._outgoing
            self._incoming, self._outgoing = {}, set()
        if not incoming and not outgoing:
            return False
        models = {s: m for s, m in self.models.items() if s not in outgoing}
        # Only the entries are kept: a local bound to a dropped model would hold its memory
        # through release_memory() below.
        dropped = [self.models[s].entry for s in outgoing if s in self.models]
        for entry in dropped:
            self._set_state(entry, None)
            log.info("registry: %s no longer served here", entry.key)
        models.update(incoming)
        self.jobs.ensure_groups(incoming)
        self.models = models
        for loaded in incoming.values():
            self._set_state(loaded.entry, self._ready_state(loaded))
            self.redis.set(
                keys.labels_key(loaded.entry.name, loaded.entry.version),
                json.dumps(list(loaded.labels)),
                ex=self.settings.labels_ttl_s,
            )
            log.info("registry: now serving %s", loaded.entry.key)
        del incoming
        if outgoing:
            release_memory()
        self.send_heartbeat()
        return True

    def publish_labels(self, *, only_missing: bool = False) -> None:
        for loaded in self.models.values():
            key = keys.labels_key(loaded.entry.name, loaded.entry.version)
            if only_missing and self.redis.exists(key):
                self.redis.expire(key, self.settings.labels_ttl_s)
                continue
            self.redis.set(key, json.dumps(list(loaded.labels)), ex=self.settings.labels_ttl_s)

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            worker_id=self.worker_id,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            started_at=self.started_at,
            models=list(self.states.values()),
            inference_cpu_seconds=round(self.inference_cpu_seconds, 6),
        )

    def send_heartbeat(self) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            workers.announce(
                pipe,
                worker_id=self.worker_id,
                heartbeat_json=self.heartbeat().model_dump_json(),
                ttl_ms=int(self.settings.heartbeat_ttl_s * 1000),
                now=time.time(),
            )
            pipe.execute()

    def beat(self) -> bool:
        """One turn of the heartbeat thread: announces the worker, unless its serving loop has not
        come round for SERVING_STALL_S (an inference that hangs, a deadlock): then its heartbeat
        lapses, as a stopped worker's does, so that peers take over its jobs, the API stops
        sending it work and ``model.health`` fails, instead of a thread beating for a loop that
        answers nothing. Whether it announced; raises Redis's errors."""
        if self.loop.stalled():
            return False  # its jobs go to peers once the last heartbeat expires
        self.send_heartbeat()
        self.publish_labels(only_missing=True)
        self.peers = max(1, len(workers.live_heartbeats(self.redis)))
        return True

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.settings.heartbeat_interval_s):
            try:
                self.beat()
            except REDIS_ERRORS as exc:
                self._outage(exc)

    # --- the loop -------------------------------------------------------------------------

    def _outage(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_outage_log >= 10:
            self._last_outage_log = now
            log.error("redis unavailable: %s: %s", type(exc).__name__, exc)

    def run(self) -> None:
        """Serves until SIGTERM/SIGINT; survives Redis outages."""
        if not self.models:
            log.error("no model could be loaded; serving heartbeats only so operators see why")
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        follower = threading.Thread(target=self._registry_loop, name="registry", daemon=True)
        groups_ready = False
        started = False
        refusal: EvictionPolicyRefused | None = None
        while not self.stopping.is_set():
            self.loop.turned()
            try:
                if not groups_ready:
                    # (Re)connected: first make sure this Redis keeps what it is given.
                    self.check_eviction()
                    self.jobs.ensure_groups(self.models)
                    self.publish_labels()
                    self.send_heartbeat()
                    # A job delivered as Redis went away stays pending under this worker's name:
                    # taken back in the next step, as at start, not after VISIBILITY_TIMEOUT_MS
                    # (as long as a one-call prediction waits for its answer).
                    self._own_taken_back.clear()
                    self._last_reclaim = 0.0
                    groups_ready = True
                    if not started:
                        hb.start()
                        if self.follows_registry:
                            follower.start()
                        started = True
                        log.info(
                            "worker %s serving %s", self.worker_id, sorted(m.entry.key for m in self.models.values())
                        )
                self.apply_changes()
                if not self.models:
                    self.stopping.wait(0.2)
                    continue
                self.step()
            except EvictionPolicyRefused as exc:
                refusal = exc
                self.stopping.set()
            except redis.exceptions.ResponseError as exc:
                if group_missing(exc):
                    groups_ready = False  # Redis lost its data; recreate the groups
                    continue
                log.exception("redis error")
                self.stopping.wait(1)
            except REDIS_ERRORS as exc:
                self._outage(exc)
                groups_ready = False
                self.stopping.wait(1)
        if refusal is None and self._held:
            # Taken already: answered now rather than left for a peer to take over seconds later.
            with contextlib.suppress(*REDIS_ERRORS):
                self.answer_held()
        with contextlib.suppress(*REDIS_ERRORS), self.redis.pipeline(transaction=False) as pipe:
            workers.withdraw(pipe, worker_id=self.worker_id)
            pipe.execute()
        log.info("worker %s stopped", self.worker_id)
        if refusal is not None:
            raise SystemExit(f"model worker {self.worker_id} stops: {refusal}")

    def step(self) -> None:
        """One round: take over stale jobs, read new ones, fill batches, answer people's jobs, and
        the batch jobs taken once people's pause (``_bulk_may_run``)."""
        batches: dict[str, list[Delivery]] = defaultdict(list)
        if time.monotonic() - self._last_forget > streams.FORGET_EVERY_S:
            self._last_forget = time.monotonic()
            # Before anything is taken: should this fail, no job waits on it.
            for stream in self.models:
                self.jobs.forget_stopped(stream)
        if time.monotonic() - self._last_reclaim > min(5.0, self.settings.visibility_timeout_ms / 2000):
            self._last_reclaim = time.monotonic()
            for stream in self.models:
                # A stopped worker's jobs as soon as its heartbeat is gone; any other's once idle
                # for VISIBILITY_TIMEOUT_MS (its worker hangs).
                taken = self.jobs.reclaim_from_stopped(
                    stream,
                    min_idle_ms=STOPPED_WORKER_MIN_IDLE_MS,
                    count=self.settings.max_batch_size,
                    including_own=stream not in self._own_taken_back,
                )
                if len(taken) < self.settings.max_batch_size:
                    self._own_taken_back.add(stream)
                    taken += self.jobs.reclaim(
                        stream,
                        min_idle_ms=self.settings.visibility_timeout_ms,
                        count=self.settings.max_batch_size - len(taken),
                    )
                for delivery in taken:
                    log.warning(
                        "reclaimed job %s (delivery %d)",
                        delivery.job.job_id if delivery.job else delivery.entry_id,
                        delivery.delivery,
                        extra={"request_id": delivery.job.request_id if delivery.job else ""},
                    )
                    batches[stream].append(delivery)
        if not batches:
            # With peers, start with one job and take a share of the rest in _fill.
            count = self.settings.max_batch_size if self.peers <= 1 else 1
            # Holding batch jobs: look again in a millisecond, as _fill does (a short BLOCK ends
            # only at Redis's next cron tick).
            block_ms = None if self._held else 1000
            for stream, deliveries in self.jobs.read(self.models, count=count, block_ms=block_ms).items():
                batches[stream].extend(deliveries)
            if not batches and self._held:
                time.sleep(0.001)
        for stream, deliveries in batches.items():
            self._fill(stream, deliveries)
            # People's jobs first and on their own: a batch's job never shares their inference.
            people: list[Delivery] = []
            for d in deliveries:
                if d.job is not None and d.job.request_id.startswith(keys.BATCH_REQUEST_PREFIX):
                    self._held[stream][d.entry_id] = (d, time.monotonic())
                    self._held_since = self._held_since or time.monotonic()
                else:
                    people.append(d)
            if people:
                if self._narrowed:
                    spread_over(self._all_cpus)
                    self._narrowed = False
                self.process(stream, people)
                self._people_answered_at = time.monotonic()
        if self._held and self._bulk_may_run():
            self.answer_held()

    def answer_held(self) -> None:
        """Infers the batch jobs held, MAX_BATCH_SIZE at a time, on BATCH_INFERENCE_CPUS. A job
        held past VISIBILITY_TIMEOUT_MS (the worker stalled, or Redis was away) is left pending:
        a peer may have taken it over, and this worker's own reclaim takes it back otherwise;
        so is a job of a version no longer served here."""
        held, self._held, self._held_since = self._held, defaultdict(dict), None
        taken_over_after = time.monotonic() - self.settings.visibility_timeout_ms / 1000
        size = self.settings.max_batch_size
        for stream, entries in held.items():
            if stream not in self.models:
                continue
            bulk = [d for d, taken in entries.values() if taken > taken_over_after]
            for start in range(0, len(bulk), size):
                with narrowed_cpus(self.settings.batch_inference_cpus) as narrow:
                    self._narrowed = self._narrowed or narrow is not None
                    self.process(stream, bulk[start : start + size])

    def _bulk_may_run(self) -> bool:
        """Whether the batch jobs held may be inferred now: people's jobs have paused for
        PEOPLE_ANTICIPATION_MS, the batch has waited BATCH_MAX_DEFER_MS, or MAX_BATCH_SIZE of a
        version's batch jobs are held.

        Anticipatory scheduling (Iyer and Druschel, "Anticipatory scheduling: a disk scheduling
        framework to overcome deceptive idleness in synchronous I/O", SOSP 2001): a person waiting
        for an answer sends the next request a few milliseconds after the last, and a batch job
        started in that gap is what the request then waits for."""
        if any(len(held) >= self.settings.max_batch_size for held in self._held.values()):
            return True  # a full batch: holding more would keep them from peers that idle
        now = time.monotonic()
        quiet = now - self._people_answered_at >= self.settings.people_anticipation_ms / 1000
        # Never held near VISIBILITY_TIMEOUT_MS: a job held that long would be taken over.
        longest = min(self.settings.batch_max_defer_ms, self.settings.visibility_timeout_ms / 2) / 1000
        return quiet or (self._held_since is not None and now - self._held_since >= longest)

    def _fill(self, stream: str, deliveries: list[Delivery]) -> None:
        """Adds the jobs of the same model version already waiting, for up to MAX_BATCH_DELAY_MS.

        Polls without BLOCK: Redis answers a short BLOCK timeout only on its next cron tick
        (every 100 ms at the default hz 10), which cost one request tens of milliseconds.
        """
        deadline = time.monotonic() + self.settings.max_batch_delay_ms / 1000
        target = self._batch_target(stream, len(deliveries))
        while len(deliveries) < target:
            more = self.jobs.read([stream], count=target - len(deliveries)).get(stream, [])
            deliveries.extend(more)
            if not more:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(remaining, 0.001))

    def _batch_target(self, stream: str, held: int) -> int:
        """MAX_BATCH_SIZE alone; with peers, this worker's share of the jobs waiting.

        A worker taking a full batch while its peers idle makes the whole batch wait for one
        core; with inference as fast per image at batch 1 as at 8 (OpenVINO here), sharing wins.
        """
        if self.peers <= 1:
            return self.settings.max_batch_size
        waiting = self.jobs.waiting(stream)
        return max(1, min(self.settings.max_batch_size, math.ceil((waiting + held) / self.peers)))

    # --- one batch ------------------------------------------------------------------------

    def process(self, stream: str, deliveries: list[Delivery]) -> None:
        """Answers one batch of jobs of one model version and settles every delivery in it: triage,
        preprocessing, batched inference, then answers and acknowledgements in one transaction."""
        model = self.models[stream]
        started = time.time()
        computable, answers, dead_letters = self.triage(deliveries, started)
        self.jobs.mark_running(d.job for d in computable if d.job is not None)
        inputs, failures = self.preprocess(model.entry, computable)
        answers += failures
        answers += self.infer(model, inputs, started)
        self.jobs.publish(stream, deliveries, answers, dead_letters)
        log.info(
            "answered %d jobs of %s (batch %d)",
            len(answers),
            model.entry.key,
            len(inputs),
            extra={"request_id": ",".join(sorted({d.job.request_id for d in deliveries if d.job}))},
        )

    def triage(
        self, deliveries: list[Delivery], now: float
    ) -> tuple[list[Delivery], list[ResultMessage], list[DeadLetter]]:
        """Splits a batch into the jobs to compute and those settled without a model: an undecodable
        entry is dead-lettered; a job delivered more than MAX_DELIVERIES times (each worker taking it
        stopped) is dead-lettered and failed; a job past its deadline expires."""
        computable: list[Delivery] = []
        answers: list[ResultMessage] = []
        dead_letters: list[DeadLetter] = []
        for d in deliveries:
            if d.job is None:
                dead_letters.append(DeadLetter(d, d.error or ""))
            elif d.delivery > self.settings.max_deliveries:
                reason = f"gave up after {d.delivery - 1} deliveries: the worker processing it stopped each time"
                log.error("dead-lettering %s: %s", d.entry_id, reason, extra={"request_id": d.job.request_id})
                dead_letters.append(DeadLetter(d, reason))
                # Sent as a first delivery: a job given up is not counted as answered after a reclaim.
                answers.append(
                    ResultMessage.answering(
                        d.job, PredictionStatus.failed, worker_id=self.worker_id, error=reason, dead_lettered=True
                    )
                )
            elif d.job.expired(now):
                error = "deadline passed in the queue"
                if d.delivery > 1:
                    error += f" (taken over from a worker that stopped or hung; delivery {d.delivery})"
                answers.append(self._answer(d, PredictionStatus.expired, error=error))
            else:
                computable.append(d)
        return computable, answers, dead_letters

    def preprocess(self, entry: ModelEntry, deliveries: list[Delivery]) -> tuple[list[Input], list[ResultMessage]]:
        """The model inputs of these jobs, each with its preprocessing time; a job whose image
        cannot be read fails alone, not its batch."""
        inputs: list[Input] = []
        failures: list[ResultMessage] = []
        for d in deliveries:
            assert d.job is not None
            t0 = time.perf_counter()
            try:
                x = preprocessing.preprocess(d.job.image, entry)
            except Exception as exc:
                failures.append(self._answer(d, PredictionStatus.failed, error=f"preprocessing failed: {exc}"))
                continue
            inputs.append(Input(d, x, (time.perf_counter() - t0) * 1000))
        return inputs, failures

    def infer(self, model: LoadedModel, inputs: list[Input], started: float) -> list[ResultMessage]:
        """One batched inference over ``inputs``: each job's top-k answer with its timings (ms from
        its enqueueing, ``started`` being when the batch was taken, in epoch seconds); when the
        model raises, every job of the batch fails with the reason."""
        if not inputs:
            return []
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            probs = model.predict(np.stack([i.x for i in inputs]))
            error = None
        except Exception as exc:
            log.exception("inference failed for %s", model.entry.key)
            probs, error = None, f"inference failed: {exc}"
        inference_ms = (time.perf_counter() - t0) * 1000
        # Process time, not thread time: the runtimes infer on threads of their own.
        self.inference_cpu_seconds += time.process_time() - cpu0
        finished = time.time()
        answers = []
        for row, i in enumerate(inputs):
            job = i.delivery.job
            assert job is not None
            timings = Timings(
                queue_ms=max(0.0, (started - job.enqueued_at) * 1000),
                preprocess_ms=i.preprocess_ms,
                inference_ms=inference_ms,
                total_ms=max(0.0, (finished - job.enqueued_at) * 1000),
                batch_size=len(inputs),
            )
            if probs is None:
                answers.append(self._answer(i.delivery, PredictionStatus.failed, error=error, timings=timings))
                continue
            top = [
                LabelScore(label=label, score=score)
                for label, score in top_k(probs[row], model.labels, model.entry.top_k)
            ]
            answers.append(
                self._answer(
                    i.delivery,
                    PredictionStatus.done,
                    top_k=top,
                    timings=timings,
                    random_weights=model.random_weights,
                )
            )
        return answers

    def _answer(self, d: Delivery, status: PredictionStatus, **fields: object) -> ResultMessage:
        assert d.job is not None
        return ResultMessage.answering(d.job, status, worker_id=self.worker_id, delivery=d.delivery, **fields)

    def stop(self, *_args: object) -> None:
        self.stopping.set()


def resident_mib() -> float | None:
    """This process's resident set size in MiB, from /proc/self/statm; None elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def release_memory() -> None:
    """Hands the memory of dropped models back to the system: a collection frees their objects, and
    glibc's malloc_trim returns the freed heap pages (otherwise kept for reuse by this process)."""
    gc.collect()
    trim_heap()


def main() -> None:
    from model.logs import configure_logging

    settings = load_model_settings("model worker")
    configure_logging(settings.log_level, settings.log_json)
    if settings.cpu_nice:
        os.nice(settings.cpu_nice)
    try:
        worker = Worker(settings)
    except (RegistryUnreadable, ModelRefInvalid) as exc:
        raise SystemExit(f"model worker refuses to start: {exc}") from None
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    try:
        # Before the models load (tens of seconds): refuse an evicting Redis at once.
        worker.check_eviction()
    except REDIS_ERRORS:
        pass  # Redis down: checked again by run() once it answers
    except EvictionPolicyRefused as exc:
        raise SystemExit(f"model worker {worker.worker_id} refuses to start: {exc}") from None
    worker.load_models()
    worker.run()
