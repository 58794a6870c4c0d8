"""``python -m model.explainer``: computes Grad-CAM heatmaps on demand, apart from the predictions.

An explainer holds the Keras graphs of the versions it explains (an OpenVINO or INT8 version is
explained with its Keras twin: ``Registry.keras_twin``) and reads only the ``explain:<twin>``
streams, never a job stream: predictions never wait for a heatmap, and model workers never load a
graph for gradients. Its heartbeat (``explainer:<id>``, listed in ``workers.LIVE_EXPLAINERS``) is
separate from the model workers', so it is never mistaken for one serving predictions. It runs
niced like the workers (``CPU_NICE``): on a shared host the predictions' processes get the CPU
first.

Each answer is cached under ``explanation:<user>:<sha256>:<model>@<version>`` (EXPLANATION_TTL_S)
and pushed to the waiting request's ``explanation:done:<request id>`` list; a request whose answer
is already cached gets it without a computation. A request past its deadline (its caller was
answered 504, "retry: it is cached once computed") is still computed and cached, but not pushed:
dropped, the retry queued again at the back and, under load, was never answered. Every entry
handled is acknowledged and deleted (it holds the image's bytes). A killed explainer's entries stay pending: the others claim them once
idle EXPLAIN_CLAIM_IDLE_S (XAUTOCLAIM), and trim entries older than any deadline can be.

The registry is followed from the serving loop: every RELOAD_CHECK_S an explainer reads the
published revision and, when it changed, builds the twins a new revision serves and drops those it
no longer serves (a retired version's answers are no longer explained). Requests wait while a twin
is built (a few seconds; simpler than the worker's hand-over from a loading thread, and heatmaps
are not on the predictions' path). A version whose model file is not written yet (``make run``
trains it in the background), or broken, is loaded once its file is written or changes, checked
every RELOAD_CHECK_S as well.

A loop that has not come round for SERVING_STALL_S while building no twin (a Grad-CAM that hangs)
withholds the heartbeat, as a model worker's does (``model.stall.LoopWatch``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import cast

import redis

from contracts import keys, registry_live, streams, workers
from contracts.imaging import ImageRejected
from contracts.messages import ExplainerHeartbeat, ExplainRequest, Explanation, ExplanationStatus
from contracts.registry import ModelEntry, Registry, RegistryUnreadable, parse_model_ref, read_registry
from contracts.streams import REDIS_ERRORS
from model.config import ModelRefInvalid, ModelSettings, load_model_settings
from model.gradcam import GradCam, NotExplainable
from model.runtimes import (
    FailedLoads,
    ModelUnavailable,
    configure_tensorflow,
    keras_model,
    load_labels,
    model_stamp,
)
from model.stall import LoopWatch

log = logging.getLogger("model.explainer")

DONE_TTL_S = 60
"""How long an answer waits in its done list for the request that asked (which waits less)."""
MAX_WAIT_S = 120
"""The longest EXPLANATION_WAIT_SECONDS allowed: an entry queued longer ago is past its deadline."""
REAP_EVERY_S = 1.0
"""How often an explainer claims idle pending entries and trims expired ones."""
RELOAD_CHECK_S = 5.0
"""How often an explainer reads the registry's revision (``Explainer.follow_registry``) and looks for
the model files it waits for (``Explainer.load_written``)."""


def twins(registry: Registry, settings: ModelSettings) -> list[ModelEntry]:
    """The Keras twins to load: of every version served (EXPLAIN_MODELS empty) or those named."""
    served = registry.served(benchmark_mode=settings.benchmark_mode)
    found: dict[str, ModelEntry] = {}
    for entry in served:
        twin = registry.keras_twin(entry.key)
        if twin is not None:
            found[twin.key] = twin
    wanted = [parse_model_ref(ref) for ref in settings.explain_models.split(",") if ref.strip()]
    if not wanted:
        return list(found.values())
    return [t for t in found.values() if any(t.name == n and v in (None, t.version) for n, v in wanted)]


class Explainer:
    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.explainer_id = f"explainer-{settings.resolved_worker_id()}"
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=1, socket_timeout=5, health_check_interval=15
        )
        file = registry = read_registry(settings.registry_path)
        self.revision: tuple[str, int] | None = None
        """(source, revision) of the registry snapshot followed; None before one was read."""
        with contextlib.suppress(*REDIS_ERRORS):
            if (snapshot := registry_live.read_snapshot(self.redis)) is not None:
                registry = snapshot.registry
                self.revision = (snapshot.source, snapshot.revision)
        settings.check_explain_models(file, registry)
        self.registry = registry
        self.cams: dict[str, GradCam] = {}
        """By explanation stream."""
        self.not_explainable: dict[str, str] = {}
        """Twins whose model has nothing Grad-CAM can use, with why: in the heartbeat, so the API
        answers 422 for them. Replaced whole, never changed in place (the heartbeat thread reads it)."""
        self.failed = FailedLoads(settings)
        """Twins with a model file whose Grad-CAM could not be built: tried again once the file is
        written or changes (``load_written``)."""
        self.loading: frozenset[str] = frozenset()
        """Twins being built now (``name@version``); replaced whole (the heartbeat thread reads it)."""
        self.stopping = threading.Event()
        self.loop = LoopWatch(process=f"explainer {self.explainer_id}", stall_s=settings.serving_stall_s)
        """When the serving loop last came round, or finished building a twin: the heartbeat
        thread withholds the heartbeat once it is SERVING_STALL_S old (``beat``). Building a twin
        (tens of seconds, more on a busy host) counts as the loop's work, not as a stall."""

    def load(self) -> None:
        configure_tensorflow(self.settings)
        for twin in twins(self.registry, self.settings):
            self._load_twin(twin)

    def _load_twin(self, twin: ModelEntry) -> bool:
        """Builds and warms up the Grad-CAM of one twin; False (logged) when it cannot. A twin with
        a model file then waits in ``failed`` for ``load_written``."""
        start = time.perf_counter()
        # Only a twin with a file of its own can change: the others are not tried again.
        (self.failed.trying if twin.file else self.failed.forget)(twin)
        self.loop.busy = twin.key
        try:
            return self._build_twin(twin, start)
        finally:
            self.loop.turned()  # before ``busy`` is cleared (``LoopWatch.stalled``)
            self.loop.busy = None

    def _build_twin(self, twin: ModelEntry, start: float) -> bool:
        try:
            model, random_weights = keras_model(twin, self.settings)
            if random_weights:
                self.failed.forget(twin)
                return False
            cam = GradCam.build(model, twin, load_labels(twin, self.settings))
            # One computation now: the first request must not pay for tracing the graph.
            spec = twin.input
            import numpy as np

            cam.cam(np.zeros((spec.height, spec.width, 3 if spec.mode == "RGB" else 1), np.float32), 0)
        except NotExplainable as exc:
            log.warning("cannot explain with %s: %s", twin.key, exc)
            self.not_explainable = {**self.not_explainable, twin.key: str(exc)}
            return False
        except ModelUnavailable as exc:
            log.warning("cannot explain with %s: %s", twin.key, exc)
            return False
        except Exception:
            log.exception("cannot explain with %s", twin.key)
            return False
        self.failed.forget(twin)
        self.not_explainable = {k: v for k, v in self.not_explainable.items() if k != twin.key}
        # Replaced whole, never changed in place: the heartbeat thread reads it at any moment.
        self.cams = {**self.cams, keys.explain_stream(twin.name, twin.version): cam}
        log.info(
            "explaining with %s (layer %s), ready in %.1f s", twin.key, cam.layer_name, time.perf_counter() - start
        )
        return True

    def follow_registry(self) -> bool:
        """Brings the twins held in line with the registry's published revision, when it changed:
        builds the twins it serves that are not held, drops those it no longer serves. True when
        the twins held changed. Raises what Redis raises."""
        published = registry_live.published_revision(self.redis)
        if published is None or published == self.revision:
            return False
        snapshot = registry_live.read_snapshot(self.redis)
        if snapshot is None:
            return False
        wanted = {keys.explain_stream(t.name, t.version): t for t in twins(snapshot.registry, self.settings)}
        held = self.cams
        # Said before the revision, so that no heartbeat shows the new revision without them.
        self.loading = frozenset(t.key for s, t in wanted.items() if s not in held and not self.failed.unchanged(t))
        self.registry, self.revision = snapshot.registry, (snapshot.source, snapshot.revision)
        if dropped := {s: c for s, c in held.items() if s not in wanted}:
            self.cams = {s: c for s, c in held.items() if s in wanted}
            log.info(
                "no longer explaining %s: not served in registry revision %d",
                [c.entry.key for c in dropped.values()],
                snapshot.revision,
            )
            for stream in dropped:
                self.answer_queued(stream)
        kept = {t.key for t in wanted.values()}
        self.failed.keep(kept)
        self.not_explainable = {k: v for k, v in self.not_explainable.items() if k in kept}
        loaded = False
        for stream, twin in wanted.items():
            if stream not in held and not self.failed.unchanged(twin):
                loaded |= self._load_twin(twin)
                self.loading = self.loading - {twin.key}
        self.loading = frozenset()
        return loaded or bool(dropped)

    def answer_queued(self, stream: str) -> int:
        """Answers every request still queued on ``stream``, whose twin this explainer let go, as
        not explainable, and deletes them (each holds an image's bytes): their users hear it at
        once instead of waiting out their deadline for an answer that will not come. Returns how
        many. Raises what Redis raises."""
        count = 0
        while entries := cast(list[tuple[bytes, dict[bytes, bytes]]], self.redis.xrange(stream, count=100)):
            for entry_id, fields in entries:
                self.handle(stream, entry_id, fields)
                count += 1
        return count

    def load_written(self) -> bool:
        """Builds the Grad-CAM of each twin that could not be built once its model file is
        written or changes (`make run` trains in the background while the portal serves, an
        operator replaces a broken file); True when one was built."""
        loaded = False
        for twin in self.failed.changed():
            if model_stamp(twin, self.settings) is not None:  # written, not just removed
                loaded |= self._load_twin(twin)
        return loaded

    def heartbeat(self) -> None:
        body = ExplainerHeartbeat(
            explainer_id=self.explainer_id,
            pid=os.getpid(),
            models=[c.entry.key for c in self.cams.values()],
            not_explainable=self.not_explainable,
            loading=sorted(self.loading),
            revision=None if self.revision is None else self.revision[1],
        )
        with self.redis.pipeline(transaction=False) as pipe:
            workers.announce_explainer(
                pipe,
                explainer_id=self.explainer_id,
                heartbeat_json=body.model_dump_json(),
                ttl_ms=int(self.settings.heartbeat_ttl_s * 1000),
                now=time.time(),
            )
            pipe.execute()

    def beat(self) -> bool:
        """One turn of the heartbeat thread: announces the explainer, unless its serving loop has
        not come round for SERVING_STALL_S while building no twin (a Grad-CAM that hangs): then
        its heartbeat lapses, as a stopped explainer's does, so that ``model.health --explainer``
        fails (a liveness probe restarts it) and the API stops sending it requests. Whether it
        announced; raises Redis's errors."""
        if self.loop.stalled():
            return False
        self.heartbeat()
        return True

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.settings.heartbeat_interval_s):
            with contextlib.suppress(*REDIS_ERRORS):
                self.beat()

    def compute(self, stream: str, request: ExplainRequest) -> Explanation:
        base = Explanation(
            model=request.model,
            version=request.version,
            twin=request.twin,
            sha256=request.sha256,
            label=request.label,
            explainer_id=self.explainer_id,
            status=ExplanationStatus.failed,
        )
        cam = self.cams.get(stream)
        served = {entry.key for entry in self.registry.served(benchmark_mode=self.settings.benchmark_mode)}
        if cam is None or f"{request.model}@{request.version}" not in served:
            # A twin also held for another version (an INT8 version's FP32 twin) does not make a
            # retired or disabled version explainable again.
            return base.model_copy(
                update={
                    "status": ExplanationStatus.not_explainable,
                    "error": f"{request.model}@{request.version} is not explained any more (retired or disabled)",
                }
            )
        t0 = time.perf_counter()
        try:
            heat = cam.explain(request.image, request.label)
        except NotExplainable as exc:
            return base.model_copy(update={"status": ExplanationStatus.not_explainable, "error": str(exc)})
        except ImageRejected as exc:
            return base.model_copy(update={"error": exc.message})
        except Exception:
            log.exception("explanation of %s by %s failed", request.sha256, request.twin)
            return base.model_copy(update={"status": ExplanationStatus.error, "error": "the explainer failed"})
        return base.model_copy(
            update={
                "status": ExplanationStatus.ok,
                "layer": cam.layer_name,
                "heatmap": [[round(float(v), 4) for v in row] for row in heat],
                "compute_ms": (time.perf_counter() - t0) * 1000,
            }
        )

    def _cached(self, request: ExplainRequest) -> Explanation | None:
        """The answer another request for the same explanation already cached, if any."""
        if request.owner_id is None:
            return None
        raw = self.redis.get(keys.explanation_key(request.owner_id, request.sha256, request.model, request.version))
        if raw is None:
            return None
        cached = Explanation.model_validate_json(cast(bytes, raw))
        if cached.label != request.label:
            return None
        return cached.model_copy(update={"from_cache": True})

    def handle(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes] | None) -> None:
        # Each request is a turn: reaping or answering many at once is work, not a stall.
        self.loop.turned()
        request = None
        if fields:
            try:
                request = ExplainRequest.from_fields(fields)
            except Exception:
                log.exception("dropping malformed explanation request %s", entry_id)
        answer = None
        # Past its deadline, an answer is worth computing only for the cache a retry reads.
        if request is not None and (request.deadline >= time.time() or request.owner_id is not None):
            answer = self._cached(request) or self.compute(stream, request)
        cached = None
        with self.redis.pipeline(transaction=True) as pipe:
            if request is not None and answer is not None:
                payload = answer.model_dump_json()
                if answer.status == ExplanationStatus.ok and not answer.from_cache and request.owner_id is not None:
                    cached = keys.explanation_key(request.owner_id, request.sha256, request.model, request.version)
                    pipe.set(cached, payload, ex=self.settings.explanation_ttl_s)
                    pipe.exists(keys.deleted_owner_key(request.owner_id))
                if request.deadline >= time.time():
                    done = keys.explanation_done_key(request.request_id)
                    pipe.rpush(done, payload)
                    pipe.expire(done, DONE_TTL_S)
            pipe.xack(stream, keys.EXPLAIN_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            replies = pipe.execute()
        if cached is not None and replies[1]:
            # Its owner was deleted while it was computed: nothing of theirs is kept.
            self.redis.delete(cached)
        if answer is not None:
            log.info(
                "explained %s by %s: %s in %.0f ms%s",
                request.sha256[:12] if request else "?",
                stream,
                answer.status,
                answer.compute_ms,
                " (cached)" if answer.from_cache else "",
            )

    def reap(self) -> None:
        """Frees what dead explainers left: entries older than any deadline are trimmed (the stream
        id is the time it was queued), and entries pending with another consumer for
        EXPLAIN_CLAIM_IDLE_S are claimed and handled (computed and cached; answered if still awaited)."""
        min_id = f"{int((time.time() - MAX_WAIT_S) * 1000)}-0"
        idle_ms = int(self.settings.explain_claim_idle_s * 1000)
        for stream in self.cams:
            self.redis.xtrim(stream, minid=min_id, approximate=False)
            start: bytes | str = "0-0"
            while True:
                reply = cast(
                    list[object],
                    self.redis.xautoclaim(
                        stream, keys.EXPLAIN_GROUP, self.explainer_id, min_idle_time=idle_ms, start_id=start, count=10
                    ),
                )
                # Entries trimmed or deleted meanwhile come back in reply[2] (or with no fields):
                # Redis drops them from the pending list itself.
                start = cast(bytes, reply[0])
                for entry_id, fields in cast(list[tuple[bytes, dict[bytes, bytes] | None]], reply[1]):
                    self.handle(stream, entry_id, fields)
                if start in (b"0-0", "0-0"):
                    break

    def run(self) -> None:
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        ready = False
        started = False
        reaped = forgotten = looked = 0.0
        while not self.stopping.is_set():
            self.loop.turned()
            try:
                if time.monotonic() - looked >= RELOAD_CHECK_S:
                    looked = time.monotonic()
                    if self.follow_registry() | (bool(self.failed) and self.load_written()):
                        ready = False  # the new twins' groups, and the heartbeat naming them
                if not ready:
                    for stream in self.cams:
                        streams.ensure_group(self.redis, stream, keys.EXPLAIN_GROUP)
                    self.heartbeat()
                    ready = True
                    if not started:
                        hb.start()
                        started = True
                        log.info(
                            "explainer %s ready: %s", self.explainer_id, sorted(c.entry.key for c in self.cams.values())
                        )
                if not self.cams:
                    self.stopping.wait(1)
                    continue
                if time.monotonic() - reaped >= REAP_EVERY_S:
                    self.reap()
                    reaped = time.monotonic()
                if time.monotonic() - forgotten >= streams.FORGET_EVERY_S:
                    # Explainers that stopped, each under a name of its own. Noted first: an error
                    # here that does not pass must not keep the explainer from reading.
                    forgotten = time.monotonic()
                    for stream in self.cams:
                        streams.forget_idle_consumers(
                            self.redis, stream, keys.EXPLAIN_GROUP, streams.IDLE_CONSUMER_FORGET_MS
                        )
                response = cast(
                    list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None,
                    self.redis.xreadgroup(
                        keys.EXPLAIN_GROUP, self.explainer_id, {s: ">" for s in self.cams}, count=1, block=1000
                    ),
                )
                for raw_stream, entries in response or []:
                    for entry_id, fields in entries:
                        self.handle(raw_stream.decode(), entry_id, fields)
            except redis.exceptions.ResponseError as exc:
                if streams.group_missing(exc):
                    ready = False
                    continue
                log.exception("redis error")
                self.stopping.wait(1)
            except REDIS_ERRORS as exc:
                log.error("redis unavailable: %s", exc)
                ready = False
                self.stopping.wait(1)
        with contextlib.suppress(*REDIS_ERRORS), self.redis.pipeline(transaction=False) as pipe:
            workers.withdraw_explainer(pipe, explainer_id=self.explainer_id)
            pipe.execute()
        log.info("explainer %s stopped", self.explainer_id)

    def stop(self, *_args: object) -> None:
        self.stopping.set()


def main() -> None:
    from model.logs import configure_logging

    settings = load_model_settings("model explainer")
    configure_logging(settings.log_level, settings.log_json)
    if settings.cpu_nice:
        os.nice(settings.cpu_nice)
    try:
        explainer = Explainer(settings)
    except (RegistryUnreadable, ModelRefInvalid) as exc:
        raise SystemExit(f"model explainer refuses to start: {exc}") from None

    def leave_while_loading(signum: int, _frame: object) -> None:
        # Loading holds no request yet: nothing to finish, and building the graphs (or a weight
        # download that cannot succeed) would keep a supervisor waiting for its stop timeout.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave_while_loading)
    signal.signal(signal.SIGINT, leave_while_loading)
    explainer.load()
    signal.signal(signal.SIGTERM, explainer.stop)
    signal.signal(signal.SIGINT, explainer.stop)
    explainer.run()


if __name__ == "__main__":
    main()
