"""nginx as the front door, with the project's own config: Debian's nginx runs
``deploy/nginx/portal.conf.template`` (rendered as the nginx image renders it in compose, its sums
made by the same ``portal-limits.envsh``) on a free port, in front of the real API, the real UI and
the suite's model worker, as the user running the tests, its files in a temporary directory."""

from __future__ import annotations

import getpass
import json
import os
import random
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as websocket_connect
from websockets.typing import Origin, Subprotocol

import tests.test_integration as integration
from api.app.core.config import Settings
from api.app.main import create_app
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD
from tests.support import ROOT, Service, free_port, http_ok, service, start_api, wait_until

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="Debian's nginx is not installed (make nginx)")

DEPLOY = ROOT / "deploy" / "nginx"
TEMPLATE = DEPLOY / "portal.conf.template"
LIMITS = DEPLOY / "portal-limits.envsh"
PLACEHOLDER = re.compile(r"\$(\{)?(PORTAL_\w*)(?(1)\})")
"""What the nginx image's entrypoint fills in with NGINX_ENVSUBST_FILTER=PORTAL_: $NAME or ${NAME}."""

# Small limits, so the refused bodies are quick to send; the batch limit above the upload one.
MAX_UPLOAD_BYTES = 1024 * 1024
MAX_BATCH_BYTES = 3 * 1024 * 1024


def limits(**settings: str) -> dict[str, str]:
    """The PORTAL_* values ``portal-limits.envsh`` exports for these API settings, sourced by sh
    as the image's entrypoint sources it."""
    env = {"PATH": os.environ["PATH"], **settings}
    done = subprocess.run(["sh", "-c", f'. "{LIMITS}" && env'], env=env, capture_output=True, text=True, check=True)
    pairs = (line.partition("=") for line in done.stdout.splitlines())
    return {name: value for name, _, value in pairs if name.startswith("PORTAL_")}


def render(values: dict[str, str]) -> str:
    """The template with its placeholders filled in, as the image does (a name without a value
    is left as it is); fails if one is left."""
    text = PLACEHOLDER.sub(lambda m: values.get(m.group(2), m.group(0)), TEMPLATE.read_text())
    assert not PLACEHOLDER.search(text), f"unfilled placeholders: {sorted(set(PLACEHOLDER.findall(text)))}"
    return text


def main_config(directory: Path, site: Path) -> str:
    """An nginx.conf that runs without root: pid, logs and temporary files in ``directory``, in the
    foreground; the site included in its http block, as the image includes conf.d/."""
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx would hand its workers to "nobody", who cannot enter pytest's private tmp.
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
    return f"""{user}
daemon off;
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    access_log {directory / "access.log"};
    sendfile on;
    keepalive_timeout 65;
{temp}
    include {site};
}}
"""


def nginx(directory: Path, *args: str) -> list[str]:
    return [
        "nginx",
        "-p",
        str(directory),
        "-e",
        str(directory / "error.log"),
        "-c",
        str(directory / "nginx.conf"),
        *args,
    ]


def start_nginx(directory: Path, values: dict[str, str]) -> tuple[Service, str]:
    """nginx running the template rendered with ``values`` (files in ``directory``), once it answers
    /health/live; the running nginx and its URL."""
    site = directory / "portal.conf"
    site.write_text(render(values))
    (directory / "nginx.conf").write_text(main_config(directory, site))
    checked = subprocess.run(nginx(directory, "-t"), capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0 and "test is successful" in checked.stderr, checked.stderr
    url = f"http://{values['PORTAL_LISTEN']}"
    door = service(
        f"nginx-{url.rpartition(':')[2]}", nginx(directory), {}, lambda: http_ok(f"{url}/health/live"), timeout=20
    )
    return door, url


@dataclass
class FrontDoor:
    url: str
    api_url: str
    values: dict[str, str]
    config: str


def _ui(api_url: str) -> tuple[Service, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "API_URL": api_url,
        "UI_HOST": "127.0.0.1",
        "UI_PORT": str(port),
        "UI_TRUSTED_PROXIES": "127.0.0.1",
        "MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "MAX_BATCH_BYTES": str(MAX_BATCH_BYTES),
    }
    return service(f"nginx-ui-{port}", [sys.executable, "-m", "ui"], env, lambda: http_ok(f"{url}/_stcore/health")), url


@pytest.fixture(scope="module")
def front_door(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    directory = tmp_path_factory.mktemp("nginx")
    api, api_url = start_api(
        "nginx-api",
        settings,
        # nginx reaches the API from 127.0.0.1: the one proxy it trusts.
        TRUSTED_PROXIES="127.0.0.1",
        MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
        MAX_BATCH_BYTES=str(MAX_BATCH_BYTES),
    )
    ui: Service | None = None
    door: Service | None = None
    try:
        ui, ui_url = _ui(api_url)
        port = free_port()
        values = {
            "PORTAL_LISTEN": f"127.0.0.1:{port}",
            "PORTAL_API": api_url.removeprefix("http://"),
            "PORTAL_UI": ui_url.removeprefix("http://"),
            **limits(
                MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
                MAX_BATCH_BYTES=str(MAX_BATCH_BYTES),
                PREDICT_DEADLINE_SECONDS=str(settings.predict_deadline_seconds),
                EXPLANATION_WAIT_SECONDS=str(settings.explanation_wait_seconds),
            ),
        }
        door, url = start_nginx(directory, values)
        yield FrontDoor(url, api_url, values, render(values))
    finally:
        for child in (door, ui):
            if child is not None:
                child.stop()
        api.stop()
        if (log := directory / "error.log").exists():
            shutil.copy(log, ROOT / "test-artifacts" / "nginx-error.log")


def headers_of(client: httpx.Client, method: str, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    """The answer's status and headers, its body left unread: a server that answers before reading
    the whole request closes the connection, and nginx may then pass the answer's headers on and
    cut its body (the closing connection is reset, with the body still in flight)."""
    with client.stream(method, url, content=body, headers=headers) as response:
        return response


def answered_by_api(response: httpx.Response) -> bool:
    """Whether the API wrote this answer: it adds its own time to every one (Server-Timing)."""
    return response.headers.get("server-timing", "").startswith("app;dur=")


def test_the_limits_follow_the_api_settings() -> None:
    """The sums compose's nginx gets: the API's body limit (its setting plus the multipart
    allowance it grants) and a wait above the prediction deadline; defaults when unset."""
    from api.app.core.body_limits import MULTIPART_OVERHEAD, BodyLimitMiddleware

    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    longest = max(defaults.predict_deadline_seconds, defaults.explanation_wait_seconds)
    assert limits() == {
        "PORTAL_UPLOAD_BODY": str(defaults.max_upload_bytes + MULTIPART_OVERHEAD),
        "PORTAL_BATCH_BODY": str(defaults.max_batch_bytes + MULTIPART_OVERHEAD),
        "PORTAL_UPLOAD_MB": "10",
        "PORTAL_BATCH_MB": "2048",
        "PORTAL_API_TIMEOUT": str(int(longest) + 30),
        # No Docker gateway named: an address no client has, so the rule refuses nobody.
        "PORTAL_DOCKER_GATEWAY": "192.0.2.1",
    }
    assert limits(PORTAL_DOCKER_GATEWAY="172.28.0.1")["PORTAL_DOCKER_GATEWAY"] == "172.28.0.1"
    assert limits(PREDICT_DEADLINE_SECONDS="45.5")["PORTAL_API_TIMEOUT"] == "75"
    # A heatmap may be waited for longer than a prediction (EXPLANATION_WAIT_SECONDS, up to 120 s):
    # nginx waits past whichever is longer.
    assert limits(EXPLANATION_WAIT_SECONDS="100")["PORTAL_API_TIMEOUT"] == "130"
    assert limits(EXPLANATION_WAIT_SECONDS="100.5", PREDICT_DEADLINE_SECONDS="45.5")["PORTAL_API_TIMEOUT"] == "130"
    assert limits(EXPLANATION_WAIT_SECONDS="10", PREDICT_DEADLINE_SECONDS="90")["PORTAL_API_TIMEOUT"] == "120"
    # The MB in nginx's 413 answers are the API's own (Python's :g): half a MiB is not 0 MB.
    for size in (524288, 1_000_000, 1536 * 1024, 3 * 2**20, 100):
        mb = limits(MAX_UPLOAD_BYTES=str(size), MAX_BATCH_BYTES=str(size))
        assert mb["PORTAL_UPLOAD_MB"] == mb["PORTAL_BATCH_MB"] == f"{size / 2**20:g}", size
        limit = BodyLimitMiddleware(lambda *_: None, max_upload_bytes=size, max_batch_bytes=size)  # type: ignore[arg-type]
        assert f"at most {mb['PORTAL_UPLOAD_MB']} MB per file." in limit._too_large(True)
        assert f"at most {mb['PORTAL_BATCH_MB']} MB in all" in limit._too_large(True, batch=True)
    assert limits(MAX_UPLOAD_BYTES="524288")["PORTAL_UPLOAD_MB"] == "0.5"
    assert int(limits()["PORTAL_API_TIMEOUT"]) > longest
    assert int(limits(EXPLANATION_WAIT_SECONDS="120")["PORTAL_API_TIMEOUT"]) > 120


def test_a_photo_is_classified_through_nginx(front_door: FrontDoor, worker: Service) -> None:
    """The integration check (log in, upload, predict, feedback, the v1 routes) through the door,
    with the suite's model worker."""
    wait_until(lambda: http_ok(f"{front_door.url}/health/ready"), 120, "the portal to be ready", interval=0.3)
    integration.test_login_upload_predict_feedback((front_door.url, ADMIN_EMAIL, ADMIN_PASSWORD))


def test_every_api_route_goes_to_the_api_and_the_rest_to_the_ui(settings: Settings, front_door: FrontDoor) -> None:
    app = create_app(settings)
    paths = [re.sub(r"\{[^}]+\}", "1", p) for p in app.openapi()["paths"]]
    docs = [app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url, "/metrics"]
    with httpx.Client(base_url=front_door.url, timeout=30) as client:
        for path in [*paths, *docs]:
            assert path is not None
            r = client.get(path)
            assert answered_by_api(r), (path, r.status_code, r.headers)
        for path in ("/", "/classify", "/_stcore/health", "/login-help", "/v1x", "/healthz"):
            r = client.get(path)
            assert r.status_code == 200 and not answered_by_api(r), (path, r.status_code)
        assert "<html" in client.get("/").text.lower()


def _get(url: str, path: str, source: str = "127.0.0.1", **headers: str) -> httpx.Response:
    """``GET path`` sent as it is (no normalisation of its escapes) from the local address ``source``."""
    with httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address=source)) as client:
        return client.get(httpx.URL(f"{url}{path}"), headers=headers)


MONITORING_LOCATIONS = (r"~ ^/(metrics|health/ready)", r"~ ^/_stcore/metrics")
"""The locations of the monitoring routes: the API's and Streamlit's own metrics."""


def access_rules(config: str) -> dict[str, list[str]]:
    """Each monitoring location's allow and deny rules, in order (nginx applies the first that matches)."""
    rules = {}
    for location in MONITORING_LOCATIONS:
        body = re.search(rf"location {re.escape(location)} \{{(.*?)\}}", config, re.S)
        assert body, f"a location {location}"
        rules[location] = re.findall(r"^\s*((?:allow|deny) \S+);", body[1], re.M)
    return rules


def test_monitoring_routes_answer_private_networks_only(front_door: FrontDoor) -> None:
    """/metrics, /health/ready and Streamlit's /_stcore/metrics are for Prometheus and operators:
    nginx serves them to loopback and the private networks only (127.0.0.1 here; a client at
    127.0.0.2 stands for the internet), whatever the path looks like after /metrics."""
    allowed = ["allow 127.0.0.1", "allow 10.0.0.0/8", "allow 172.16.0.0/12", "allow 192.168.0.0/16", "deny all"]
    gateway = f"deny {front_door.values['PORTAL_DOCKER_GATEWAY']}"
    for location, rules in access_rules(front_door.config).items():
        assert rules == [gateway, *allowed], location
    r = _get(front_door.url, "/metrics")
    assert r.status_code == 200 and "# TYPE" in r.text and answered_by_api(r)
    assert answered_by_api(_get(front_door.url, "/health/ready"))
    r = _get(front_door.url, "/_stcore/metrics")
    assert r.status_code == 200 and "# TYPE" in r.text and not answered_by_api(r)
    outsider = f"127.0.0.{random.randint(2, 254)}"
    for path in (
        "/metrics",
        "/health/ready",
        "/metrics%0A",
        "/metrics/",
        "/metricsx",
        "/health/ready%0A",
        "/_stcore/metrics",
        "/_stcore/metrics?families=session_events",
        "/_stcore/metrics/",
        "//_stcore/metrics",
        "/_stcore/metrics%0A",
    ):
        r = _get(front_door.url, path, outsider)
        assert r.status_code == 403 and not answered_by_api(r) and "# TYPE" not in r.text, (path, r.status_code)
    # /health/live stays open to all (load balancers' checks).
    assert _get(front_door.url, "/health/live", outsider).status_code == 200


def test_the_docker_gateway_is_refused_the_monitoring_routes(
    front_door: FrontDoor, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Behind Docker's userland proxy every IPv6 client (and a hairpin connection) arrives from the
    compose network's gateway, a private address: nginx refuses it the monitoring routes before it
    allows the private networks. Here the gateway is named 127.0.0.1, the one allowed loopback
    address, and the client comes from it; the portal itself stays open to it."""
    values = {**front_door.values, "PORTAL_LISTEN": f"127.0.0.1:{free_port()}", "PORTAL_DOCKER_GATEWAY": "127.0.0.1"}
    door, url = start_nginx(tmp_path_factory.mktemp("nginx-gateway"), values)
    try:
        for path in ("/metrics", "/health/ready", "/_stcore/metrics"):
            r = _get(url, path, "127.0.0.1")
            assert r.status_code == 403 and not answered_by_api(r), (path, r.status_code)
        assert _get(url, "/health/live", "127.0.0.1").status_code == 200
        assert _get(url, "/", "127.0.0.1").status_code == 200
    finally:
        door.stop()


@pytest.mark.parametrize("path", ["/metrics%0A", "/metrics%0D", "/health/live%0A", "/v1/images%0D", "/login%0A"])
def test_a_path_with_a_control_character_is_not_served(front_door: FrontDoor, path: str) -> None:
    """nginx matches the decoded path ("/metrics\n") and passes the request on as it came; the API
    refuses it rather than route it to /metrics (Python's $ matches before a trailing newline)."""
    r = _get(front_door.url, path)
    assert r.status_code in (400, 403, 404), (path, r.status_code)
    assert "# TYPE" not in r.text


def test_the_ui_may_not_be_framed_by_another_site(front_door: FrontDoor) -> None:
    for path in ("/", "/classify", "/_stcore/health"):
        r = _get(front_door.url, path)
        assert r.headers.get("x-frame-options") == "SAMEORIGIN", path
        assert r.headers.get("content-security-policy") == "frame-ancestors 'self'", path


def test_a_header_of_megabytes_is_refused_by_nginx_before_the_api(front_door: FrontDoor) -> None:
    """uvicorn's parser bounds no header: one of hundreds of MB kept the API's event loop busy for
    seconds. nginx refuses a header past 8 KB itself (400), the API never sees it."""
    r = _get(front_door.url, "/v1/users/me", **{"X-Big": "x" * 1_000_000})
    assert r.status_code == 400 and not answered_by_api(r), (r.status_code, r.text[:200])
    assert _get(front_door.url, "/health/live", **{"X-Small": "x" * 4000}).status_code == 200


def test_no_upgrade_is_passed_to_the_api(front_door: FrontDoor) -> None:
    """A WebSocket handshake is passed to the UI's stream only: to the API's routes nginx sends
    neither Upgrade nor Connection, so the API answers a plain request."""
    handshake = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    for path in ("/health/live", "/openapi.json", "/metrics"):
        r = _get(front_door.url, path, **handshake)
        assert r.status_code == 200 and answered_by_api(r), (path, r.status_code)


def test_the_ui_websocket_is_upgraded(front_door: FrontDoor) -> None:
    """Streamlit's session runs over /_stcore/stream: the handshake through nginx gets 101, with
    the browser's Origin matching the Host nginx passes on (Streamlit refuses a foreign origin)."""
    ws_url = front_door.url.replace("http://", "ws://") + "/_stcore/stream"
    with websocket_connect(
        ws_url, origin=Origin(front_door.url), subprotocols=[Subprotocol("streamlit")], open_timeout=10
    ) as ws:
        assert ws.response is not None and ws.response.status_code == 101
        assert ws.subprotocol == "streamlit"


def test_a_body_over_the_limit_is_refused_by_nginx(front_door: FrontDoor) -> None:
    upload_limit = int(front_door.values["PORTAL_UPLOAD_BODY"])
    batch_limit = int(front_door.values["PORTAL_BATCH_BODY"])
    # A connection each: a server that answers before reading the whole body closes the connection
    # after it, and a request sent on it before the close arrives gets no answer at all.
    multipart = {"content-type": "multipart/form-data; boundary=x", "connection": "close"}
    with httpx.Client(base_url=front_door.url, timeout=30) as client:
        # What the API takes passes (it answers: 401, no token), one byte more is nginx's 413.
        at_limit = headers_of(client, "POST", "/v1/images", b"x" * upload_limit, multipart)
        # nginx let it through: the API's 401, or, when the API answered and closed before nginx had
        # sent the whole body, nginx's 502 for the cut connection (a race seen under load).
        assert at_limit.status_code in (401, 502), at_limit.status_code
        assert at_limit.status_code == 502 or answered_by_api(at_limit)
        over = client.post("/v1/images", content=b"x" * (upload_limit + 1), headers=multipart)
        assert over.status_code == 413 and not answered_by_api(over)
        assert over.json() == {"detail": f"The upload is too large: at most {MAX_UPLOAD_BYTES // 2**20} MB per file."}
        # A batch has its own, larger limit.
        batch = headers_of(client, "POST", "/v1/batches", b"x" * (upload_limit + 1), multipart)
        assert batch.status_code in (401, 502), batch.status_code  # the same race as above
        assert batch.status_code == 502 or answered_by_api(batch)
        over = client.post("/v1/batches", content=b"x" * (batch_limit + 1), headers=multipart)
        assert over.status_code == 413 and not answered_by_api(over)
        assert "The batch is too large" in over.json()["detail"]
        # So has the UI's uploader (the Batch page takes up to MAX_BATCH_BYTES).
        ui_upload = headers_of(client, "PUT", "/_stcore/upload_file/s/f", b"x" * (upload_limit + 1), multipart)
        assert ui_upload.status_code != 413
        over = client.put("/_stcore/upload_file/s/f", content=b"x" * (batch_limit + 1), headers=multipart)
        assert over.status_code == 413


def _failed_logins(url: str, source: str, count: int) -> list[int]:
    """``count`` failed logins from the local address ``source``, each claiming another address."""
    codes = []
    with httpx.Client(base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address=source)) as client:
        for i in range(count):
            form = {"username": f"probe-{uuid.uuid4().hex[:10]}@example.com", "password": "not-the-password"}
            r = client.post("/login", data=form, headers={"X-Forwarded-For": f"10.9.{i}.7"})
            codes.append(r.status_code)
    return codes


def test_the_api_takes_the_client_address_from_nginx_alone(front_door: FrontDoor) -> None:
    """The login throttle counts 20 failures per client address. Through nginx, a client's forged
    X-Forwarded-For is ignored (nginx appends the real address, the one the API takes) and two
    clients are two; straight to the API, the header from a client that is not nginx is ignored.
    (Each run takes fresh loopback addresses: the throttle's counts outlive it.)"""
    one, two, direct = (f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{n}" for n in (11, 12, 13))
    assert _failed_logins(front_door.url, one, 21) == [401] * 20 + [429]
    assert _failed_logins(front_door.url, two, 1) == [401]  # another client behind nginx
    assert _failed_logins(front_door.api_url, direct, 21) == [401] * 20 + [429]


def test_json_is_compressed(front_door: FrontDoor) -> None:
    with httpx.Client(base_url=front_door.url, timeout=30) as client:
        r = client.get("/openapi.json", headers={"Accept-Encoding": "gzip"})
        assert r.headers.get("content-encoding") == "gzip" and "accept-encoding" in r.headers.get("vary", "").lower()
        assert json.loads(r.content)["openapi"]  # httpx undid the compression
        plain = client.get("/openapi.json", headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers and plain.json() == r.json()
