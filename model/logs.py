"""The model service's logging: the shared JSON format, and TensorFlow kept quiet."""

from __future__ import annotations

import os

from contracts.logs import configure_logging as configure_shared


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    configure_shared("model", level, json_lines, pid=os.getpid())
