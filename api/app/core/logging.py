"""JSON logs, one line per event, carrying the request id of the request being served."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

request_id_var: ContextVar[str] = ContextVar("request_id", default="")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        return True


def configure_logging(level: str = "INFO", json_lines: bool = True, service: str = "api") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if json_lines:
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                static_fields={"service": service},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    handler.set_name("portal")
    root = logging.getLogger()
    # Replace only our own handler, so that one configured by the host (or a test) survives.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != "portal"] + [handler]
    root.setLevel(level)
    # Uvicorn's access log would duplicate the request log below.
    logging.getLogger("uvicorn.access").disabled = True
