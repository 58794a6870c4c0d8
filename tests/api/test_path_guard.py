"""No route is reachable by a path other than its own: a path holding a control character
(``/metrics%0A``, which a proxy denying ``/metrics`` lets through and Starlette's ``^/metrics$``
still matches) is refused before routing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.types import Message

from api.app.core.config import Settings
from api.app.core.path_guard import PathGuardMiddleware, has_control_character
from api.app.main import create_app


@pytest.fixture
async def bare_client() -> AsyncIterator[httpx.AsyncClient]:
    """The app without its start-up (no database or Redis): routing and middlewares only."""
    app = create_app(Settings(_env_file=None, secret_key="k" * 48))  # type: ignore[call-arg]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        yield client


@pytest.mark.parametrize(
    "path",
    [
        "/metrics%0A",
        "/metrics%0a",
        "/health/live%0A",
        "/v1/images%0D",
        "/v1/images%0D%0A",
        "/metrics%00",
        "/metrics%09",
        "/metrics%7F",
        "/metrics%C2%85",  # NEL, a C1 control
        "/v1/images/%0A/predictions",
    ],
)
async def test_a_path_with_a_control_character_is_refused(bare_client: httpx.AsyncClient, path: str) -> None:
    for method in ("GET", "HEAD", "POST"):
        r = await bare_client.request(method, httpx.URL(f"http://api{path}"))
        assert r.status_code == 404, (method, path, r.status_code)
        assert "# TYPE" not in r.text
        if method == "GET":
            assert r.json() == {"detail": "Not Found: the path holds a control character."}
            # Still answered through the request-context middleware: id and security headers.
            assert r.headers["x-request-id"] and r.headers["x-content-type-options"] == "nosniff"


async def test_the_real_paths_still_work(bare_client: httpx.AsyncClient) -> None:
    metrics = await bare_client.get("/metrics")
    assert metrics.status_code == 200 and "# TYPE" in metrics.text
    assert (await bare_client.get("/health/live")).status_code == 200
    # A percent-encoded printable character is not a control character.
    assert (await bare_client.get(httpx.URL("http://api/health/%6Cive"))).status_code == 200
    assert (await bare_client.get("/v1/images")).status_code == 401  # routed: it wants a caller
    assert "control character" not in (await bare_client.get("/metrics/")).text


async def test_a_websocket_handshake_with_such_a_path_is_refused() -> None:
    reached: list[str] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        reached.append(str(scope.get("path", scope["type"])))

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    guard = PathGuardMiddleware(app)  # type: ignore[arg-type]
    await guard({"type": "websocket", "path": "/ws\n", "headers": []}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}] and reached == []
    await guard({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
    assert reached == ["/ws"]
    await guard({"type": "lifespan"}, receive, send)  # other scopes pass untouched
    assert len(reached) == 2


def test_control_characters_are_c0_del_and_c1() -> None:
    assert all(has_control_character(f"/a{chr(c)}") for c in [*range(0x20), *range(0x7F, 0xA0)])
    assert not any(has_control_character(f"/a{chr(c)}") for c in range(0x20, 0x7F))
    assert not has_control_character("/v1/images/caf\u00e9 \u00a0x")
