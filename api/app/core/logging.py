"""The API's logging: the shared JSON format, without uvicorn's duplicate access log."""

from __future__ import annotations

import logging

from contracts.logs import configure_logging as configure_shared
from contracts.logs import request_id_var

__all__ = ["configure_logging", "request_id_var"]


def configure_logging(level: str = "INFO", json_lines: bool = True, service: str = "api") -> None:
    configure_shared(service, level, json_lines)
    # The request middleware logs each request once, with its duration and request id.
    logging.getLogger("uvicorn.access").disabled = True
