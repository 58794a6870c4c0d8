"""Load test: each simulated user logs in once, then predicts (weight 1) and lists users (weight 2).

    locust -f stress_test/locustfile.py --host http://localhost:8000
    locust -f stress_test/locustfile.py --host http://localhost:8000 --headless -u 50 -r 10 -t 2m \
        --csv bench-results/locust

Environment: PORTAL_EMAIL / PORTAL_PASSWORD (default: the development admin), PORTAL_IMAGES (a
folder of images to send, default ../shared/data/photos), PORTAL_MODELS (comma-separated model
references for /model/predict, default: the portal's default model).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from locust import HttpUser, between, task

IMAGE_DIR = Path(
    os.environ.get("PORTAL_IMAGES", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos")
)
IMAGES = sorted(
    p for p in IMAGE_DIR.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
)
MODELS = [m for m in os.environ.get("PORTAL_MODELS", "").split(",") if m]


class PortalUser(HttpUser):
    wait_time = between(1, 5)

    def on_start(self) -> None:
        response = self.client.post(
            "/login",
            data={
                "username": os.environ.get("PORTAL_EMAIL", "admin@example.com"),
                "password": os.environ.get("PORTAL_PASSWORD", "admin"),
            },
        )
        response.raise_for_status()
        self.client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
        self.images = [(p.name, p.read_bytes()) for p in IMAGES]

    @task(1)
    def predict(self) -> None:
        name, data = random.choice(self.images)
        params = {"models": MODELS} if MODELS else None
        self.client.post("/model/predict", params=params, files={"file": (name, data)}, name="/model/predict")

    @task(2)
    def list_users(self) -> None:
        self.client.get("/user/", name="/user/")
