"""`make run`'s supervisor: one group of API, workers and UI; SIGTERM stops them all, and a child
that dies is started again while the others keep serving."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

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


def test_a_killed_worker_is_restarted_and_sigterm_stops_every_child(settings: Settings) -> None:
    """One group runs every service (two model workers); SIGKILL (as the kernel's OOM killer sends
    it) one worker while a client keeps predicting: every prediction is answered (or runs out of
    its deadline), the worker is started again and serves, and the restart is in the log. SIGTERM
    then stops every child, and the group's configuration goes with it."""
    proc, api_port, ui_port, log = start_group(settings, "crash")
    url = f"http://127.0.0.1:{api_port}"
    children: list[psutil.Process] = []
    try:
        wait_until(lambda: http_ok(f"{url}/health/ready") and http_ok(f"http://127.0.0.1:{ui_port}"), 120, "portal")
        children = psutil.Process(proc.pid).children(recursive=True)
        services = [c.cmdline()[-1] for c in children if c.cmdline()[-2:-1] == ["-m"]]
        services += ["ui" for c in children if "streamlit" in c.cmdline()[1:3]]  # python -m ui execs streamlit
        # No API_URL given: the UI is told the API this group started, not the default port.
        (ui,) = [c for c in children if "streamlit" in c.cmdline()[1:3]]
        assert ui.environ().get("API_URL") == f"http://127.0.0.1:{api_port}", ui.environ().get("API_URL")
        # model.prepare runs once beside them (it trains what `make run` left untrained), here
        # with nothing left to do: it ends by itself, and nothing starts it again.
        assert sorted(s for s in services if s != "model.prepare") == [
            "api",
            "model",
            "model",
            "model.explainer",
            "model.trainer",
            "ui",
        ], services
        wait_until(
            lambda: "exited: prepare (exit status 0; expected)" in (ARTIFACTS / "run-crash.log").read_text(),
            120,
            "model.prepare's end",
        )
        workers = [c for c in children if command(c)[-2:] == ["-m", "model"]]
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
        children = psutil.Process(proc.pid).children(recursive=True)
        conf = Path(next(arg for arg in command(supervisord(proc)) if arg.endswith("supervisord.conf")))
        assert conf.exists()
        proc.send_signal(signal.SIGTERM)
        assert_group_ends(proc, children)
    finally:
        kill_all(proc, children)
        log.close()  # type: ignore[attr-defined]
    assert not conf.parent.exists()  # its configuration and pid file went with the group
    output = (ARTIFACTS / "run-crash.log").read_text()
    assert f"http://localhost:{api_port}/docs" in output and "admin@example.com" in output
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


def test_the_ui_is_given_the_api_this_group_starts_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from scripts.run import ui_environment
    from ui.config import UISettings

    monkeypatch.delenv("API_URL", raising=False)
    ui = UISettings(_env_file=None)  # type: ignore[call-arg]
    api = Settings(_env_file=None, api_port=8200)  # type: ignore[call-arg]
    assert ui_environment(api, ui) == {"API_URL": "http://127.0.0.1:8200"}
    everywhere = Settings(_env_file=None, api_host="0.0.0.0", api_port=8300)  # type: ignore[call-arg]
    assert ui_environment(everywhere, ui) == {"API_URL": "http://127.0.0.1:8300"}
    monkeypatch.setenv("API_URL", "http://api.internal:8000")
    assert ui_environment(api, UISettings(_env_file=None)) == {}  # type: ignore[call-arg]


SLEEPER = f"{sys.executable} -c 'import time; time.sleep(600)'"

GROUP = """
import sys
from pathlib import Path
from scripts.run import run_group

sys.exit(run_group(Path(sys.argv[1])))
"""
"""What scripts/run.py does once the portal's settings and servers are ready: the group run."""


def test_children_left_by_a_killed_supervisord_are_ended(tmp_path: Path) -> None:
    """supervisord SIGKILLed (its children live on, re-parented): the script ends every one of
    them, then exits, leaving nothing serving. A tiny group of two sleepers stands for the portal."""
    from scripts.run import program

    conf = tmp_path / "supervisord.conf"
    conf.write_text(
        f"[supervisord]\nnodaemon=true\nlogfile=/dev/null\nlogfile_maxbytes=0\npidfile={tmp_path / 'pid'}\n"
        f"childlogdir={tmp_path}\n" + program("sleeper", SLEEPER, numprocs=2)
    )
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "run-supervisord-killed.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", GROUP, str(conf)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    sleepers: list[psutil.Process] = []
    try:

        def started() -> bool:
            nonlocal sleepers
            assert proc.poll() is None, (ARTIFACTS / "run-supervisord-killed.log").read_text()
            sleepers = [
                c for c in psutil.Process(proc.pid).children(recursive=True) if "time.sleep" in " ".join(command(c))
            ]
            return len(sleepers) == 2

        wait_until(started, 30, "the sleepers")
        supervisord(proc).kill()
        assert proc.wait(30) != 0, "supervisord was killed: a failure"
        _gone, alive = psutil.wait_procs(sleepers, timeout=5)
        assert not alive, [command(p) for p in alive]
    finally:
        kill_all(proc, sleepers)
    output = (ARTIFACTS / "run-supervisord-killed.log").read_text()
    assert "supervisord exited (-9) leaving 2 processes of the group: ended them" in output, output


def test_the_checkouts_env_is_read_from_any_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Started from another directory, the script still reads the checkout's .env: its explicit
    URLs are used, and no private server replaces them."""
    import scripts.run as run
    from api.app.core.config import get_settings
    from model.config import get_model_settings
    from ui.config import get_ui_settings

    checkout, elsewhere = tmp_path / "checkout", tmp_path / "elsewhere"
    checkout.mkdir()
    elsewhere.mkdir()
    database_url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/portal"
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    (checkout / ".env").write_text(f"DATABASE_URL={database_url}\nREDIS_URL={redis_url}\n")
    for name in ("DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PORTAL_TEST_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setattr(run, "PROJECT_ROOT", checkout)
    monkeypatch.chdir(elsewhere)
    caches = (get_settings, get_model_settings, get_ui_settings)
    for cached in caches:
        cached.cache_clear()
    try:
        api, _model, _ui = run.project_settings()
        assert (api.database_url, api.redis_url) == (database_url, redis_url)
        services = run.local_services(api)
        assert services.started == [] and services.environment() == {}
    finally:
        for cached in caches:
            cached.cache_clear()


def test_a_run_once_program_stopped_by_sigterm_is_logged_as_expected(tmp_path: Path) -> None:
    """``model.prepare`` runs once beside the portal; an operator stopping it with SIGTERM (exit
    status 143) is a clean stop, which supervisord logs as expected, not as a failure."""
    from scripts.run import program

    ready = tmp_path / "ready"
    # The program says when its handler is in place: a SIGTERM during the interpreter's start
    # would kill it before it could answer 143, which is not what this test is about.
    stops = (
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    )
    conf = tmp_path / "supervisord.conf"
    conf.write_text(
        f"[supervisord]\nnodaemon=true\nlogfile=/dev/null\nlogfile_maxbytes=0\nloglevel=info\n"
        f"pidfile={tmp_path / 'supervisord.pid'}\nchildlogdir={tmp_path}\n"
        + program("once", f"{sys.executable} -c {shlex.quote(stops)}", once=True)
    )
    supervisord = subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "--configuration", str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        parent = psutil.Process(supervisord.pid)
        wait_until(lambda: bool(parent.children()) and ready.exists(), 20, "the program started")
        parent.children()[0].send_signal(signal.SIGTERM)
        wait_until(lambda: not parent.children(), 20, "the program stopped")
    finally:
        supervisord.terminate()
        out, _ = supervisord.communicate(timeout=30)
    assert "exited: once (exit status 143; expected)" in out, out
