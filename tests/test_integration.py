"""Black-box check of a running portal: log in as the first admin, upload a real photo, get a
prediction, send feedback, read it back.

Against a deployed portal: ``PORTAL_URL=http://host:8000 PORTAL_ADMIN_PASSWORD=... pytest
tests/test_integration.py``. Without PORTAL_URL, the suite starts the real API (and uses the
suite's model worker) as subprocesses on free ports.
"""

from __future__ import annotations

import time

import httpx

from tests.conftest import no_password_hashes
from tests.support import PHOTOS


def _scan(response: httpx.Response) -> None:
    response.read()
    no_password_hashes(response)


def test_login_upload_predict_feedback(portal: tuple[str, str, str]) -> None:
    url, email, password = portal
    with httpx.Client(base_url=url, timeout=60, event_hooks={"response": [_scan]}) as client:
        assert client.get("/docs").status_code == 200
        token = client.post("/login", data={"username": email, "password": password}).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}

        photo = (PHOTOS / "parrot.jpg").read_bytes()
        r = client.post("/model/predict", files={"file": ("parrot.jpg", photo, "image/jpeg")}, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["success"] and body["prediction"] == "macaw" and body["score"] > 0.5

        feedback = {
            "score": body["score"],
            "predicted_class": body["prediction"],
            "image_file_name": body["image_file_name"],
            "feedback": "integration check: correct",
        }
        r = client.post("/feedback/", json=feedback, headers=headers)
        assert r.status_code == 201, r.text
        mine = client.get("/feedback/", headers=headers).json()
        assert any(f["id"] == r.json()["id"] and f["comment"] == feedback["feedback"] for f in mine)

        # The same through the v1 routes: upload, queue a job, poll it, give structured feedback.
        image = client.post(
            "/v1/images", files={"file": ("owl.jpg", (PHOTOS / "owl.jpg").read_bytes())}, headers=headers
        )
        assert image.status_code == 201
        job = client.post(
            "/v1/predictions", json={"image_id": image.json()["id"], "models": ["birds"]}, headers=headers
        )
        assert job.status_code == 202
        deadline = time.monotonic() + 60
        while (result := client.get(f"/v1/predictions/{job.json()['job_id']}", headers=headers).json())["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        (prediction,) = result["results"]
        assert prediction["label"] == "Athene cunicularia (Burrowing Owl)"
        r = client.post("/v1/feedback", json={"prediction_id": prediction["id"], "is_correct": True}, headers=headers)
        assert r.status_code == 201
        assert r.json()["id"] in {f["id"] for f in client.get("/v1/feedback", headers=headers).json()["data"]}
