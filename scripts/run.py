"""Start the API, MODEL_WORKERS model workers, the trainer and the UI under supervisord.

A child that crashes (a model worker killed by the kernel's OOM killer, say) is started again and
the restart logged, while the others keep serving; one that keeps failing at start-up is retried
with a growing delay, then given up (FATAL in the log). Ctrl-C or SIGTERM stops the whole group.
supervisord's configuration and pid file go to a fresh temporary folder at each start, so two
groups (a test's and a developer's) never share them.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from api.app.core.config import PROJECT_ROOT, Settings, get_settings
from model.config import get_model_settings
from ui.config import get_ui_settings

DEMO_RETRAIN_MIN_NEW_LABELS = 200
"""``make run`` is the demo: retraining starts by itself after this many new labelled drawings
unless RETRAIN_MIN_NEW_LABELS is set (the setting's own default, 0, keeps it off)."""

START_SECONDS = 5
"""A child that exits sooner after its start counts as failing to start."""
START_RETRIES = 5
"""Attempts to start a failing child, each after a delay one second longer than the last."""


def program(name: str, command: str, *, numprocs: int = 1) -> str:
    """One ``[program:x]`` section: restarted whenever it exits unasked, its output and errors
    passed to supervisord's own output, stopped with its children (streamlit, uvicorn workers)."""
    process_name = f"{name}.%(process_num)d" if numprocs > 1 else name
    return f"""
[program:{name}]
command={command}
process_name={process_name}
numprocs={numprocs}
numprocs_start=1
directory={PROJECT_ROOT}
autorestart=true
startsecs={START_SECONDS}
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
        + program("ui", f"{python} -m ui")
    )


def demo_environment(api: Settings) -> dict[str, str]:
    """What the demo turns on where the environment and .env say nothing: the retraining trigger."""
    if "retrain_min_new_labels" in api.model_fields_set:
        return {}
    return {"RETRAIN_MIN_NEW_LABELS": str(DEMO_RETRAIN_MIN_NEW_LABELS)}


def main() -> None:
    api, model, ui = get_settings(), get_model_settings(), get_ui_settings()
    demo = demo_environment(api)
    os.environ.update(demo)
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
    os.environ["PYTHONUNBUFFERED"] = "1"
    supervisord = [sys.executable, "-m", "supervisor.supervisord", "--configuration", str(conf)]
    os.execv(sys.executable, supervisord)


if __name__ == "__main__":
    main()
