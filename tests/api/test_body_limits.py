"""Bodies are bounded before they are read: an oversized or unauthenticated upload costs the
portal neither time nor disk."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from api.app.core.config import Settings
from contracts.api_keys import KEY_LENGTH, KEY_PREFIX
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD
from tests.support import PHOTOS, Service, start_api

GIB = 1024**3


@pytest.fixture(scope="module")
def api(settings: Settings) -> Iterator[tuple[Service, str]]:
    service, url = start_api("body-limits", settings)
    yield service, url
    service.stop()


def raw_request(url: str, head: str, body: bytes = b"", *, read_timeout: float = 5) -> tuple[int, str, float]:
    """Sends ``head`` (request line and headers) and ``body`` over a plain socket; the status, the
    whole answer and the seconds until it came."""
    parts = urlsplit(url)
    start = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=read_timeout) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer.decode("latin-1"), time.monotonic() - start


def token(url: str) -> str:
    r = httpx.post(f"{url}/v1/auth/login", data={"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    return str(r.json()["access_token"])


def test_an_announced_oversized_upload_is_refused_before_its_body(api: tuple[Service, str]) -> None:
    _, url = api
    head = (
        "POST /v1/images HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {token(url)}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\n"
        f"Content-Length: {GIB}\r\n"
    )
    status, answer, seconds = raw_request(url, head)
    assert status == 413 and "10 MB" in answer and seconds < 1


def test_an_upload_without_a_token_is_refused_before_its_body(api: tuple[Service, str], settings: Settings) -> None:
    _, url = api
    stored_before = sorted(p.name for p in settings.storage_dir.rglob("*"))
    head = (
        "POST /model/predict HTTP/1.1\r\nHost: test\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\n"
        f"Content-Length: {5 * 1024 * 1024}\r\n"
    )
    status, answer, seconds = raw_request(url, head, b"--x\r\n" + b"\0" * 65536)
    assert status == 401 and "Sign in" in answer and seconds < 1
    status, answer, seconds = raw_request(url, head.replace(str(5 * 1024 * 1024), str(GIB)))
    assert status in (401, 413) and seconds < 1
    assert sorted(p.name for p in settings.storage_dir.rglob("*")) == stored_before


def test_a_batch_with_a_key_that_would_be_refused_is_refused_before_its_body(api: tuple[Service, str]) -> None:
    """An API key of the right shape that no account has, or a real key without the ``predict``
    scope, sending a batch of a gigabyte: 401 or 403 at once, nothing of the body read. The route
    alone looked keys up, after up to MAX_BATCH_BYTES (2 GiB) were read and spooled to disk."""
    _, url = api
    r = httpx.post(
        f"{url}/v1/api-keys",
        json={"name": f"read-only-{uuid.uuid4().hex[:6]}", "scopes": ["read"]},
        headers={"Authorization": f"Bearer {token(url)}"},
    )
    assert r.status_code == 201, r.text
    invented = KEY_PREFIX + "Z" * (KEY_LENGTH - len(KEY_PREFIX))
    for header, expected in (
        (f"X-API-Key: {invented}", 401),
        (f"Authorization: Bearer {invented}", 401),
        (f"X-API-Key: {r.json()['key']}", 403),
    ):
        head = (
            "POST /v1/batches HTTP/1.1\r\nHost: test\r\n"
            f"{header}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {GIB}\r\n"
        )
        status, answer, seconds = raw_request(url, head, b"--x\r\n" + b"\0" * 65536)
        assert status == expected and seconds < 2, (header, answer)


def test_a_body_that_grows_past_the_limit_is_cut_off(api: tuple[Service, str]) -> None:
    """No Content-Length (chunked): the body is counted as it arrives."""
    _, url = api

    def chunks() -> Iterator[bytes]:
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        for _ in range(40):
            yield b"\x89" * (1024 * 1024)

    r = httpx.post(
        f"{url}/v1/images",
        content=chunks(),
        headers={"Authorization": f"Bearer {token(url)}", "Content-Type": "multipart/form-data; boundary=x"},
        timeout=30,
    )
    assert r.status_code == 413 and "10 MB" in r.text


def test_a_multipart_body_cut_before_its_closing_boundary_is_400(api: tuple[Service, str]) -> None:
    """A complete request whose multipart body stops inside its file (a client that cut it):
    400 saying so, not a 422 about a missing field. The same body whole is stored, also with its
    closing boundary split between two chunks."""
    _, url = api
    boundary = "portal-test-boundary-0123456789"
    photo = (PHOTOS / "bird.bmp").read_bytes()
    whole = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="bird.bmp"\r\n'
            "Content-Type: image/bmp\r\n\r\n"
        ).encode()
        + photo
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Authorization": f"Bearer {token(url)}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
    for cut in (whole[: len(whole) // 2], whole[: -len(boundary) // 2 - 4]):
        r = httpx.post(f"{url}/v1/images", content=cut, headers=headers)
        assert r.status_code == 400 and "closing boundary" in r.json()["detail"], r.text
    split = len(whole) - len(boundary) // 2 - 4

    def chunks() -> Iterator[bytes]:
        yield whole[:split]
        yield whole[split:]

    r = httpx.post(f"{url}/v1/images", content=chunks(), headers=headers)
    assert r.status_code == 201, r.text


def test_json_bodies_are_capped(api: tuple[Service, str]) -> None:
    _, url = api
    r = httpx.post(
        f"{url}/v1/feedback", json={"comment": "x" * 100_000}, headers={"Authorization": f"Bearer {token(url)}"}
    )
    assert r.status_code == 413 and "64 KiB" in r.json()["detail"]


def test_a_batch_of_many_ids_form_encoded_is_told_to_use_multipart(api: tuple[Service, str]) -> None:
    """2,000 image ids (74 KB) form-encoded pass the JSON limit: the 413 says multipart takes them."""
    _, url = api
    ids = ",".join(str(uuid.UUID(int=i)) for i in range(2000))
    auth = {"Authorization": f"Bearer {token(url)}"}
    r = httpx.post(f"{url}/v1/batches", data={"image_ids": ids, "models": "sketch@3"}, headers=auth)
    assert r.status_code == 413 and "multipart/form-data" in r.json()["detail"], r.text
    r = httpx.post(f"{url}/v1/batches", files={"image_ids": (None, ids), "models": (None, "sketch@3")}, headers=auth)
    assert r.status_code != 413, r.text


def test_a_body_sent_to_no_route_is_404_not_too_large(api: tuple[Service, str]) -> None:
    """An image posted to a wrong address (or with a wrong method) is told so, whatever its size;
    a route's own limit still holds."""
    _, url = api
    body = (PHOTOS / "bird.bmp").read_bytes()
    assert len(body) > 64 * 1024
    headers = {"Authorization": f"Bearer {token(url)}"}
    r = httpx.post(f"{url}/v1/predict", files={"file": ("bird.bmp", body)}, headers=headers)
    assert r.status_code == 404, r.text
    r = httpx.put(f"{url}/v1/images", files={"file": ("bird.bmp", body)}, headers=headers)
    assert r.status_code == 405, r.text
    r = httpx.post(f"{url}/v1/feedback", content=body, headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text


def test_an_upload_that_is_not_multipart_is_415(api: tuple[Service, str]) -> None:
    """A raw image body is the wrong encoding, not a JSON body too large."""
    _, url = api
    body = (PHOTOS / "bird.bmp").read_bytes()
    for path in ("/v1/images", "/model/predict"):
        r = httpx.post(
            f"{url}{path}",
            content=body,
            headers={"Authorization": f"Bearer {token(url)}", "Content-Type": "image/bmp"},
        )
        assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"], (path, r.text)
        assert r.headers["x-request-id"]


BIRD = (PHOTOS / "bird.bmp").read_bytes()


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b"owl.jpg"),
        ("text/plain", BIRD),
        ("application/json", b'{"image_ids": [], "models": "sketch@3"}'),
        ("application/json", b'{"comment": "' + b"x" * 148_000 + b'"}'),
        ("application/zip", BIRD),
        (None, BIRD),
        ("multipart/mixed; boundary=xyz", b"--xyz\r\nContent-Type: text/plain\r\n\r\nhi\r\n--xyz--\r\n"),
    ],
    ids=["small-text", "large-text", "small-json", "large-json", "large-zip", "large-untyped", "multipart-mixed"],
)
def test_a_batch_that_is_not_a_form_is_415_whatever_its_size(
    api: tuple[Service, str], content_type: str | None, body: bytes
) -> None:
    """Text, JSON or a raw zip sent to the batch route is the wrong encoding: small, not an empty
    form (422); larger than 64 KiB, not a form too large (413)."""
    _, url = api
    headers = {"Authorization": f"Bearer {token(url)}"} | ({"Content-Type": content_type} if content_type else {})
    r = httpx.post(f"{url}/v1/batches", content=body, headers=headers)
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"], r.text
    assert r.headers["x-request-id"]


def test_a_batch_form_url_encoded_or_without_a_body_reaches_the_route(api: tuple[Service, str]) -> None:
    """The batch route's own encodings pass: a URL-encoded form, and no body at all (both empty
    batches here, which the route refuses as such)."""
    _, url = api
    auth = {"Authorization": f"Bearer {token(url)}"}
    r = httpx.post(f"{url}/v1/batches", data={"image_ids": "", "models": ""}, headers=auth)
    assert r.status_code == 422 and "empty" in r.json()["detail"], r.text
    r = httpx.post(f"{url}/v1/batches", headers=auth)
    assert r.status_code == 422 and "empty" in r.json()["detail"], r.text


def test_health_answers_head(api: tuple[Service, str]) -> None:
    _, url = api
    assert httpx.head(f"{url}/health/live").status_code == 200
    assert httpx.head(f"{url}/health/ready").status_code in (200, 503)
