"""Every error the API can give becomes a short human message in the UI, never a traceback."""

from __future__ import annotations

import io
import uuid
import zipfile
from typing import Any, get_args

import httpx
import pytest
from PIL import Image as PILImage

from api.app.core.config import Settings
from contracts.messages import PredictionStatus
from tests.images import encode, split_colour
from tests.support import PHOTOS, RedisServer, cut_off_http_server, free_port, start_api
from ui.client import (
    _JOB,
    FEEDBACK_GONE,
    MESSAGES,
    Accuracy,
    Api,
    ApiError,
    ApiKey,
    ApiKeysPage,
    BatchResult,
    BatchResults,
    Correction,
    DailyCount,
    Feedback,
    Image,
    ImagesPage,
    InputSpec,
    Job,
    JobsPage,
    LabelScore,
    LatencyPercentiles,
    ListedImage,
    Model,
    NewApiKey,
    Prediction,
    Role,
    Stats,
    Timings,
    User,
    _message,
    _typed,
)

# Each typed answer of the client and the API schema it reads.
ANSWERS: dict[Any, str] = {
    User: "UserPublic",
    Model: "ModelPublic",
    InputSpec: "InputSpec",
    Image: "ImagePublic",
    ListedImage: "ImageListItem",
    ImagesPage: "ImagesPublic",
    LabelScore: "LabelScore",
    Timings: "TimingsPublic",
    Prediction: "PredictionPublic",
    Job: "JobPublic",
    JobsPage: "JobsPublic",
    Feedback: "FeedbackPublic",
    DailyCount: "DailyCount",
    LatencyPercentiles: "LatencyPercentiles",
    Accuracy: "Accuracy",
    Correction: "Correction",
    Stats: "Stats",
    ApiKey: "ApiKeyPublic",
    NewApiKey: "ApiKeyCreated",
    ApiKeysPage: "ApiKeysPublic",
    BatchResult: "BatchResult",
    BatchResults: "BatchResults",
}


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


def test_a_verdict_on_a_result_deleted_meanwhile_says_so(portal: tuple[str, str, str]) -> None:
    """A verdict sent after its picture was deleted in another tab says what became of it, not
    "That item no longer exists"."""
    with pytest.raises(ApiError) as info:
        admin_api(portal).feedback(str(uuid.uuid4()), True, None, None)
    assert info.value.status == 404 and info.value.message == FEEDBACK_GONE


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
    # The login throttle's window (LOGIN_WINDOW_SECONDS, 900 s) in words a person reads at a glance, said once.
    message = info.value.message
    assert info.value.status == 429 and message == "Too many failed attempts; try again in 15 minutes.", message


def test_each_browser_is_its_own_client_to_the_login_throttle(settings: Settings) -> None:
    """Behind a UI the API trusts as a proxy, failed logins are counted per browser address: one
    browser's 20 failures throttle that browser, not the next person. (A Redis of its own: the
    counts must not throttle the suite's other logins.)"""
    redis_server = RedisServer()
    redis_server.start()
    api, url = start_api("behind-ui", settings, REDIS_URL=redis_server.url, TRUSTED_PROXIES="127.0.0.1")

    def failed_login(address: str | None) -> int:
        with pytest.raises(ApiError) as info:
            Api(url, client_address=address).login(f"probe-{uuid.uuid4().hex[:8]}@example.com", "wrong-password")
        return info.value.status

    try:
        assert [failed_login("203.0.113.7") for _ in range(21)] == [401] * 20 + [429]
        assert failed_login("203.0.113.8") == 401
        assert failed_login(None) == 401
    finally:
        api.stop()
        redis_server.stop()


@pytest.mark.parametrize(
    ("status", "headers", "words"),
    [
        (503, {"retry-after": "2"}, "Try again in 2 seconds."),
        (429, {"retry-after": "7200"}, "Try again in 2 hours."),
        (504, {}, "took too long"),
        (500, {}, "Unexpected answer"),
    ],
)
def test_server_side_messages(status: int, headers: dict[str, str], words: str) -> None:
    response = httpx.Response(status, json={"detail": "internal detail"}, headers=headers)
    assert words in _message(response) and "Traceback" not in _message(response)


@pytest.mark.parametrize(
    ("status", "body", "headers", "message"),
    [
        (
            503,
            {"detail": "No live model worker serves mobilenet_v2@1 now; retry shortly."},
            {"retry-after": "2"},
            "No live model worker serves mobilenet_v2@1 now; retry in 2 seconds.",
        ),
        (
            429,
            {"detail": "Too many failed attempts; try again later"},
            {"retry-after": "900"},
            "Too many failed attempts; try again in 15 minutes.",
        ),
        (429, None, {"retry-after": "7200"}, "Too many attempts. Try again in 2 hours."),
        (503, None, {}, "The portal is busy or part of it is down. Please try again shortly."),
        (503, None, {"retry-after": "5"}, "The portal is busy or part of it is down. Please try again in 5 seconds."),
        (
            503,
            {"detail": "The explainer failed. Try again later."},
            {"retry-after": "120"},
            "The explainer failed. Try again in 2 minutes.",
        ),
        (503, {"detail": "Queue is full"}, {"retry-after": "1"}, "Queue is full. Try again in 1 second."),
    ],
)
def test_busy_or_down_says_the_apis_reason_and_when_to_try_again(
    status: int, body: dict[str, str] | None, headers: dict[str, str], message: str
) -> None:
    """A 503 or 429 says what the API said is busy or down, then the Retry-After in words (once:
    in the place of the reason's own "try again later"); an answer without a reason (a proxy's
    page) says it in general words."""
    response = (
        httpx.Response(status, json=body, headers=headers)
        if body is not None
        else httpx.Response(status, text="<html>Service Unavailable</html>", headers=headers)
    )
    assert _message(response) == message


def test_a_deactivated_account_and_invalid_fields_are_said_as_they_are() -> None:
    """A 401 for a deactivated account says so (logging in again will not help); a validation
    error names the field it is about."""
    deactivated = {"detail": "This account is deactivated: an administrator can reactivate it"}
    assert _message(httpx.Response(401, json=deactivated)) == (
        "This account is deactivated: an administrator can reactivate it."
    )
    assert _message(httpx.Response(401, json={"detail": "Could not validate credentials"})) == MESSAGES[401]
    invalid = {
        "detail": [
            {"loc": ["body", "full_name"], "msg": "String should have at most 200 characters"},
            {"loc": ["body", "email"], "msg": "Field required"},
            {"msg": "Value error"},
        ]
    }
    assert _message(httpx.Response(422, json=invalid)) == (
        "full name: String should have at most 200 characters; email: Field required; Value error"
    )


def test_a_refusal_says_which_right_is_missing() -> None:
    """A 403's detail (a deactivated account, admins only, a key's scope) is what a person reads."""
    response = httpx.Response(403, json={"detail": "Account is deactivated"})
    assert _message(response) == "Account is deactivated"


def test_the_uploaders_never_refuse_what_the_api_takes() -> None:
    """Streamlit's uploader counts megabytes of 10^6 bytes, the API's limits are in bytes: the
    uploader's limit is the smallest whole number of its megabytes that holds the API's."""
    from ui.config import UISettings

    settings = UISettings(max_upload_bytes=10 * 1024 * 1024, max_batch_bytes=2 * 1024**3)
    assert settings.uploader_mb == 11 and settings.batch_uploader_mb == 2148
    for limit, mb in (
        (settings.max_upload_bytes, settings.uploader_mb),
        (settings.max_batch_bytes, settings.batch_uploader_mb),
    ):
        assert (mb - 1) * 1_000_000 < limit <= mb * 1_000_000


def test_typed_answers_name_every_field_the_api_sends(portal: tuple[str, str, str]) -> None:
    schemas = httpx.get(f"{portal[0]}/openapi.json").json()["components"]["schemas"]
    for typed, name in ANSWERS.items():
        keys = typed.__required_keys__ | typed.__optional_keys__
        assert keys == set(schemas[name]["properties"]), name
    assert set(get_args(Role)) == set(schemas["Role"]["enum"])


def test_statuses_arrive_as_the_contract_enum(portal: tuple[str, str, str]) -> None:
    api = admin_api(portal)
    image = api.upload("parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())
    polled: list[Job] = []
    job = api.wait(api.predict(image["id"], ["mobilenet_v2@1", "sketch@1"]), on_poll=polled.append)
    assert job["status"] is PredictionStatus.done
    assert [r["status"] for r in job["results"]] == [PredictionStatus.done, PredictionStatus.done]
    assert all(isinstance(j["status"], PredictionStatus) and not j["status"].terminal for j in polled)
    assert job["results"][0]["label"] == "macaw" and job["results"][0]["top_k"][0]["label"] == "macaw"


def test_a_page_of_uploads_with_thumbnails_and_jobs(portal: tuple[str, str, str]) -> None:
    api = admin_api(portal)
    email = f"history-{uuid.uuid4().hex[:8]}@example.com"
    api.create_user(email, "a-good-password", "", "user")
    user = Api(portal[0])
    user.login(email, "a-good-password")
    first = user.upload("first.png", encode(split_colour(600), "PNG"))
    second = user.upload("second.jpg", (PHOTOS / "parrot.jpg").read_bytes())
    jobs = [user.wait(user.predict(i["id"], ["sketch@1"])) for i in (first, second, first)]

    page = user.images(limit=12, thumbnails=True, total=True)
    assert page["count"] == 2 and [i["id"] for i in page["data"]] == [second["id"], first["id"]]
    thumbnail = page["data"][1]["thumbnail"]
    assert thumbnail is not None and max(PILImage.open(io.BytesIO(thumbnail)).size) == 280
    assert user.images()["data"][0]["thumbnail"] is None

    newest_first = [j["job_id"] for j in reversed(jobs)]
    assert [j["job_id"] for j in user.jobs_of_images([first["id"], second["id"]])] == newest_first
    assert [j["job_id"] for j in user.jobs_of_images([first["id"], second["id"]], page_size=1)] == newest_first
    assert [j["job_id"] for j in user.jobs_of_images([second["id"]])] == [jobs[1]["job_id"]]


def test_an_answer_of_another_shape_is_a_message() -> None:
    with pytest.raises(ApiError) as info:
        _typed(_JOB, {"job_id": "1", "status": "lost"})
    assert info.value.message.startswith("Unexpected answer from the portal")


def test_an_answer_cut_off_says_so_not_that_the_api_is_unreachable() -> None:
    with cut_off_http_server() as url, pytest.raises(ApiError) as raised:
        Api(url).batch_csv("b")
    assert "cut off before its end" in raised.value.message
