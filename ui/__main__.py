"""``python -m ui``: serve the Streamlit UI on the configured host and port."""

import os
import sys
from pathlib import Path

from ui.config import get_ui_settings


def main() -> None:
    settings = get_ui_settings()
    # Streamlit's app with the UI's middleware (anti-framing headers, its metrics for private
    # networks only), which ``streamlit run`` serves as it would serve ui/app.py itself.
    app = Path(__file__).resolve().parent / "asgi.py"
    args = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.address",
        settings.ui_host,
        "--server.port",
        str(settings.ui_port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        # The uploaders state and enforce the API's limits (one photo, a batch), not Streamlit's 200 MB.
        "--server.maxUploadSize",
        str(max(settings.uploader_mb, settings.batch_uploader_mb)),
        # People see the app, not Streamlit's developer menu (Deploy, Rerun, Clear cache, Record).
        "--client.toolbarMode",
        "viewer",
    ]
    # Streamlit serves through uvicorn, which reads the proxies it trusts from here (uvicorn's own
    # default trusts 127.0.0.1: any local process could pick the address the UI passes on, or pass
    # for a client on a private network to read the metrics).
    os.environ["FORWARDED_ALLOW_IPS"] = settings.ui_trusted_proxies
    os.execv(sys.executable, args)


if __name__ == "__main__":
    main()
