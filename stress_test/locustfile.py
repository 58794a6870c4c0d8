"""Load test: each simulated user logs in once, then predicts (weight 1) and lists users (weight 2).

    locust -f stress_test/locustfile.py --host http://localhost:8000
    locust -f stress_test/locustfile.py --host http://localhost:8000 --headless -u 50 -r 10 -t 2m \
        --csv bench-results/locust

Environment: PORTAL_EMAIL / PORTAL_PASSWORD (default: the development admin), PORTAL_IMAGES (a
folder of images to send, default ../shared/data/photos), PORTAL_MODELS (comma-separated model
references for /model/predict, default: the portal's default model), PORTAL_WAIT ("min,max"
seconds between tasks, default "1,5"; "0" for users that never pause, as ``make bench`` runs),
PORTAL_RESET_AFTER_LOGIN ("1": statistics start again once every user has logged in, so that a run
measures the steady state rather than the burst of logins at its start; ``make bench`` sets it),
PORTAL_PREDICT_ONLY ("1": users only predict, never list users; the load that measures what one
prediction costs, ``python -m bench e2e --mix predict``), PORTAL_LOGIN_EVERY_TASK ("1": each task
logs in again first, as clients that keep no token do; ``--mix login``).

An overloaded portal answers 503 with Retry-After; such answers are counted under their own name
("/model/predict [503 overloaded]"), not as failures, and the user waits as told before going on.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import cast
from urllib.parse import urlencode

import gevent
from locust import FastHttpUser, User, between, constant, task
from urllib3 import encode_multipart_formdata

IMAGE_DIR = Path(
    os.environ.get("PORTAL_IMAGES", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos")
)
IMAGES = sorted(
    p for p in IMAGE_DIR.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
)
MODELS = [m for m in os.environ.get("PORTAL_MODELS", "").split(",") if m]
OVERLOADED = "/model/predict [503 overloaded]"
RESET_AFTER_LOGIN = os.environ.get("PORTAL_RESET_AFTER_LOGIN", "") == "1"
PREDICT_ONLY = os.environ.get("PORTAL_PREDICT_ONLY", "") == "1"
LOGIN_EVERY_TASK = os.environ.get("PORTAL_LOGIN_EVERY_TASK", "") == "1"
logged_in = 0


def wait_time_from(spec: str) -> Callable[[User], float]:
    low, _, high = spec.partition(",")
    return constant(float(low)) if not high else between(float(low), float(high))


# Multipart bodies built once: the load generator shares the CPU with the portal it measures.
BODIES = [encode_multipart_formdata({"file": (p.name, p.read_bytes())}) for p in IMAGES]


class PortalUser(FastHttpUser):
    wait_time = wait_time_from(os.environ.get("PORTAL_WAIT", "1,5"))

    def login(self) -> None:
        form = {
            "username": os.environ.get("PORTAL_EMAIL", "admin@example.com"),
            "password": os.environ.get("PORTAL_PASSWORD", "admin"),
        }
        response = self.client.post(
            "/login", data=urlencode(form), headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        response.raise_for_status()
        self.auth = {"Authorization": f"Bearer {response.json()['access_token']}"}

    def on_start(self) -> None:
        self.login()
        self.path = "/model/predict" + ("?" + urlencode({"models": MODELS}, doseq=True) if MODELS else "")
        global logged_in
        logged_in += 1
        runner = self.environment.runner
        if RESET_AFTER_LOGIN and runner is not None and logged_in == runner.target_user_count:
            self.environment.stats.reset_all()

    @task(1)
    def predict(self) -> None:
        if LOGIN_EVERY_TASK:
            self.login()
        body, content_type = random.choice(BODIES)
        headers = {**self.auth, "Content-Type": content_type}
        # geventhttpclient sends bytes as they are; locust's annotation names only str and dict.
        with self.client.post(
            self.path, data=cast(str, body), headers=headers, name="/model/predict", catch_response=True
        ) as response:
            retry_after = response.headers.get("Retry-After") if response.status_code == 503 else None
            if retry_after is not None:
                response.request_meta["name"] = OVERLOADED
                response.success()
            elif response.status_code == 200 and not response.json()["success"]:
                response.failure(f"prediction not done: {response.json()['results']}")
        if retry_after is not None:
            gevent.sleep(float(retry_after))

    @task(0 if PREDICT_ONLY else 2)  # a weight of 0 leaves the task out
    def list_users(self) -> None:
        if LOGIN_EVERY_TASK:
            self.login()
        self.client.get("/user/", headers=self.auth, name="/user/")
