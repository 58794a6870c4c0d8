"""JSON log lines for the model service, with the request id of the jobs a line is about."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from pythonjsonlogger.json import JsonFormatter


class _Defaults(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = ""
        return True


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message=r".*tf.lite.Interpreter is deprecated.*")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Defaults())
    if json_lines:
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                static_fields={"service": "model", "pid": os.getpid()},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
