"""An explainer loads a version whose model file is written, or written again, after it started, and
follows the registry: a version registered later is explained, a retired one let go."""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from PIL import Image

from contracts import keys, streams, workers
from contracts.messages import ExplainerHeartbeat, ExplainRequest, Explanation, ExplanationStatus
from model.config import ModelSettings
from model.explainer import Explainer, twins
from tests.images import encode
from tests.model.test_worker_registry import entry, publish
from tests.support import QUICK_STALL, RedisServer, hanging_until, model_health_passes, wait_until


def blank_drawing_request(label: str, *, sha256: str, deadline: float, owner_id: int) -> ExplainRequest:
    """A request to explain ``label`` for a blank 280-pixel canvas by sketch@1."""
    return ExplainRequest(
        request_id=uuid.uuid4().hex,
        model="sketch",
        version=1,
        twin="sketch@1",
        sha256=sha256,
        label=label,
        deadline=deadline,
        owner_id=owner_id,
        image=encode(Image.new("L", (280, 280), 255), "PNG"),
    )


def test_a_version_trained_after_the_start_is_explained_once_written(
    private_redis: RedisServer, tmp_path: Path, model_settings: ModelSettings
) -> None:
    """`make run` trains in the background while the portal serves: an explainer that started
    before a version's model file was written waits for it, then builds its Grad-CAM; one that
    found a broken file builds it once the file is written again."""
    settings = model_settings.model_copy(
        update={"redis_url": private_redis.url, "trained_dir": tmp_path, "explain_models": "sketch@1,sketch@2"}
    )
    broken = tmp_path / "sketch" / "v2"
    shutil.copytree(model_settings.trained_dir / "sketch" / "v2", broken)
    whole = (broken / "model.keras").read_bytes()
    (broken / "model.keras").write_bytes(whole[:300_000])
    explainer = Explainer(settings)
    explainer.load()
    first, second = keys.explain_stream("sketch", 1), keys.explain_stream("sketch", 2)
    assert not explainer.cams and sorted(explainer.failed) == ["sketch@1", "sketch@2"]
    assert not explainer.load_written()

    shutil.copytree(model_settings.trained_dir / "sketch" / "v1", tmp_path / "sketch" / "v1")
    assert explainer.load_written()
    assert list(explainer.cams) == [first] and list(explainer.failed) == ["sketch@2"]

    (broken / "model.tmp.keras").write_bytes(whole)
    os.replace(broken / "model.tmp.keras", broken / "model.keras")
    assert explainer.load_written()
    assert sorted(explainer.cams) == sorted([first, second]) and not explainer.failed


def test_an_explainer_follows_the_registry_without_a_restart(
    private_redis: RedisServer, model_settings: ModelSettings
) -> None:
    """A version registered after the explainer started is explained once its revision is
    published; a version retired is let go (the API then says it is not explained any more)."""
    settings = model_settings.model_copy(update={"redis_url": private_redis.url, "explain_models": ""})
    first, second = keys.explain_stream("sketch", 1), keys.explain_stream("sketch", 2)
    assert publish(private_redis.url, 1, [entry("sketch@1")])
    explainer = Explainer(settings)
    explainer.load()
    assert list(explainer.cams) == [first]
    assert not explainer.follow_registry()  # the same revision: nothing to do

    assert publish(private_redis.url, 2, [entry("sketch@1"), entry("sketch@2", "canary")])
    assert explainer.follow_registry()
    assert sorted(explainer.cams) == sorted([first, second])

    # Requests queued for sketch@1 when it is retired are answered "not explainable" at once and
    # deleted, not left to wait out their deadline (each holds an image's bytes).
    client = redis.Redis.from_url(private_redis.url)
    streams.ensure_group(client, first, keys.EXPLAIN_GROUP)
    queued = [
        ExplainRequest(
            request_id=uuid.uuid4().hex,
            model="sketch",
            version=1,
            twin="sketch@1",
            sha256="0" * 64,
            label="cat",
            deadline=time.time() + 30,
            owner_id=1,
            image=b"not read",
        )
        for _ in range(3)
    ]
    for request in queued:
        client.xadd(first, request.to_fields())
    assert publish(private_redis.url, 3, [entry("sketch@1", "retired"), entry("sketch@2")])
    assert explainer.follow_registry()
    assert list(explainer.cams) == [second]
    assert client.xlen(first) == 0
    for request in queued:
        raw = client.lpop(keys.explanation_done_key(request.request_id))
        assert isinstance(raw, bytes), raw
        answer = Explanation.model_validate_json(raw)
        assert answer.status == ExplanationStatus.not_explainable and "retired" in str(answer.error), answer


def test_a_disabled_version_is_not_explained_by_a_twin_another_version_keeps(
    private_redis: RedisServer, model_settings: ModelSettings
) -> None:
    """An INT8 version is explained with the FP32 version it was quantized from; disabled, it is
    not explained any more, although that twin stays loaded for the FP32 version itself."""
    settings = model_settings.model_copy(update={"redis_url": private_redis.url, "explain_models": ""})
    quantized = entry("sketch@2", "canary").model_copy(
        update={
            "version": 9,
            "runtime": "openvino",
            "precision": "int8",
            "quantized_from": "sketch@1",
            "file": "{trained_dir}/sketch/v9/model.xml",
        }
    )
    assert publish(private_redis.url, 1, [entry("sketch@1"), quantized])
    explainer = Explainer(settings)
    explainer.load()
    stream = keys.explain_stream("sketch", 1)
    assert list(explainer.cams) == [stream]
    drawing = encode(Image.new("L", (28, 28), 255), "PNG")

    def ask(version: int) -> Explanation:
        request = ExplainRequest(
            request_id=uuid.uuid4().hex,
            model="sketch",
            version=version,
            twin="sketch@1",
            sha256="0" * 64,
            label="cat",
            deadline=time.time() + 30,
            owner_id=1,
            image=drawing,
        )
        return explainer.compute(stream, request)

    assert ask(9).status == ExplanationStatus.ok
    assert publish(private_redis.url, 2, [entry("sketch@1"), quantized.model_copy(update={"enabled": False})])
    assert not explainer.follow_registry()  # the twins held stay as they are
    assert explainer.revision == ("test", 2)
    assert list(explainer.cams) == [stream]
    answer = ask(9)
    assert answer.status == ExplanationStatus.not_explainable and "sketch@9" in str(answer.error), answer
    assert ask(1).status == ExplanationStatus.ok


def test_a_model_grad_cam_cannot_use_is_reported_as_not_explainable(
    private_redis: RedisServer, tmp_path: Path, model_settings: ModelSettings
) -> None:
    """A version without a convolutional layer is served but has nothing to explain with: the
    heartbeat says so with why, so the API answers 422 instead of waiting (503) for an explainer
    that would hold it; written again as a network Grad-CAM can use, it is explained."""
    import keras

    settings = model_settings.model_copy(
        update={"redis_url": private_redis.url, "trained_dir": tmp_path, "explain_models": "sketch@1"}
    )
    folder = tmp_path / "sketch" / "v1"
    shutil.copytree(model_settings.trained_dir / "sketch" / "v1", folder)
    real = (folder / "model.keras").read_bytes()
    labels = len((folder / "labels.txt").read_text().split())
    dense = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(labels)])
    dense.save(folder / "model.tmp.keras")
    os.replace(folder / "model.tmp.keras", folder / "model.keras")
    explainer = Explainer(settings)
    explainer.load()
    assert not explainer.cams and list(explainer.not_explainable) == ["sketch@1"]
    explainer.heartbeat()
    raw = redis.Redis.from_url(private_redis.url).get(keys.explainer_key(explainer.explainer_id))
    assert isinstance(raw, bytes), raw
    beat = ExplainerHeartbeat.model_validate_json(raw)
    assert beat.models == [] and "convolutional" in beat.not_explainable["sketch@1"], beat

    (folder / "model.tmp.keras").write_bytes(real)
    os.replace(folder / "model.tmp.keras", folder / "model.keras")
    assert explainer.load_written()
    assert list(explainer.cams) == [keys.explain_stream("sketch", 1)] and not explainer.not_explainable


def test_an_explainer_announces_itself_in_the_index_and_withdraws_when_it_stops(
    private_redis: RedisServer, model_settings: ModelSettings
) -> None:
    """The API and the healthcheck find explainers through ``workers.LIVE_EXPLAINERS``, never by
    a scan of the keyspace: an explainer is listed there with its heartbeat, and gone from both
    once it stops."""
    explainer = Explainer(model_settings.model_copy(update={"redis_url": private_redis.url}))
    client = redis.Redis.from_url(private_redis.url)
    explainer.heartbeat()
    assert [b.explainer_id for b in workers.live_explainer_heartbeats(client)] == [explainer.explainer_id]
    assert 0 < client.pttl(keys.explainer_key(explainer.explainer_id)) <= model_settings.heartbeat_ttl_s * 1000
    explainer.stop()
    explainer.run()
    assert workers.live_explainer_heartbeats(client) == []
    assert client.zcard(workers.LIVE_EXPLAINERS) == 0 and not client.exists(keys.explainer_key(explainer.explainer_id))


def test_a_failure_inside_the_explainer_is_answered_without_its_details(
    private_redis: RedisServer, model_settings: ModelSettings
) -> None:
    """A fault of the explainer's own is said as such (the API makes it a 502), never with its
    exception's text, which is for the operators' logs."""
    settings = model_settings.model_copy(update={"redis_url": private_redis.url, "explain_models": "sketch@1"})
    explainer = Explainer(settings)
    explainer.load()
    stream = keys.explain_stream("sketch", 1)
    cam = explainer.cams[stream]

    def broken(*_args: object) -> None:
        raise RuntimeError("internal detail: /srv/secret/path")

    cam.cam = broken  # type: ignore[method-assign,assignment]
    request = blank_drawing_request(cam.labels[0], sha256="0" * 64, deadline=time.time() + 30, owner_id=1)
    answer = explainer.compute(stream, request)
    assert answer.status == ExplanationStatus.error and answer.error == "the explainer failed", answer


def test_a_request_past_its_deadline_is_computed_for_the_cache_not_answered(
    private_redis: RedisServer, model_settings: ModelSettings
) -> None:
    """A request whose caller already got 504 ("retry: it is cached once computed") is computed
    and cached, so the retry is answered from the cache; nothing is pushed to its done list,
    which nobody reads. Dropped, the retry queued again at the back and, under load, never got
    an answer."""
    settings = model_settings.model_copy(update={"redis_url": private_redis.url, "explain_models": "sketch@1"})
    explainer = Explainer(settings)
    explainer.load()
    stream = keys.explain_stream("sketch", 1)
    client = redis.Redis.from_url(private_redis.url)
    streams.ensure_group(client, stream, keys.EXPLAIN_GROUP)
    request = blank_drawing_request(
        explainer.cams[stream].labels[0], sha256="1" * 64, deadline=time.time() - 1, owner_id=7
    )
    client.xadd(stream, request.to_fields())
    [(entry_id, fields)] = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream))
    explainer.handle(stream, entry_id, fields)
    raw = client.get(keys.explanation_key(7, request.sha256, "sketch", 1))
    assert isinstance(raw, bytes), raw
    assert Explanation.model_validate_json(raw).status == ExplanationStatus.ok
    assert not client.exists(keys.explanation_done_key(request.request_id))
    assert client.xlen(stream) == 0


def test_an_explanation_computed_after_its_owner_was_deleted_is_answered_not_cached(
    private_redis: RedisServer, model_settings: ModelSettings
) -> None:
    """The owner deleted while the heatmap was computed (the API set ``deleted_owner_key`` and
    deleted their keys): it was cached for a week all the same. The waiting request still gets it."""
    settings = model_settings.model_copy(update={"redis_url": private_redis.url, "explain_models": "sketch@1"})
    explainer = Explainer(settings)
    explainer.load()
    stream = keys.explain_stream("sketch", 1)
    client = redis.Redis.from_url(private_redis.url)
    streams.ensure_group(client, stream, keys.EXPLAIN_GROUP)
    label = explainer.cams[stream].labels[0]
    for owner in (8, 9):
        request = blank_drawing_request(label, sha256="2" * 64, deadline=time.time() + 30, owner_id=owner)
        if owner == 8:
            client.set(keys.deleted_owner_key(owner), "1")
        client.xadd(stream, request.to_fields())
        [(entry_id, fields)] = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream))
        explainer.handle(stream, entry_id, fields)
        assert client.llen(keys.explanation_done_key(request.request_id)) == 1
        cached = client.exists(keys.explanation_key(owner, request.sha256, "sketch", 1))
        assert cached == (owner != 8), owner


def test_an_explainer_whose_serving_loop_hangs_lets_its_heartbeat_lapse_and_beats_again_once_it_runs(
    private_redis: RedisServer, model_settings: ModelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Grad-CAM that hangs while the heartbeat thread runs: within SERVING_STALL_S plus the
    heartbeat's TTL the explainer is no longer live (``model.health --explainer`` fails, so a
    liveness probe restarts it, and the API stops counting on it), where its thread kept it
    announced for good. Once the computation returns, the request is answered and the explainer
    is live again."""
    settings = model_settings.model_copy(
        update={
            "redis_url": private_redis.url,
            "explain_models": "sketch@1",
            "worker_id": f"hanging-{time.monotonic_ns()}",
            **QUICK_STALL,
        }
    )
    explainer = Explainer(settings)
    explainer.load()
    stream = keys.explain_stream("sketch", 1)
    cam = explainer.cams[stream]
    release = threading.Event()
    monkeypatch.setattr(cam, "cam", hanging_until(release, cam.cam))
    serving = threading.Thread(target=explainer.run, name="serving", daemon=True)
    client = redis.Redis.from_url(private_redis.url)

    def live() -> bool:
        return any(b.explainer_id == explainer.explainer_id for b in workers.live_explainer_heartbeats(client))

    def healthy() -> bool:
        return model_health_passes(private_redis.url, settings.worker_id, "--explainer")

    try:
        serving.start()
        wait_until(live, 30, "the explainer to announce itself")
        time.sleep(2.5)  # idle past SERVING_STALL_S: waiting for requests is the loop coming round
        assert live() and healthy()
        request = blank_drawing_request(cam.labels[0], sha256="2" * 64, deadline=time.time() + 60, owner_id=3)
        client.xadd(stream, request.to_fields())
        wait_until(lambda: not live(), 10, "the hung explainer's heartbeat to lapse")
        assert not healthy()
        release.set()
        wait_until(
            lambda: client.llen(keys.explanation_done_key(request.request_id)) == 1,
            30,
            "the request to be answered once the computation returned",
        )
        wait_until(live, 10, "the explainer to announce itself again")
    finally:
        release.set()
        explainer.stop()
        serving.join(30)


def slow_and_beating(explainer: Explainer, call: Callable[..., Any], seconds: float, beats: list[bool]) -> Any:
    """``call``, made to take ``seconds`` more and then to note in ``beats`` whether the
    explainer's heartbeat thread would announce it at that moment (``Explainer.beat``)."""

    def slow(*args: Any) -> Any:
        time.sleep(seconds)
        beats.append(explainer.beat())
        return call(*args)

    return slow


def test_building_a_twin_is_no_stall(
    private_redis: RedisServer, model_settings: ModelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A twin built from the serving loop (a new registry revision, a model file written) takes
    tens of seconds on a busy host: the explainer stays announced meanwhile."""
    settings = model_settings.model_copy(
        update={"redis_url": private_redis.url, "explain_models": "sketch@1", "serving_stall_s": 0.5}
    )
    explainer = Explainer(settings)
    [twin] = twins(explainer.registry, settings)
    beats: list[bool] = []
    monkeypatch.setattr(explainer, "_build_twin", slow_and_beating(explainer, explainer._build_twin, 1.0, beats))
    assert explainer._load_twin(twin)
    assert beats == [True] and explainer.beat()
    time.sleep(1.0)
    assert not explainer.beat(), "an idle loop that stopped coming round still beat"


def test_answering_many_requests_in_one_turn_is_no_stall(
    private_redis: RedisServer, model_settings: ModelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reaping what a dead explainer left (or answering a let-go twin's queue) handles many
    requests in one turn of the loop: each is the loop's work, so the explainer stays announced
    throughout, though together they take longer than SERVING_STALL_S."""
    settings = model_settings.model_copy(
        update={
            "redis_url": private_redis.url,
            "explain_models": "sketch@1",
            "serving_stall_s": 0.5,
            "explain_claim_idle_s": 0.05,
        }
    )
    explainer = Explainer(settings)
    explainer.load()
    stream = keys.explain_stream("sketch", 1)
    cam = explainer.cams[stream]
    beats: list[bool] = []
    monkeypatch.setattr(cam, "cam", slow_and_beating(explainer, cam.cam, 0.3, beats))
    client = redis.Redis.from_url(private_redis.url)
    streams.ensure_group(client, stream, keys.EXPLAIN_GROUP)
    for i in range(5):
        request = blank_drawing_request(cam.labels[0], sha256=f"{i}" * 64, deadline=time.time() + 60, owner_id=5)
        client.xadd(stream, request.to_fields())
    client.xreadgroup(keys.EXPLAIN_GROUP, "explainer-gone", {stream: ">"}, count=5)  # left by a dead one
    time.sleep(0.1)
    explainer.loop.turned()
    explainer.reap()
    assert beats == [True] * 5, beats
