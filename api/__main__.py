"""``python -m api``: serve the API with the configured host, port and worker count."""

import os
import tempfile

import uvicorn

from api.app.core.config import load_settings
from contracts.registry import RegistryUnreadable, read_registry


def main() -> None:
    settings = load_settings("API")
    try:
        # Each API process reads it at start-up: one line here, not a traceback from each.
        read_registry(settings.registry_path)
    except RegistryUnreadable as exc:
        raise SystemExit(f"API refuses to start: {exc}") from None
    if settings.api_workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Several processes: each writes its metrics to files here and /metrics adds them up.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="portal-metrics-")
    uvicorn.run(
        "api.app.asgi:app",
        host=settings.api_host,
        port=settings.api_port,
        workers=settings.api_workers,
        log_config=None,
        proxy_headers=True,
        forwarded_allow_ips=settings.trusted_proxies,
        timeout_graceful_shutdown=settings.api_graceful_shutdown_seconds,
        timeout_keep_alive=settings.api_keep_alive_seconds,
    )


if __name__ == "__main__":
    main()
