"""The explanation queue under pressure: a killed explainer's leftovers, the same heatmap asked
for many times at once, the same image from two users, one user asking for a lot, and an image
gone from the store. Real Redis, real workers; a real explainer where one must compute."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid

import httpx
import pytest
import redis

from api.app.images.storage import LocalBlobStore
from contracts import keys, streams, workers
from contracts.messages import ExplainerHeartbeat, ExplainRequest
from tests.api.conftest import Stack
from tests.api.test_explanations import predict
from tests.api.test_releases import canvas_drawings
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, PASSWORD, login
from tests.support import PHOTOS, start_explainer

STREAM = keys.explain_stream("mobilenet_v2", 1)


def _pretend_an_explainer_is_live(
    client: redis.Redis, twin: str, seconds: float = 30, not_explainable: dict[str, str] | None = None
) -> None:
    """A heartbeat without a process: the API queues requests that nobody reads."""
    body = ExplainerHeartbeat(
        explainer_id="explainer-gone", pid=0, models=[twin], not_explainable=not_explainable or {}
    )
    with client.pipeline(transaction=False) as pipe:
        workers.announce_explainer(
            pipe,
            explainer_id="explainer-gone",
            heartbeat_json=body.model_dump_json(),
            ttl_ms=int(seconds * 1000),
            now=time.time(),
        )
        pipe.execute()


async def _user(client: httpx.AsyncClient, admin: dict[str, str], email: str) -> dict[str, str]:
    r = await client.post("/v1/users", json={"email": email, "password": PASSWORD}, headers=admin)
    assert r.status_code == 201, r.text
    return await login(client, email, PASSWORD)


@pytest.mark.parametrize("own_stack", [{"explanation_queue_limit": 3}], indirect=True)
async def test_a_killed_explainers_requests_are_cleared_and_each_heatmap_is_computed_once_per_user(
    own_stack: Stack,
) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    other = await _user(client, admin, "second@example.com")
    await own_stack.start_workers(1, SERVE_MODELS="mobilenet_v2@1")
    parrot = (PHOTOS / "parrot.jpg").read_bytes()
    mine = await predict(own_stack, admin, parrot, "mobilenet_v2@1")
    theirs = await predict(own_stack, other, parrot, "mobilenet_v2@1")

    # What a killed explainer leaves: a full queue of entries delivered to it and never acknowledged
    # (one still awaited, two past their deadline), each with an image's bytes.
    sync = redis.Redis.from_url(own_stack.redis_server.url)
    streams.ensure_group(sync, STREAM, keys.EXPLAIN_GROUP)
    for deadline in (time.time() - 1, time.time() - 1, time.time() + 30):
        request = ExplainRequest(
            request_id=uuid.uuid4().hex,
            model="mobilenet_v2",
            version=1,
            twin="mobilenet_v2@1",
            sha256=hashlib.sha256(parrot).hexdigest(),
            label="macaw",
            deadline=deadline,
            owner_id=999,  # a user of its own: its answer is cached for them alone
            image=parrot,
        )
        sync.xadd(STREAM, request.to_fields())
    sync.xreadgroup(keys.EXPLAIN_GROUP, "explainer-killed", {STREAM: ">"}, count=10)
    _pretend_an_explainer_is_live(sync, "mobilenet_v2@1", seconds=2)
    r = await client.get(f"/v1/predictions/{mine}/explanation", headers=admin)
    assert r.status_code == 503 and "full" in r.json()["detail"], r.text

    # Another explainer claims them: computes each once (the expired ones for the cache only), answers
    # the awaited one, deletes all.
    own_stack.workers.append(
        start_explainer(
            f"explainer-test-{uuid.uuid4().hex[:6]}",
            own_stack.redis_server.url,
            EXPLAIN_MODELS="mobilenet_v2@1",
            EXPLAIN_CLAIM_IDLE_S="0.5",
        )
    )
    give_up = time.monotonic() + 15
    while sync.xlen(STREAM) or sync.xpending(STREAM, keys.EXPLAIN_GROUP)["pending"]:
        assert time.monotonic() < give_up, (sync.xlen(STREAM), sync.xpending(STREAM, keys.EXPLAIN_GROUP))
        await asyncio.sleep(0.2)

    # Ten requests at once for the same heatmap: one computation, every one answered.
    url = f"/v1/predictions/{mine}/explanation"
    answers = await asyncio.gather(*(client.get(url, headers=admin) for _ in range(10)))
    assert [r.status_code for r in answers] == [200] * 10, [r.text for r in answers]
    assert sum(not r.json()["cached"] for r in answers) == 1

    # The same bytes from another user: computed for them, nothing says the first user sent them.
    r = await client.get(f"/v1/predictions/{theirs}/explanation", headers=other)
    assert r.status_code == 200 and r.json()["cached"] is False, r.text
    r = await client.get(f"/v1/predictions/{theirs}/explanation", headers=other)
    assert r.status_code == 200 and r.json()["cached"] is True, r.text


async def test_a_request_whose_explainer_stops_is_503_once_its_heartbeat_expires(own_stack: Stack) -> None:
    """The only explainer of the twin dies with a request queued: the request is 503 with
    Retry-After a few seconds after the explainer's heartbeat expired, not a 504 after the whole
    EXPLANATION_WAIT_SECONDS (20 s)."""
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="mobilenet_v2@1")
    prediction = await predict(own_stack, admin, (PHOTOS / "parrot.jpg").read_bytes(), "mobilenet_v2@1")
    _pretend_an_explainer_is_live(redis.Redis.from_url(own_stack.redis_server.url), "mobilenet_v2@1", seconds=2)
    started = time.monotonic()
    r = await client.get(f"/v1/predictions/{prediction}/explanation", headers=admin)
    waited = time.monotonic() - started
    assert r.status_code == 503 and "stopped before it answered" in r.json()["detail"], r.text
    assert "Retry-After" in r.headers and waited < 8, waited


@pytest.mark.parametrize(
    "own_stack", [{"explanation_wait_seconds": 3.0, "explanations_in_flight_per_user": 2}], indirect=True
)
async def test_one_user_at_the_cap_waits_others_do_not_and_a_lost_image_is_gone(own_stack: Stack) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    other = await _user(client, admin, "third@example.com")
    await own_stack.start_workers(1, SERVE_MODELS="sketch@3")
    drawings = canvas_drawings("cat", 4)
    ids = [await predict(own_stack, admin, d, "sketch@3") for d in drawings[:3]]
    theirs = await predict(own_stack, other, drawings[3], "sketch@3")
    sync = redis.Redis.from_url(own_stack.redis_server.url)
    _pretend_an_explainer_is_live(sync, "sketch@3")

    async def ask(prediction_id: str, headers: dict[str, str]) -> httpx.Response:
        return await client.get(f"/v1/predictions/{prediction_id}/explanation", headers=headers)

    # Two of mine wait for an explainer (none reads the queue): a third is refused at once.
    waiting = [asyncio.create_task(ask(i, admin)) for i in ids[:2]]
    await asyncio.sleep(1.0)
    r = await ask(ids[2], admin)
    assert r.status_code == 429 and "Retry-After" in r.headers, r.text
    # Another user is still let in: queued, then 504 as nobody answers.
    r = await ask(theirs, other)
    assert r.status_code == 504 and r.headers["Retry-After"] == "5", (r.text, r.headers)
    assert [t.status_code for t in await asyncio.gather(*waiting)] == [504, 504]

    # The image's blob gone from the store: 410 with a reason, not a 500.
    store: LocalBlobStore = own_stack.app.state.store
    sha256 = hashlib.sha256(drawings[2]).hexdigest()
    await store.delete(sha256)
    r = await ask(ids[2], admin)
    assert r.status_code == 410 and "no longer stored" in r.json()["detail"], r.text

    # An explainer that found nothing to explain with in the twin (no convolutional layer): 422
    # with why, at once, not 503 "retry shortly" for ever.
    _pretend_an_explainer_is_live(sync, "", not_explainable={"sketch@3": "sequential has no convolutional layer"})
    r = await ask(theirs, other)
    assert r.status_code == 422 and "no convolutional layer" in r.json()["detail"], r.text
