"""``python -m api``: serve the API with the configured host, port and worker count."""

import uvicorn

from api.app.core.config import get_settings


def main() -> None:
    settings = get_settings()
    uvicorn.run(
        "api.app.asgi:app",
        host=settings.api_host,
        port=settings.api_port,
        workers=settings.api_workers,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
