"""Verdicts on predictions: what a verdict is for may be deleted while it is being given."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from api.app.feedback import service as feedback_service
from tests.conftest import Users
from tests.images import noise_png

pytestmark = pytest.mark.usefixtures("everything_served")


async def test_a_verdict_on_a_prediction_deleted_meanwhile_is_404(
    client: httpx.AsyncClient, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verdict reads its prediction, then the image is deleted (with its jobs and
    predictions), then the verdict is stored: a 404 that says so, not a generic conflict."""
    _, headers = await users.create()
    image = (await client.post("/v1/images", files={"file": ("a.png", noise_png(91, 16))}, headers=headers)).json()
    r = await client.post(
        "/v1/predictions", json={"image_id": image["id"], "models": ["mobilenet_v2@1"]}, headers=headers
    )
    assert r.status_code == 202, r.text
    job = (await client.get(f"/v1/predictions/{r.json()['job_id']}", headers=headers)).json()
    [prediction] = job["results"]
    owned = feedback_service.owned_prediction

    async def read_then_deleted(**kw: Any) -> Any:
        found = await owned(**kw)
        assert (await client.delete(f"/v1/images/{image['id']}", headers=headers)).status_code == 204
        return found

    monkeypatch.setattr(feedback_service, "owned_prediction", read_then_deleted)
    body = {"prediction_id": prediction["id"], "is_correct": False}
    r = await client.post("/v1/feedback", json=body, headers=headers)
    assert r.status_code == 404 and "deleted meanwhile" in r.json()["detail"], r.text
