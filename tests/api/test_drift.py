"""Drift: a photo model fed sketches drifts past the alert threshold; fed more photos like its
first ones, it does not. Real workers, real pixels, small windows."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from api.app.drift import service
from api.app.drift.models import DriftSignal
from api.app.images.models import Image as ImageRow
from api.app.main import create_app
from contracts import keys
from contracts.registry import ModelEntry
from tests.api.conftest import Stack
from tests.api.test_drift_binning import PIXEL_SIGNALS, answered_rows
from tests.api.test_releases import canvas_drawings
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, client_for, login
from tests.support import PHOTOS

PER_PHOTO = 8
BASE_PHOTOS = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".jpg", ".bmp"))
WINDOW = PER_PHOTO * len(BASE_PHOTOS)
"""Both windows hold as many predictions: each shared photo PER_PHOTO times, cropped and flipped."""
SETTINGS = {"drift_reference_size": WINDOW, "drift_window_size": WINDOW, "drift_bins": 4}
"""Four bins: with windows of ~100, PSI's sampling floor, (bins - 1)(1/n + 1/m), stays near 0.06."""
SKETCH_CATEGORIES = ("cat", "fish", "apple", "house", "star", "clock", "bicycle", "flower")


def photos_like_the_reference(seed: int) -> list[bytes]:
    """Each shared photo PER_PHOTO times, randomly cropped (60-100 % of each side) and flipped:
    the same distribution for every seed, never the same bytes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(PER_PHOTO):
        for path in BASE_PHOTOS:
            img = Image.open(path).convert("RGB")
            w, h = img.size
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.crop((left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def test_psi_is_zero_for_the_same_distribution_and_grows_with_a_shift() -> None:
    assert service.psi([0.5, 0.5], [0.5, 0.5]) == 0
    # (0.9 - 0.5) ln(0.9 / 0.5) + (0.1 - 0.5) ln(0.1 / 0.5), worked by hand.
    assert service.psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * np.log(1.8) - 0.4 * np.log(0.2))
    assert service.psi([1.0, 0.0], [0.0, 1.0]) > 10  # empty bins count EPSILON, not zero
    binned = service.bin_numeric(list(range(100)), list(range(100)), 4)
    # Four reference quartiles, between the bins below its minimum and above its maximum.
    assert binned.psi == 0 and binned.reference[1:-1] == pytest.approx([25 / 101] * 4)
    binned = service.bin_categorical(["a"] * 20 + ["b"], ["c"] * 20, 3)
    assert binned.labels == ["a", "c", "other"] and binned.window == [0, 1.0, 0]
    # A fixed set of categories that holds every answer: no "other" bin at 0 % against 0 %.
    binned = service.bin_categorical(["red"] * 5 + ["grey"], ["grey"] * 6, 3, fixed=["red", "grey", "blue"])
    assert binned.labels == ["red", "grey", "blue"] and binned.window == [0, 1.0, 0]


async def _send(stack: Stack, headers: dict[str, str], images: list[bytes]) -> None:
    for data in images:
        r = await stack.client.post(
            "/model/predict", params={"models": "mobilenet_v2@1"}, files={"file": ("i.jpg", data)}, headers=headers
        )
        assert r.status_code == 200, r.text


def _gauge(signal: str) -> float | None:
    return REGISTRY.get_sample_value("portal_drift_psi", {"model": "mobilenet_v2", "version": "1", "signal": signal})


@pytest.mark.parametrize("own_stack", [SETTINGS], indirect=True)
async def test_sketches_move_a_photo_models_drift_index_past_the_alert_and_photos_do_not(own_stack: Stack) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="mobilenet_v2@1")
    await _send(own_stack, admin, photos_like_the_reference(seed=1))
    r = await client.get("/v1/admin/drift", params={"refresh": True}, headers=admin)
    assert r.status_code == 200 and r.json()["versions"] == [], r.text  # no window yet

    await _send(own_stack, admin, photos_like_the_reference(seed=2))
    r = await client.get("/v1/admin/drift", params={"refresh": True}, headers=admin)
    assert r.status_code == 200, r.text
    (version,) = r.json()["versions"]
    assert version["reference_count"] == WINDOW and version["window_count"] == WINDOW
    signals = {s["signal"]: s for s in version["signals"]}
    assert set(signals) == set(service.SIGNALS)
    assert version["max_psi"] < service.ALERT, {k: round(s["psi"], 3) for k, s in signals.items()}
    assert _gauge("brightness") == pytest.approx(signals["brightness"]["psi"])
    # Refreshes at once (admins, the background task), in one API process or in two, never delete
    # what another just wrote.
    async for other in client_for(create_app(own_stack.app.state.settings)):
        for _ in range(3):
            answers = await asyncio.gather(
                *(c.get("/v1/admin/drift", params={"refresh": True}, headers=admin) for c in [client, other] * 5)
            )
            assert [len(r.json()["versions"]) for r in answers] == [1] * 10, [r.text[:200] for r in answers]
            assert len((await client.get("/v1/admin/drift", headers=admin)).json()["versions"]) == 1

    sketches = [d for c in SKETCH_CATEGORIES for d in canvas_drawings(c, WINDOW // len(SKETCH_CATEGORIES) + 1)]
    await _send(own_stack, admin, sketches[:WINDOW])
    r = await client.get("/v1/admin/drift", params={"refresh": True}, headers=admin)
    (version,) = r.json()["versions"]
    signals = {s["signal"]: s for s in version["signals"]}
    assert version["status"] == "drift" and version["max_psi"] >= service.ALERT
    # What moved: black-on-white 28-pixel greyscale drawings, and the answers they get.
    for signal in ("brightness", "colour", "width", "predicted_class"):
        assert signals[signal]["psi"] >= service.ALERT, (signal, signals[signal])
    colour = {b["label"]: b for b in signals["colour"]["bins"]}
    assert colour["greyscale"]["window"] == 1.0
    assert _gauge("brightness") == pytest.approx(signals["brightness"]["psi"])

    # Early uploads deleted: the reference, kept once full, neither shrinks nor moves.
    async with own_stack.app.state.sessionmaker() as session:
        oldest = list(await session.scalars(select(ImageRow.id).order_by(ImageRow.created_at).limit(10)))
    for image_id in oldest:
        assert (await client.delete(f"/v1/images/{image_id}", headers=admin)).status_code == 204
    r = await client.get("/v1/admin/drift", params={"refresh": True}, headers=admin)
    (after,) = r.json()["versions"]
    assert after["reference_count"] == WINDOW
    kept = {s["signal"]: [b["reference"] for b in s["bins"]] for s in after["signals"]}
    assert kept == {name: [b["reference"] for b in s["bins"]] for name, s in signals.items()}
    # Nor does a process told another DRIFT_REFERENCE_SIZE take it again.
    smaller = own_stack.app.state.settings.model_copy(update={"drift_reference_size": WINDOW // 2})
    async for other in client_for(create_app(smaller)):
        r = await other.get("/v1/admin/drift", params={"refresh": True}, headers=admin)
        (version,) = r.json()["versions"]
        assert version["reference_count"] == WINDOW, version


async def test_indices_of_versions_no_longer_computed_are_deleted_and_stop_reporting(own_stack: Stack) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    # The API's own periodic refresh would delete the stored index before it is read as stored:
    # its lock held, it takes this test's turn as another process's.
    await own_stack.app.state.redis.set(keys.DRIFT_LOCK, "1", px=120_000)
    try:
        old = datetime.now(UTC) - timedelta(hours=2)
        async with own_stack.app.state.sessionmaker() as session:
            session.add(
                DriftSignal(
                    model_name="mobilenet_v2",
                    model_version=1,
                    signal="brightness",
                    psi=0.9,
                    reference_count=10,
                    window_count=10,
                    bins=[],
                    computed_at=old,
                )
            )
            await session.commit()
            service.export_gauges(await service.stored(session=session))
        assert _gauge("brightness") == 0.9
        # Read as stored, it says how old it is.
        r = await client.get("/v1/admin/drift", headers=admin)
        (version,) = r.json()["versions"]
        assert version["age_seconds"] >= 7000, version
        # Computed now, the version has no windows (no answers here): its index and gauge go.
        r = await client.get("/v1/admin/drift", params={"refresh": True}, headers=admin)
        assert r.status_code == 200 and r.json()["versions"] == [], r.text
        assert _gauge("brightness") is None
    finally:
        await own_stack.app.state.redis.delete(keys.DRIFT_LOCK)


@pytest.mark.parametrize("own_stack", [{"drift_bins": 5}], indirect=True)
async def test_a_signal_with_a_reference_of_a_few_values_is_shown_with_why_and_raises_no_alarm(
    own_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an upgrade, 3 of the reference's 500 pictures have pixel statistics: their signals are
    listed with both counts and why they have no index, and no gauge (so no alert); the others are
    compared as before."""
    rng = np.random.default_rng(31)
    reference, window = answered_rows(rng, 500, pixel_stats=3), answered_rows(rng, 500)

    async def given(
        *, session: AsyncSession, entry: ModelEntry, reference_size: int, window_size: int
    ) -> tuple[list[service.Row], list[service.Row]] | None:
        return (reference, window) if (entry.name, entry.version) == ("mobilenet_v2", 1) else None

    monkeypatch.setattr(service, "windows", given)
    admin = await login(own_stack.client, ADMIN_EMAIL, ADMIN_PASSWORD)
    needed = service.min_values(5)
    for refresh in (True, False):  # as computed, then as stored
        r = await own_stack.client.get("/v1/admin/drift", params={"refresh": refresh}, headers=admin)
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["min_values"] == needed
        (version,) = report["versions"]
        assert (version["reference_count"], version["window_count"]) == (500, 500)
        signals = {s["signal"]: s for s in version["signals"]}
        assert set(signals) == set(service.SIGNALS)
        for signal in PIXEL_SIGNALS:
            assert signals[signal] == {
                "signal": signal,
                "psi": None,
                "status": service.NOT_COMPARED,
                "reference_count": 3,
                "window_count": 500,
                "reason": f"reference holds 3 values; at least {needed} needed",
                "bins": [],
            }
            assert _gauge(signal) is None
        for signal in set(service.SIGNALS) - set(PIXEL_SIGNALS):
            s = signals[signal]
            assert s["reason"] is None and (s["reference_count"], s["window_count"]) == (500, 500), s
            assert s["psi"] < service.ALERT and s["bins"], s
        assert version["max_psi"] == max(s["psi"] for s in signals.values() if s["psi"] is not None)
        assert version["status"] != "drift"
        assert _gauge("width") == pytest.approx(signals["width"]["psi"])


async def test_a_refresh_refuses_a_session_whose_statements_each_commit(own_stack: Stack) -> None:
    """Its advisory lock lasts until its commit: on a read session (AUTOCOMMIT) it would be let go
    at once, and refreshes in two API processes would delete what the other just wrote."""
    async with own_stack.app.state.read_sessionmaker() as session:
        with pytest.raises(ValueError, match="AUTOCOMMIT"):
            await service.refresh(session=session, entries=[], reference_size=10, window_size=10, bins=4)
    async with own_stack.app.state.sessionmaker() as session:
        assert await service.refresh(session=session, entries=[], reference_size=10, window_size=10, bins=4) == 0


async def test_a_refresh_takes_one_connection_of_the_pool(own_stack: Stack) -> None:
    """Its reads go on the connection of its transaction: refreshes each holding one and waiting for
    a second would hold the whole pool until its timeout (503 for every request meanwhile)."""
    settings = own_stack.app.state.settings.model_copy(update={"db_pool_size": 1})
    async for client in client_for(create_app(settings)):
        admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
        r = await client.get("/v1/admin/drift", params={"refresh": True}, headers=admin)
        assert r.status_code == 200, r.text


async def test_a_refresh_waits_for_another_longer_than_the_command_timeout(own_stack: Stack) -> None:
    """Waiting for another process's refresh is not an outage: the lock is asked for again and
    again, never waited for in one statement that the driver's command timeout would cut (503)."""
    engine = create_async_engine(
        own_stack.app.state.settings.database_url, connect_args={"command_timeout": 1}, poolclass=NullPool
    )
    lock = text("SELECT pg_advisory_xact_lock(hashtextextended('drift-refresh', 0))")
    try:
        async with own_stack.app.state.sessionmaker() as holder, async_sessionmaker(engine)() as waiter:
            await holder.execute(lock)
            refresh = asyncio.create_task(
                service.refresh(session=waiter, entries=[], reference_size=10, window_size=10, bins=4)
            )
            await asyncio.sleep(2.5)
            assert not refresh.done(), refresh
            await holder.commit()
            assert await asyncio.wait_for(refresh, 5) == 0
    finally:
        await engine.dispose()


async def test_a_refresh_gives_up_on_a_refresh_that_never_ends(
    own_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never a hang: past REFRESH_LOCK_WAIT_SECONDS of waiting for another refresh, 409 with Retry-After."""
    monkeypatch.setattr(service, "REFRESH_LOCK_WAIT_SECONDS", 1.0)
    lock = text("SELECT pg_advisory_xact_lock(hashtextextended('drift-refresh', 0))")
    async with own_stack.app.state.sessionmaker() as holder:
        await holder.execute(lock)
        admin = await login(own_stack.client, ADMIN_EMAIL, ADMIN_PASSWORD)
        r = await asyncio.wait_for(
            own_stack.client.get("/v1/admin/drift", params={"refresh": True}, headers=admin), timeout=10
        )
        assert r.status_code == 409 and r.headers["retry-after"] == "30", r.text
        assert "Another drift refresh" in r.json()["detail"]
        await holder.rollback()
    r = await own_stack.client.get("/v1/admin/drift", params={"refresh": True}, headers=admin)
    assert r.status_code == 200, r.text
