"""`make run`'s supervisor: one group of API, workers and UI; SIGTERM stops them all, and a child
that dies is started again while the others keep serving."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from api.app.core.config import Settings
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD
from tests.images import encode
from tests.support import ARTIFACTS, ROOT, api_env, free_port, http_ok, wait_until


def start_group(settings: Settings, tag: str) -> tuple[subprocess.Popen[bytes], int, int, object]:
    api_port, ui_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        **api_env(
            settings,
            API_PORT=str(api_port),
            UI_PORT=str(ui_port),
            API_URL=f"http://127.0.0.1:{api_port}",
            MODEL_WORKERS="2",
            WORKER_ID="",
        ),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / f"run-{tag}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "scripts/run.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, api_port, ui_port, log


def assert_group_ends(proc: subprocess.Popen[bytes], children: list[psutil.Process]) -> None:
    proc.wait(30)
    _gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [c.cmdline() for c in alive]


def kill_all(proc: subprocess.Popen[bytes], seen: list[psutil.Process]) -> None:
    """Leaves nothing behind, even when the supervisor itself misbehaved."""
    if proc.poll() is None:
        seen = seen + psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
    for child in seen:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def test_sigterm_stops_every_child(settings: Settings) -> None:
    proc, api_port, ui_port, log = start_group(settings, "sigterm")
    children: list[psutil.Process] = []
    try:
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{api_port}/docs") and http_ok(f"http://127.0.0.1:{ui_port}"),
            90,
            "API and UI",
        )
        children = psutil.Process(proc.pid).children(recursive=True)
        services = [c.cmdline()[-1] for c in children if c.cmdline()[-2:-1] == ["-m"]]
        services += ["ui" for c in children if "streamlit" in c.cmdline()[1:3]]  # python -m ui execs streamlit
        assert sorted(services) == ["api", "model", "model", "model.explainer", "model.trainer", "ui"], services
        proc.send_signal(signal.SIGTERM)
        assert_group_ends(proc, children)
    finally:
        kill_all(proc, children)
        log.close()  # type: ignore[attr-defined]
    output = (ARTIFACTS / "run-sigterm.log").read_text()
    assert f"http://localhost:{api_port}/docs" in output and "admin@example.com" in output


def command(process: psutil.Process) -> list[str]:
    """A child's command line; empty once it is gone or a zombie."""
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def supervisord(proc: subprocess.Popen[bytes]) -> psutil.Process:
    """The supervisord that scripts/run.py runs as its child."""
    (found,) = [c for c in psutil.Process(proc.pid).children() if "supervisor.supervisord" in command(c)]
    return found


def test_a_killed_worker_is_restarted_while_the_portal_keeps_serving(settings: Settings) -> None:
    """SIGKILL (as the kernel's OOM killer sends it) one of two model workers while a client keeps
    predicting: every prediction is answered (or runs out of its deadline), the worker is started
    again and serves, and the restart is in the log."""
    proc, api_port, ui_port, log = start_group(settings, "crash")
    url = f"http://127.0.0.1:{api_port}"
    children: list[psutil.Process] = []
    try:
        wait_until(lambda: http_ok(f"{url}/health/ready") and http_ok(f"http://127.0.0.1:{ui_port}"), 120, "portal")
        children = psutil.Process(proc.pid).children(recursive=True)
        workers = [c for c in children if c.cmdline()[-2:] == ["-m", "model"]]
        assert len(workers) == 2
        token = httpx.post(f"{url}/v1/auth/login", data={"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD}).json()[
            "access_token"
        ]
        rng = np.random.default_rng(7)
        codes: list[int] = []
        stop = threading.Event()

        def predict_until_stopped() -> None:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
                while not stop.is_set():
                    # A new picture each time: no answer comes from the result cache.
                    pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
                    photo = encode(Image.fromarray(pixels), "PNG")
                    r = client.post(
                        "/model/predict", params={"models": "mobilenet_v2@1"}, files={"file": ("p.png", photo)}
                    )
                    codes.append(r.status_code)

        client_thread = threading.Thread(target=predict_until_stopped)
        client_thread.start()
        try:
            wait_until(lambda: len(codes) >= 3, 60, "first predictions")
            workers[0].kill()

            def restarted() -> list[psutil.Process]:
                children = supervisord(proc).children()
                return [c for c in children if command(c)[-2:] == ["-m", "model"]]

            wait_until(
                lambda: len(restarted()) == 2 and workers[0].pid not in {c.pid for c in restarted()}, 30, "restart"
            )
            assert http_ok(f"{url}/health/live") and http_ok(f"http://127.0.0.1:{ui_port}")
            wait_until(lambda: http_ok(f"{url}/health/ready"), 120, "the new worker to serve")
            served = len(codes)
            wait_until(lambda: len(codes) >= served + 3, 60, "predictions after the restart")
        finally:
            stop.set()
            client_thread.join(90)
        assert set(codes) <= {200, 504}, codes
        assert codes.count(200) >= 6
        assert proc.poll() is None, "the group stopped"
        proc.send_signal(signal.SIGTERM)
        assert_group_ends(proc, psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else [])
    finally:
        kill_all(proc, children)
        log.close()  # type: ignore[attr-defined]
    output = (ARTIFACTS / "run-crash.log").read_text()
    assert (
        "exited: model.1 (terminated by SIGKILL; not expected)" in output
        or "exited: model.2 (terminated by SIGKILL; not expected)" in output
    ), output[-3000:]


def test_the_demo_retrains_by_itself_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from scripts.run import DEMO_RETRAIN_MIN_NEW_LABELS, demo_environment

    monkeypatch.delenv("RETRAIN_MIN_NEW_LABELS", raising=False)
    unset = Settings(_env_file=None)  # type: ignore[call-arg]
    assert demo_environment(unset) == {"RETRAIN_MIN_NEW_LABELS": str(DEMO_RETRAIN_MIN_NEW_LABELS)}
    monkeypatch.setenv("RETRAIN_MIN_NEW_LABELS", "0")
    assert demo_environment(Settings(_env_file=None)) == {}  # type: ignore[call-arg]
