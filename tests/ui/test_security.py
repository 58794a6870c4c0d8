"""The UI's own server keeps its pages out of other sites' frames and its metrics for monitoring,
wherever it runs (not only behind the compose nginx): a real ``python -m ui``, and the middleware
called as uvicorn calls it."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send
from websockets.sync.client import connect as websocket_connect
from websockets.typing import Origin, Subprotocol

from tests.support import free_port, http_ok, service
from ui.security import SecurityMiddleware, may_read_metrics

FRAMING = {"x-frame-options": "SAMEORIGIN", "content-security-policy": "frame-ancestors 'self'"}
OTHERS = {"x-content-type-options": "nosniff", "referrer-policy": "same-origin"}
OUTSIDER = "203.0.113.9"
"""An internet client's address (a documentation range, which Python counts as private)."""


@pytest.fixture(scope="module")
def ui_url() -> Iterator[str]:
    """A UI that believes X-Forwarded-For from 127.0.0.1 (as behind a proxy there), so a request
    from here can stand for a client anywhere. No API: the pages' HTML and Streamlit's routes do
    not call it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "API_URL": f"http://127.0.0.1:{free_port()}",
        "UI_HOST": "127.0.0.1",
        "UI_PORT": str(port),
        "UI_TRUSTED_PROXIES": "127.0.0.1",
    }
    ui = service(
        f"security-ui-{port}", [sys.executable, "-m", "ui"], env, ready=lambda: http_ok(f"{url}/_stcore/health")
    )
    try:
        yield url
    finally:
        ui.stop()


def assert_protected(response: httpx.Response) -> None:
    """Each security header once, with its one value."""
    for name, value in {**FRAMING, **OTHERS}.items():
        assert response.headers.get_list(name) == [value], (response.url, name, response.headers.get_list(name))


def test_pages_and_assets_may_not_be_framed_by_another_site(ui_url: str) -> None:
    page = httpx.get(f"{ui_url}/", timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert_protected(page)
    assets = re.findall(r'(?:src|href)="\.?/?(static/[^"]+)"', page.text)
    assert assets, "the page names no static asset"
    for asset in assets[:2]:
        r = httpx.get(f"{ui_url}/{asset}", timeout=10)
        assert r.status_code == 200, asset
        assert_protected(r)
    # A page of the app's (the SPA answers it with the same HTML), and a path it does not serve.
    for path in ("/classify", "/no-such-page"):
        assert_protected(httpx.get(f"{ui_url}{path}", timeout=10))


def test_health_still_answers(ui_url: str) -> None:
    r = httpx.get(f"{ui_url}/_stcore/health", timeout=10)
    assert r.status_code == 200 and r.text == "ok"
    assert_protected(r)


def test_metrics_answer_loopback_and_private_networks_only(ui_url: str) -> None:
    local = httpx.get(f"{ui_url}/_stcore/metrics", timeout=10)
    assert local.status_code == 200 and "# TYPE" in local.text
    assert_protected(local)
    # Prometheus in the cluster, through a trusted proxy.
    private = httpx.get(f"{ui_url}/_stcore/metrics", headers={"X-Forwarded-For": "10.1.2.3"}, timeout=10)
    assert private.status_code == 200 and "# TYPE" in private.text
    for path in (
        "/_stcore/metrics",
        "/_stcore/metrics?families=session_events",
        "/_stcore/metrics/",
        "/_stcore/metricsx",
    ):
        r = httpx.get(f"{ui_url}{path}", headers={"X-Forwarded-For": OUTSIDER}, timeout=10)
        assert r.status_code == 404 and "# TYPE" not in r.text, (path, r.status_code)
        assert_protected(r)
    # The outsider's own X-Forwarded-For naming a private address is not believed: uvicorn takes the
    # address the trusted proxy appended.
    forged = httpx.get(f"{ui_url}/_stcore/metrics", headers={"X-Forwarded-For": f"10.1.2.3, {OUTSIDER}"}, timeout=10)
    assert forged.status_code == 404


def test_the_websocket_still_upgrades(ui_url: str) -> None:
    ws_url = ui_url.replace("http://", "ws://") + "/_stcore/stream"
    with websocket_connect(
        ws_url, origin=Origin(ui_url), subprotocols=[Subprotocol("streamlit")], open_timeout=10
    ) as ws:
        assert ws.response is not None and ws.response.status_code == 101
        assert ws.subprotocol == "streamlit"


@pytest.mark.parametrize(
    ("client", "allowed"),
    [
        (("127.0.0.1", 5000), True),
        (("10.20.30.40", 5000), True),
        (("172.31.0.5", 5000), True),
        (("192.168.1.9", 5000), True),
        (("::1", 5000), True),
        (("fd12:3456::1", 5000), True),
        (("::ffff:10.0.0.7", 5000), True),
        ((OUTSIDER, 5000), False),
        (("192.0.2.1", 5000), False),
        (("8.8.8.8", 5000), False),
        (("172.32.0.1", 5000), False),
        (("2001:db8::1", 5000), False),
        (("::ffff:8.8.8.8", 5000), False),
        (("not-an-address", 5000), False),
        (None, False),
    ],
)
def test_who_may_read_the_metrics(client: tuple[str, int] | None, allowed: bool) -> None:
    assert may_read_metrics(client) is allowed


async def call(app: SecurityMiddleware, scope: Scope, receive: Receive | None = None) -> list[Message]:
    """The messages ``app`` sends for ``scope``, called as uvicorn calls an ASGI app."""
    sent: list[Message] = []

    async def no_body() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def record(message: Message) -> None:
        sent.append(message)

    await app(scope, receive or no_body, record)
    return sent


def http_scope(path: str, client: tuple[str, int] | None) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": client,
        "server": ("127.0.0.1", 9090),
    }


async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Stands for Streamlit's routes: its metrics, and a framing header of its own."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"x-frame-options", b"ALLOWALL")],
        }
    )
    await send({"type": "http.response.body", "body": b"# TYPE session_events counter\n"})


async def test_the_middleware_refuses_the_metrics_to_an_outsider() -> None:
    app = SecurityMiddleware(metrics_app)
    sent = await call(app, http_scope("/_stcore/metrics", (OUTSIDER, 40000)))
    assert sent[0]["status"] == 404 and b"# TYPE" not in sent[1]["body"]
    assert {k.decode(): v.decode() for k, v in sent[0]["headers"]}.items() >= {**FRAMING, **OTHERS}.items()
    sent = await call(app, http_scope("/_stcore/metrics", ("10.0.0.5", 40000)))
    assert sent[0]["status"] == 200 and b"# TYPE" in sent[1]["body"]
    headers = [(k.decode(), v.decode()) for k, v in sent[0]["headers"]]
    # The app's own framing header is replaced, not sent beside ours.
    assert [v for k, v in headers if k == "x-frame-options"] == ["SAMEORIGIN"]
    assert ("content-type", "text/plain") in headers


async def test_the_middleware_passes_websockets_and_lifespan_untouched() -> None:
    seen: list[tuple[Scope, Receive, Send]] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))
        await send({"type": "websocket.accept", "subprotocol": "streamlit", "headers": []})

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    app = SecurityMiddleware(inner)
    for scope in (
        {"type": "websocket", "path": "/_stcore/stream", "client": (OUTSIDER, 40000), "headers": []},
        {"type": "lifespan"},
    ):
        await app(scope, receive, send)
        assert seen[-1] == (scope, receive, send)
    assert sent == [{"type": "websocket.accept", "subprotocol": "streamlit", "headers": []}] * 2
