"""What the UI's own server adds to Streamlit's: headers that keep its pages out of other sites'
frames, and Streamlit's metrics for monitoring only. Wherever the UI runs (behind the compose
nginx, a Kubernetes Ingress, or on its own with ``make run``), not only where a proxy adds them."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    # No other site may frame the pages (clickjacking: a hidden portal page under a decoy's
    # buttons), in old browsers (X-Frame-Options) and new ones (CSP frame-ancestors).
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"content-security-policy", b"frame-ancestors 'self'"),
    (b"x-content-type-options", b"nosniff"),
    # Not no-referrer: under that policy a browser sends "Origin: null" with the page's own
    # uploads (PUT), which a same-origin check would refuse; same-origin still tells other sites
    # nothing.
    (b"referrer-policy", b"same-origin"),
)
"""Headers of every HTTP answer of the UI (names in lower case, as ASGI carries them)."""

METRICS_PATH = "/_stcore/metrics"
"""Streamlit's metrics (sessions, cache sizes): every path starting with it."""

MONITORING_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128", "fc00::/7")
)
"""Where Prometheus, probes and operators call from: loopback and the private networks, as the
nginx in front allows them. Not ``is_private``, which also counts the documentation ranges
(192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) and others that are not a local network."""


def may_read_metrics(client: Sequence[object] | None) -> bool:
    """Whether the client at ``client`` (an ASGI scope's ``client``: host and port, after the
    trusted proxies' X-Forwarded-For) is on loopback or a private network."""
    if not client:
        return False
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in MONITORING_NETWORKS)


class SecurityMiddleware:
    """Pure ASGI middleware: adds :data:`SECURITY_HEADERS` to every HTTP answer (replacing any the
    app sent) and answers 404 to Streamlit's metrics for clients outside
    :data:`MONITORING_NETWORKS`. WebSocket and lifespan scopes pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serves one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                ours = {name for name, _ in SECURITY_HEADERS}
                kept = [(name, value) for name, value in message.get("headers", []) if name.lower() not in ours]
                message = {**message, "headers": [*kept, *SECURITY_HEADERS]}
            await send(message)

        if scope["path"].startswith(METRICS_PATH) and not may_read_metrics(scope.get("client")):
            await not_found(send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


async def not_found(send: Send) -> None:
    """A plain 404, as for any path the UI does not serve."""
    body = b"Not Found"
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
