"""The UI's only way to the portal: the HTTP API, with every error turned into a short message."""

from __future__ import annotations

import time
from typing import Any

import httpx

MESSAGES = {
    401: "Your session has expired or was revoked. Please log in again.",
    403: "You are not allowed to do that.",
    404: "That item no longer exists.",
    413: "That file is too large.",
    415: "That file is not an image the portal can read.",
    422: "The request was not valid.",
    429: "Too many attempts. Please wait a moment.",
    503: "The portal is busy or part of it is down. Please try again shortly.",
    504: "The models took too long to answer. Please try again.",
}


class ApiError(Exception):
    """A failed API call with a message fit to show a person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _message(response: httpx.Response) -> str:
    base = MESSAGES.get(response.status_code, f"Unexpected answer from the portal ({response.status_code}).")
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, list):  # FastAPI validation errors
        detail = "; ".join(str(d.get("msg", d)) for d in detail)
    if response.status_code in (413, 415, 422) and detail:
        base = str(detail)
    retry = response.headers.get("retry-after")
    if retry and response.status_code in (429, 503):
        base += f" (retry in {retry} s)"
    return base


class Api:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 40.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = httpx.request(method, self.base_url + path, headers=headers, timeout=self.timeout, **kwargs)
        except httpx.HTTPError:
            raise ApiError(0, f"Cannot reach the portal API at {self.base_url}. Is it running?") from None
        if response.status_code >= 400:
            raise ApiError(response.status_code, _message(response))
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        return response.json() if response.content else None

    def login(self, email: str, password: str) -> str:
        body = self.json("POST", "/v1/auth/login", data={"username": email, "password": password})
        self.token = body["access_token"]
        return self.token

    def logout(self) -> None:
        self._request("POST", "/v1/auth/logout")

    def me(self) -> dict[str, Any]:
        return self.json("GET", "/v1/users/me")

    def models(self) -> list[dict[str, Any]]:
        return self.json("GET", "/v1/models")["data"]

    def upload(self, name: str, data: bytes) -> dict[str, Any]:
        return self.json("POST", "/v1/images", files={"file": (name, data)})

    def predict(self, image_id: str, models: list[str]) -> str:
        return self.json("POST", "/v1/predictions", json={"image_id": image_id, "models": models})["job_id"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.json("GET", f"/v1/predictions/{job_id}")

    def wait(self, job_id: str, timeout: float = 60.0, on_poll: Any = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] not in ("queued", "running"):
                return job
            if time.monotonic() > deadline:
                raise ApiError(504, MESSAGES[504])
            if on_poll is not None:
                on_poll(job)
            time.sleep(0.2)

    def images(self, skip: int = 0, limit: int = 12) -> dict[str, Any]:
        return self.json("GET", "/v1/images", params={"skip": skip, "limit": limit})

    def image(self, image_id: str) -> dict[str, Any]:
        return self.json("GET", f"/v1/images/{image_id}")

    def image_file(self, image_id: str) -> bytes:
        return self._request("GET", f"/v1/images/{image_id}/file").content

    def delete_image(self, image_id: str) -> bool:
        self._request("DELETE", f"/v1/images/{image_id}")
        return True

    def feedback(
        self, prediction_id: str, is_correct: bool, correct_label: str | None, comment: str | None
    ) -> dict[str, Any]:
        payload = {
            "prediction_id": prediction_id,
            "is_correct": is_correct,
            "correct_label": correct_label,
            "comment": comment,
        }
        return self.json("POST", "/v1/feedback", json=payload)

    def my_feedback(self) -> list[dict[str, Any]]:
        return self.json("GET", "/v1/feedback", params={"limit": 500})["data"]

    def users(self) -> list[dict[str, Any]]:
        return self.json("GET", "/v1/users", params={"limit": 500})["data"]

    def create_user(self, email: str, password: str, name: str, role: str) -> dict[str, Any]:
        return self.json("POST", "/v1/users", json={"email": email, "password": password, "name": name, "role": role})

    def update_user(self, user_id: int, **changes: Any) -> dict[str, Any]:
        return self.json("PATCH", f"/v1/users/{user_id}", json=changes)

    def stats(self) -> dict[str, Any]:
        return self.json("GET", "/v1/admin/stats")

    def feedback_export(self, model: str | None = None) -> bytes:
        """A zip of the images users labelled (admins): ``<model>/<label>/<image>`` and feedback.csv."""
        params = {"model": model} if model else {}
        return self._request("GET", "/v1/admin/feedback-export", params=params).content

    def readiness(self) -> dict[str, Any]:
        try:
            return httpx.get(self.base_url + "/health/ready", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return {"status": "fail", "checks": {}}
