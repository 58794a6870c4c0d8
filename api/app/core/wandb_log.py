"""Optional Weights & Biases logging of each inference, off the request path.

Enabled by WANDB_API_KEY. Results are handed to a bounded queue and logged by a thread, so a slow
or unreachable W&B never delays an answer; when the queue is full, rows are dropped and counted.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any, Literal

from contracts.messages import ResultMessage

log = logging.getLogger("api.wandb")
_STOP = object()


class InferenceLogger:
    def __init__(
        self,
        *,
        api_key: str,
        project: str,
        mode: Literal["online", "offline"],
        directory: Path,
        capacity: int = 10_000,
    ) -> None:
        self.api_key, self.project, self.mode, self.directory = api_key, project, mode, directory
        self.rows: queue.Queue[Any] = queue.Queue(maxsize=capacity)
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, name="wandb-logger", daemon=True)
        self.thread.start()

    def log(self, result: ResultMessage) -> None:
        row = {
            "model": f"{result.model}@{result.version}",
            "status": result.status.value,
            "label": result.top_k[0].label if result.top_k else None,
            "score": result.top_k[0].score if result.top_k else None,
            "queue_ms": result.timings.queue_ms,
            "inference_ms": result.timings.inference_ms,
            "total_ms": result.timings.total_ms,
            "batch_size": result.timings.batch_size,
            "prediction_id": result.prediction_id,
            "request_id": result.request_id,
        }
        try:
            self.rows.put_nowait(row)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        import os

        import wandb

        os.environ["WANDB_API_KEY"] = self.api_key
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(project=self.project, mode=self.mode, dir=str(self.directory), job_type="inference")
        except Exception:  # W&B being down must not affect the portal
            log.exception("Weights & Biases logging disabled: wandb.init failed")
            return
        while (row := self.rows.get()) is not _STOP:
            try:
                run.log(row)
            except Exception:
                log.exception("could not log an inference to Weights & Biases")
        run.finish()

    def close(self, timeout: float = 30) -> None:
        self.rows.put(_STOP)
        self.thread.join(timeout)
