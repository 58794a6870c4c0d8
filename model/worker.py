"""The model worker: pulls jobs from Redis Streams, batches them per model version, answers.

Delivery is at least once (a job is acknowledged only together with its result, in one
transaction); the API stores each answer once, so a job redelivered after a crash is never
answered twice.
"""

from __future__ import annotations

import contextlib
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

import numpy as np
import redis
import redis.exceptions

from contracts import keys, workers
from contracts.messages import (
    Heartbeat,
    JobMessage,
    LabelScore,
    ModelState,
    PredictionStatus,
    ResultMessage,
    Timings,
)
from contracts.registry import ModelEntry, Registry, load_registry
from model.config import ModelSettings
from model.preprocessing import preprocess
from model.runtimes import LoadedModel, ModelUnavailable, configure_tensorflow, load_model, top_k

log = logging.getLogger("model.worker")

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
RESULT_MAXLEN = 100_000
DEAD_LETTER_MAXLEN = 10_000


@dataclass
class Delivery:
    stream: str
    entry_id: bytes
    job: JobMessage | None
    error: str | None = None
    delivery: int = 1


class Worker:
    def __init__(self, settings: ModelSettings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry or load_registry(settings.registry_path)
        self.entries = settings.served_entries(self.registry)
        self.worker_id = settings.resolved_worker_id()
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=1, socket_timeout=5, health_check_interval=15
        )
        self.models: dict[str, LoadedModel] = {}
        self.states: dict[str, ModelState] = {}
        self.streams: dict[str, LoadedModel] = {}
        self.started_at = time.time()
        self.stopping = threading.Event()
        self._last_outage_log = 0.0
        self._last_reclaim = 0.0
        self.peers = 1
        """Live workers, this one included, as last counted by the heartbeat thread."""

    # --- start-up -------------------------------------------------------------------------

    def load_models(self) -> None:
        configure_tensorflow(self.settings)
        for entry in self.entries:
            start = time.perf_counter()
            try:
                loaded = load_model(entry, self.settings)
                loaded.warm_up(tuple(sorted({1, self.settings.max_batch_size})))
            except ModelUnavailable as exc:
                self.states[entry.key] = ModelState(
                    name=entry.name, version=entry.version, ready=False, reason=str(exc)
                )
                log.warning("model %s unavailable: %s", entry.key, exc)
                continue
            except Exception as exc:  # a broken model must not stop the others from serving
                self.states[entry.key] = ModelState(
                    name=entry.name, version=entry.version, ready=False, reason=f"failed to load: {exc}"
                )
                log.exception("model %s failed to load", entry.key)
                continue
            self.models[entry.key] = loaded
            self.streams[keys.job_stream(entry.name, entry.version)] = loaded
            self.states[entry.key] = ModelState(
                name=entry.name,
                version=entry.version,
                ready=True,
                num_classes=len(loaded.labels),
                random_weights=loaded.random_weights,
            )
            log.info("model %s ready in %.1f s (warmed up)", entry.key, time.perf_counter() - start)

    def ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                # From the start of the stream: jobs enqueued before any worker existed count too.
                self.redis.xgroup_create(stream, keys.JOB_GROUP, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

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

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.settings.heartbeat_interval_s):
            try:
                self.send_heartbeat()
                self.publish_labels(only_missing=True)
                self.peers = max(1, len(workers.live_heartbeats(self.redis)))
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
        if not self.streams:
            log.error("no model could be loaded; serving heartbeats only so operators see why")
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        groups_ready = False
        started = False
        while not self.stopping.is_set():
            try:
                if not groups_ready:
                    self.ensure_groups()
                    self.publish_labels()
                    self.send_heartbeat()
                    groups_ready = True
                    if not started:
                        hb.start()
                        started = True
                        log.info("worker %s serving %s", self.worker_id, sorted(self.models))
                if not self.streams:
                    self.stopping.wait(1)
                    continue
                self.step()
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    groups_ready = False  # Redis lost its data; recreate the groups
                    continue
                log.exception("redis error")
                self.stopping.wait(1)
            except REDIS_ERRORS as exc:
                self._outage(exc)
                groups_ready = False
                self.stopping.wait(1)
        with contextlib.suppress(REDIS_ERRORS), self.redis.pipeline(transaction=False) as pipe:
            workers.withdraw(pipe, worker_id=self.worker_id)
            pipe.execute()
        log.info("worker %s stopped", self.worker_id)

    def step(self) -> None:
        """One round: take over stale jobs, read new ones, fill batches, answer them."""
        batches: dict[str, list[Delivery]] = defaultdict(list)
        if time.monotonic() - self._last_reclaim > min(5.0, self.settings.visibility_timeout_ms / 2000):
            self._last_reclaim = time.monotonic()
            for delivery in self.reclaim():
                batches[delivery.stream].append(delivery)
        if not batches:
            response = self.redis.xreadgroup(
                keys.JOB_GROUP,
                self.worker_id,
                {stream: ">" for stream in self.streams},
                # With peers, start with one job and take a share of the rest in _fill.
                count=self.settings.max_batch_size if self.peers <= 1 else 1,
                block=1000,
            )
            for stream, entries in response or []:
                name = stream.decode() if isinstance(stream, bytes) else stream
                batches[name].extend(self._decode(name, entries))
        for stream, deliveries in batches.items():
            self._fill(stream, deliveries)
            self.process(stream, deliveries)

    def _decode(self, stream: str, entries: list) -> list[Delivery]:  # type: ignore[type-arg]
        out = []
        for entry_id, fields in entries:
            try:
                out.append(Delivery(stream, entry_id, JobMessage.from_fields(fields)))
            except Exception as exc:  # a malformed message is failed, not retried forever
                out.append(Delivery(stream, entry_id, None, error=f"malformed job message: {exc}"))
        return out

    def _fill(self, stream: str, deliveries: list[Delivery]) -> None:
        """Adds the jobs of the same model version already waiting, for up to MAX_BATCH_DELAY_MS.

        Polls without BLOCK: Redis answers a short BLOCK timeout only on its next cron tick
        (every 100 ms at the default hz 10), which cost one request tens of milliseconds.
        """
        deadline = time.monotonic() + self.settings.max_batch_delay_ms / 1000
        target = self._batch_target(stream, len(deliveries))
        while len(deliveries) < target:
            response = self.redis.xreadgroup(
                keys.JOB_GROUP,
                self.worker_id,
                {stream: ">"},
                count=target - len(deliveries),
            )
            for _stream, entries in response or []:
                deliveries.extend(self._decode(stream, entries))
            if not response:
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
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(stream)
        pipe.xpending(stream, keys.JOB_GROUP)
        length, pending = pipe.execute()
        waiting = max(0, int(length) - int(pending["pending"]))
        return max(1, min(self.settings.max_batch_size, math.ceil((waiting + held) / self.peers)))

    def reclaim(self) -> list[Delivery]:
        """Takes over jobs whose worker died; dead-letters those delivered too often."""
        out: list[Delivery] = []
        for stream in self.streams:
            _next, claimed, *_ = self.redis.xautoclaim(
                stream,
                keys.JOB_GROUP,
                self.worker_id,
                min_idle_time=self.settings.visibility_timeout_ms,
                start_id="0-0",
                count=self.settings.max_batch_size,
            )
            for delivery in self._decode(stream, [c for c in claimed if c[1]]):
                info = self.redis.xpending_range(
                    stream, keys.JOB_GROUP, min=delivery.entry_id, max=delivery.entry_id, count=1
                )
                times = int(info[0]["times_delivered"]) if info else 1
                delivery.delivery = times
                if times > self.settings.max_deliveries:
                    self.dead_letter(delivery, times)
                else:
                    log.warning(
                        "reclaimed job %s (delivery %d)",
                        delivery.job.job_id if delivery.job else delivery.entry_id,
                        times,
                        extra={"request_id": delivery.job.request_id if delivery.job else ""},
                    )
                    out.append(delivery)
        return out

    def dead_letter(self, delivery: Delivery, times: int) -> None:
        reason = f"gave up after {times - 1} deliveries: the worker processing it stopped each time"
        log.error("dead-lettering %s: %s", delivery.entry_id, reason)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            keys.DEAD_LETTER_STREAM,
            {
                "stream": delivery.stream,
                "entry_id": delivery.entry_id,
                "reason": reason,
                "meta": delivery.job.model_dump_json() if delivery.job else "",
            },
            maxlen=DEAD_LETTER_MAXLEN,
            approximate=True,
        )
        if delivery.job is not None:
            failed = self._result(delivery.job, PredictionStatus.failed, error=reason, dead_lettered=True)
            pipe.xadd(keys.RESULT_STREAM, failed.to_fields(), maxlen=RESULT_MAXLEN, approximate=True)
        pipe.xack(delivery.stream, keys.JOB_GROUP, delivery.entry_id)
        pipe.execute()

    def _result(self, job: JobMessage, status: PredictionStatus, **kwargs: object) -> ResultMessage:
        return ResultMessage.answering(job, status, worker_id=self.worker_id, **kwargs)

    def process(self, stream: str, deliveries: list[Delivery]) -> None:
        loaded = self.streams[stream]
        entry: ModelEntry = loaded.entry
        started = time.time()
        results: list[tuple[Delivery, ResultMessage]] = []
        inputs: list[tuple[Delivery, np.ndarray, float]] = []
        running = self.redis.pipeline(transaction=False)
        for d in deliveries:
            if d.job is None:
                continue
            if d.job.expired(started):
                results.append((d, self._result(d.job, PredictionStatus.expired, error="deadline passed in the queue")))
                continue
            running.set(keys.job_running_key(d.job.prediction_id), 1, ex=600)
            t0 = time.perf_counter()
            try:
                x = preprocess(d.job.image, entry)
            except Exception as exc:  # one unreadable image fails alone, not its batch
                results.append((d, self._result(d.job, PredictionStatus.failed, error=f"preprocessing failed: {exc}")))
                continue
            inputs.append((d, x, (time.perf_counter() - t0) * 1000))
        running.execute()
        if inputs:
            t0 = time.perf_counter()
            try:
                probs = loaded.predict(np.stack([x for _d, x, _ms in inputs]))
                error = None
            except Exception as exc:
                log.exception("inference failed for %s", entry.key)
                probs, error = None, f"inference failed: {exc}"
            inference_ms = (time.perf_counter() - t0) * 1000
            finished = time.time()
            for i, (d, _x, pre_ms) in enumerate(inputs):
                assert d.job is not None
                timings = Timings(
                    queue_ms=max(0.0, (started - d.job.enqueued_at) * 1000),
                    preprocess_ms=pre_ms,
                    inference_ms=inference_ms,
                    total_ms=max(0.0, (finished - d.job.enqueued_at) * 1000),
                    batch_size=len(inputs),
                )
                if probs is None:
                    results.append((d, self._result(d.job, PredictionStatus.failed, error=error, timings=timings)))
                    continue
                top = [
                    LabelScore(label=label, score=score) for label, score in top_k(probs[i], loaded.labels, entry.top_k)
                ]
                results.append(
                    (
                        d,
                        self._result(
                            d.job,
                            PredictionStatus.done,
                            top_k=top,
                            timings=timings,
                            random_weights=loaded.random_weights,
                        ),
                    )
                )
        self.publish(stream, deliveries, results)
        log.info(
            "answered %d jobs of %s (batch %d)",
            len(results),
            entry.key,
            len(inputs),
            extra={"request_id": ",".join(sorted({d.job.request_id for d in deliveries if d.job}))},
        )

    def publish(self, stream: str, deliveries: list[Delivery], results: list[tuple[Delivery, ResultMessage]]) -> None:
        """Results and acknowledgements in one transaction: a job is never acked without its answer."""
        pipe = self.redis.pipeline(transaction=True)
        for d, result in results:
            result.delivery = d.delivery
            pipe.xadd(keys.RESULT_STREAM, result.to_fields(), maxlen=RESULT_MAXLEN, approximate=True)
        for d in deliveries:
            if d.job is None:
                pipe.xadd(
                    keys.DEAD_LETTER_STREAM,
                    {"stream": stream, "entry_id": d.entry_id, "reason": d.error or ""},
                    maxlen=DEAD_LETTER_MAXLEN,
                    approximate=True,
                )
            pipe.xack(stream, keys.JOB_GROUP, d.entry_id)
            pipe.xdel(stream, d.entry_id)
        pipe.execute()

    def stop(self, *_args: object) -> None:
        self.stopping.set()


def main() -> None:
    from model.logs import configure_logging

    settings = ModelSettings()
    configure_logging(settings.log_level, settings.log_json)
    if settings.cpu_nice:
        os.nice(settings.cpu_nice)
    worker = Worker(settings)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    worker.load_models()
    worker.run()
