"""Every error the API can give becomes a short human message in the UI, never a traceback."""

from __future__ import annotations

import io
import uuid
import zipfile

import httpx
import pytest

from tests.images import encode, split_colour
from tests.support import free_port
from ui.client import Api, ApiError, _message


def admin_api(portal: tuple[str, str, str]) -> Api:
    api = Api(portal[0])
    api.login(portal[1], portal[2])
    return api


def test_api_down() -> None:
    with pytest.raises(ApiError) as info:
        Api(f"http://127.0.0.1:{free_port()}").models()
    assert info.value.status == 0 and "Cannot reach the portal API" in info.value.message


def test_upload_errors_carry_the_api_explanation(portal: tuple[str, str, str]) -> None:
    api = admin_api(portal)
    cases = [
        (b"plain text", 415, "not an image"),
        (encode(split_colour(256), "JPEG")[:-700], 422, "truncated"),
        (b"\xff\xd8" + b"0" * (10 * 1024 * 1024), 413, "at most"),
    ]
    for data, status, words in cases:
        with pytest.raises(ApiError) as info:
            api.upload("file.jpg", data)
        assert info.value.status == status and words in info.value.message


def test_feedback_export_is_for_admins(portal: tuple[str, str, str]) -> None:
    api = admin_api(portal)
    with zipfile.ZipFile(io.BytesIO(api.feedback_export())) as archive:
        assert "feedback.csv" in archive.namelist()
    email = f"export-{uuid.uuid4().hex[:8]}@example.com"
    api.create_user(email, "a-good-password", "", "user")
    user = Api(portal[0])
    user.login(email, "a-good-password")
    with pytest.raises(ApiError) as info:
        user.feedback_export()
    assert info.value.status == 403


def test_unauthorized_and_throttled(portal: tuple[str, str, str]) -> None:
    with pytest.raises(ApiError) as info:
        Api(portal[0], token="not-a-token").models()
    assert info.value.status == 401 and "log in again" in info.value.message
    email = f"throttle-{uuid.uuid4().hex[:8]}@example.com"
    for _ in range(5):
        with pytest.raises(ApiError):
            Api(portal[0]).login(email, "wrong-password")
    with pytest.raises(ApiError) as info:
        Api(portal[0]).login(email, "wrong-password")
    assert info.value.status == 429 and "retry in" in info.value.message


@pytest.mark.parametrize(
    ("status", "headers", "words"),
    [(503, {"retry-after": "2"}, "retry in 2 s"), (504, {}, "took too long"), (500, {}, "Unexpected answer")],
)
def test_server_side_messages(status: int, headers: dict[str, str], words: str) -> None:
    response = httpx.Response(status, json={"detail": "internal detail"}, headers=headers)
    assert words in _message(response) and "Traceback" not in _message(response)
