"""`make run`'s supervisor: one group of API, workers and UI; SIGTERM stops them all, and a child
that dies is reported and takes the group down instead of vanishing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import psutil

from api.app.core.config import Settings
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
        assert sorted(services) == ["api", "model", "model", "ui"], services
        proc.send_signal(signal.SIGTERM)
        assert_group_ends(proc, children)
    finally:
        kill_all(proc, children)
        log.close()  # type: ignore[attr-defined]
    output = (ARTIFACTS / "run-sigterm.log").read_text()
    assert f"http://localhost:{api_port}/docs" in output and "admin@example.com" in output


def test_a_crashed_child_is_reported(settings: Settings) -> None:
    proc, api_port, _ui_port, log = start_group(settings, "crash")
    children: list[psutil.Process] = []
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{api_port}/docs"), 90, "API")
        children = psutil.Process(proc.pid).children(recursive=True)
        api = next(c for c in children if c.cmdline()[-2:] == ["-m", "api"])
        api.kill()
        assert_group_ends(proc, children)
    finally:
        kill_all(proc, children)
        log.close()  # type: ignore[attr-defined]
    output = (ARTIFACTS / "run-crash.log").read_text()
    assert "api stopped (rc=-9)" in output or "api exited" in output, output[-2000:]
    assert proc.returncode != 0
