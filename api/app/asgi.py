"""Entry point for ASGI servers: ``uvicorn api.app.asgi:app``."""

from api.app.main import create_app

app = create_app()
