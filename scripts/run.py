"""Start the API, MODEL_WORKERS model workers and the UI as one supervised group.

Ctrl-C or SIGTERM stops all of them; when one exits, the others are stopped and its exit is
reported (honcho's process manager).
"""

from __future__ import annotations

import os
import sys

from honcho.manager import Manager

from api.app.core.config import get_settings
from model.config import get_model_settings
from ui.config import get_ui_settings


def main() -> int:
    api, model, ui = get_settings(), get_model_settings(), get_ui_settings()
    python = sys.executable
    manager = Manager()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    manager.add_process("api", f"exec {python} -m api", env=env)
    for i in range(model.model_workers):
        manager.add_process(f"model.{i + 1}", f"exec {python} -m model", env=env)
    manager.add_process("ui", f"exec {python} -m ui", env=env)
    host = "localhost"
    print(
        f"\n  API      http://{host}:{api.api_port}/docs\n"
        f"  UI       http://{host}:{ui.ui_port}\n"
        f"  Workers  {model.model_workers}\n"
        f"  Admin    {api.first_admin_email} / "
        f"{api.first_admin_password if api.environment == 'development' else '(FIRST_ADMIN_PASSWORD)'}\n",
        flush=True,
    )
    manager.loop()
    return manager.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
