"""``python -m api``: the served process itself."""

from __future__ import annotations

import http.client
import time
from urllib.parse import urlsplit

from api.app.core.config import Settings
from tests.support import start_api


def test_an_idle_connection_outlives_a_clients_pause(settings: Settings) -> None:
    """A client pausing a few seconds between requests (Locust's users pause 1-5 s) reuses its
    connection: the server must not have closed it meanwhile (uvicorn's own default is 5 s)."""
    api, url = start_api("keep-alive", settings)
    try:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
        conn.request("GET", "/health/live")
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        sock = conn.sock
        time.sleep(6.5)
        conn.request("GET", "/health/live")
        second = conn.getresponse()
        second.read()
        assert second.status == 200
        assert conn.sock is sock, "the connection was reopened"
    finally:
        api.stop()
