"""Start the API, MODEL_WORKERS model workers, the trainer and the UI under supervisord, and
``python -m model.prepare`` once beside them to train what is not trained yet (``make run``
starts serving without waiting for it: ``model.prepare --defer-training``).

First, when DATABASE_URL or REDIS_URL is left at its default and nothing listens there, a private
PostgreSQL or Redis is started with its data under ``var/`` (scripts/local_services.py), and the
database is prepared (``api.prestart``: created, migrated, the first admin); the private servers
are stopped once supervisord has stopped the group.

A child that crashes (a model worker killed by the kernel's OOM killer, say) is started again and
the restart logged, while the others keep serving; one that keeps failing at start-up is retried
with a growing delay, then given up (FATAL in the log). Ctrl-C or SIGTERM stops the whole group.
supervisord's configuration and pid file go to a fresh temporary folder at each start, so two
groups (a test's and a developer's) never share them. SIGINT and SIGTERM sent to this script
are passed on to supervisord, and SIGHUP as SIGTERM.

Should supervisord itself die (SIGKILL, the OOM killer), its children would live on, serving,
re-parented to PID 1. This script is therefore their subreaper (Linux): they are re-parented to
it instead, and once supervisord has exited, whatever of the group is left is ended (SIGTERM,
then SIGKILL) before the private servers are stopped.

The settings are read from the checkout's ``.env`` wherever the script is started from.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

import psutil
from pydantic import ValidationError

from api.app.core.config import PROJECT_ROOT, Settings, get_settings, settings_problems
from model.config import ModelSettings, get_model_settings
from scripts.local_services import (
    POSTGRES_PORT_VARIABLE,
    REDIS_PORT_VARIABLE,
    LocalServiceError,
    LocalServices,
    default_url,
    ensure_local_services,
    var_dir,
)
from ui.config import UISettings, get_ui_settings

DEMO_RETRAIN_MIN_NEW_LABELS = 200
"""``make run`` is the demo: retraining starts by itself after this many new labelled drawings
unless RETRAIN_MIN_NEW_LABELS is set (the setting's own default, 0, keeps it off)."""

START_SECONDS = 5
"""A child that exits sooner after its start counts as failing to start."""
START_RETRIES = 5
"""Attempts to start a failing child, each after a delay one second longer than the last."""
PREPARE_NICE = 19
"""Niceness of the background ``model.prepare``: below the workers' CPU_NICE, so predictions get the CPU first."""
LEFTOVER_STOP_SECONDS = 10
"""How long the group's processes left by a dead supervisord have to end on SIGTERM before SIGKILL."""
PR_SET_CHILD_SUBREAPER = 36
"""prctl(2) option (linux/prctl.h)."""


def program(name: str, command: str, *, numprocs: int = 1, once: bool = False) -> str:
    """One ``[program:x]`` section: restarted whenever it exits unasked (``once``: run once, its
    exit never restarting it, and a stop by SIGTERM, exit status 143, logged as expected), its
    output and errors passed to supervisord's own output, stopped with its children (streamlit,
    uvicorn workers)."""
    process_name = f"{name}.%(process_num)d" if numprocs > 1 else name
    return f"""
[program:{name}]
command={command}
process_name={process_name}
numprocs={numprocs}
numprocs_start=1
directory={PROJECT_ROOT}
autorestart={"false" if once else "true"}
exitcodes={"0,143" if once else "0"}
startsecs={0 if once else START_SECONDS}
startretries={START_RETRIES}
stopsignal=TERM
stopwaitsecs=20
stopasgroup=true
killasgroup=true
stdout_logfile=/dev/stdout
stdout_logfile_maxbytes=0
redirect_stderr=true
"""


def config(model_workers: int, folder: Path, python: str = sys.executable) -> str:
    """supervisord's configuration: no control socket; its log (starts, exits, restarts) goes to stdout (nodaemon
    echoes it there; the log file itself is /dev/null, or every line would show twice)."""
    return (
        f"""[supervisord]
nodaemon=true
logfile=/dev/null
logfile_maxbytes=0
loglevel=info
pidfile={folder / "supervisord.pid"}
childlogdir={folder}
"""
        + program("api", f"{python} -m api")
        + program("model", f"{python} -m model", numprocs=model_workers)
        + program("trainer", f"{python} -m model.trainer")
        # What `make run` left untrained (model.prepare --defer-training), trained once and niced
        # while the portal serves: the workers load each model when its file is written.
        + program("prepare", f"nice -n {PREPARE_NICE} {python} -m model.prepare", once=True)
        # Grad-CAM heatmaps on demand, in a process of its own: predictions never wait for one.
        + program("explainer", f"{python} -m model.explainer")
        + program("ui", f"{python} -m ui")
    )


def demo_environment(api: Settings) -> dict[str, str]:
    """What the demo turns on where the environment and .env say nothing: the retraining trigger."""
    if "retrain_min_new_labels" in api.model_fields_set:
        return {}
    return {"RETRAIN_MIN_NEW_LABELS": str(DEMO_RETRAIN_MIN_NEW_LABELS)}


def ui_environment(api: Settings, ui: UISettings) -> dict[str, str]:
    """The UI's ``API_URL`` where the environment and .env name none: the API this group starts
    (``API_HOST``, ``API_PORT``), not the UI's default port, where another portal may listen."""
    if "api_url" in ui.model_fields_set:
        return {}
    host = "127.0.0.1" if api.api_host in ("0.0.0.0", "::", "") else api.api_host
    if ":" in host:
        host = f"[{host}]"
    return {"API_URL": f"http://{host}:{api.api_port}"}


def project_settings() -> tuple[Settings, ModelSettings, UISettings]:
    """The API's, the model workers' and the UI's settings, from the environment and the
    checkout's ``.env``. The settings read ``.env`` from the working directory, so this script
    works in the checkout: started from elsewhere, it would miss the ``.env``'s explicit URLs and
    hand the default ones (and private servers) to the portal's processes. A value none of them
    can run with stops the start at once with one line naming the setting (SystemExit, status 1),
    before any server is started."""
    os.chdir(PROJECT_ROOT)
    try:
        return get_settings(), get_model_settings(), get_ui_settings()
    except ValidationError as exc:
        raise SystemExit(f"the portal refuses to start: {settings_problems(exc)}") from None


def local_services(api: Settings) -> LocalServices:
    """Private servers for the URLs left at their defaults where nothing listens."""
    fields = api.model_fields_set
    return ensure_local_services(
        var_dir(),
        database_url=None if "database_url" in fields else default_url(api.database_url, POSTGRES_PORT_VARIABLE),
        redis_url=None if "redis_url" in fields else default_url(api.redis_url, REDIS_PORT_VARIABLE),
        say=lambda line: print(line, flush=True),
    )


class Stopped(Exception):
    """A signal came before supervisord ran: nothing to pass it to, the start is abandoned."""


def become_subreaper() -> bool:
    """Makes the processes orphaned below this one (supervisord's children, should supervisord
    die) its children rather than PID 1's, so that they can still be found and ended; whether
    the system allows it (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def end_leftovers(keep: set[int], timeout: float = LEFTOVER_STOP_SECONDS) -> list[str]:
    """Ends every descendant of this process but those in ``keep`` (the private servers): SIGTERM,
    then SIGKILL for those still running after ``timeout``; their command lines. After supervisord
    exits there should be none: any left were orphaned by its death."""
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in keep]
    ended: list[str] = []
    for process in leftovers:
        with contextlib.suppress(psutil.Error):  # gone already (or a zombie): nothing to end
            ended.append(" ".join(process.cmdline()) or process.name())
            process.terminate()
    # For children, waiting also reaps them: no zombies stay behind.
    _gone, alive = psutil.wait_procs(leftovers, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    return ended


def run_group(conf: Path) -> int:
    """Runs supervisord (``supervise``) and, once it has exited, ends what it left of the group;
    its exit code."""
    # The processes running now (the private Redis) are not part of the group: kept.
    keep = {p.pid for p in psutil.Process().children(recursive=True)}
    become_subreaper()
    code = supervise(conf)
    if ended := end_leftovers(keep):
        print(f"supervisord exited ({code}) leaving {len(ended)} processes of the group: ended them", flush=True)
        for line in ended:
            print(f"  {line}", flush=True)
    return code


def supervise(conf: Path) -> int:
    """Runs supervisord until it exits, passing it the signals this script gets; its exit code.
    SIGHUP (the terminal went away) is passed on as SIGTERM: to supervisord it would mean
    "restart everything"."""
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        passed = int(signal.SIGTERM) if signum == signal.SIGHUP else signum
        if child is None:
            pending.append(passed)  # came while supervisord was being started: passed on below
        else:
            child.send_signal(passed)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    # Its own session: a Ctrl-C reaches it once, through forward(), not also from the terminal.
    supervisord = [sys.executable, "-m", "supervisor.supervisord", "--configuration", str(conf)]
    child = subprocess.Popen(supervisord, start_new_session=True)
    for passed in pending:
        child.send_signal(passed)
    return child.wait()


def main() -> None:
    api, model, ui = project_settings()

    def abandon(signum: int, _frame: FrameType | None) -> None:
        raise Stopped(signal.Signals(signum).name)

    # Until supervisord runs, a signal still stops the private servers started so far (finally).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, abandon)
    services = LocalServices()
    folder: Path | None = None
    try:
        services = local_services(api)
        os.environ.update(services.environment())
        os.environ["PYTHONUNBUFFERED"] = "1"
        if code := subprocess.run([sys.executable, "-m", "api.prestart"], cwd=PROJECT_ROOT).returncode:
            sys.exit(code)
        demo = demo_environment(api)
        os.environ.update(demo)
        os.environ.update(ui_environment(api, ui))
        folder = Path(tempfile.mkdtemp(prefix="portal-supervisord-"))
        conf = folder / "supervisord.conf"
        conf.write_text(config(model.model_workers, folder))
        print(
            f"\n  API      http://localhost:{api.api_port}/docs\n"
            f"  UI       http://localhost:{ui.ui_port}\n"
            f"  Workers  {model.model_workers}\n"
            f"  Admin    {api.first_admin_email} / "
            f"{api.first_admin_password if api.environment == 'development' else '(FIRST_ADMIN_PASSWORD)'}\n"
            + (
                f"  Retrain  after {DEMO_RETRAIN_MIN_NEW_LABELS} new labelled drawings (RETRAIN_MIN_NEW_LABELS)\n"
                if demo
                else ""
            ),
            flush=True,
        )
        code = run_group(conf)
    except Stopped as stopped:
        print(f"{stopped} before the portal started: stopping", flush=True)
        code = 1
    except LocalServiceError as error:
        print(error, flush=True)
        code = 1
    finally:
        # A second Ctrl-C while the servers stop must not leave them half-stopped.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        services.stop()
        if folder is not None:
            # supervisord's configuration, socket and pid file: nothing of them outlives the portal.
            shutil.rmtree(folder, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
