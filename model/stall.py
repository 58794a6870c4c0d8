"""The serving loop's watch, read by the heartbeat thread of a worker or an explainer: a process
whose loop has not come round for ``SERVING_STALL_S`` withholds its heartbeat instead of
announcing, from a thread of its own, a loop that answers nothing."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class LoopWatch:
    """When a serving loop last came round (``turned``), and whether it has stalled since.

    ``turned`` is called by the loop; ``stalled`` by the heartbeat thread, which reads a float the
    loop replaces whole, so no lock is needed. ``busy`` names work the loop does on purpose for
    longer than a turn (building an explainer's Grad-CAM twin): no stall is counted while it is set.
    """

    def __init__(self, *, process: str, stall_s: float) -> None:
        self.process = process
        self.stall_s = stall_s
        self.at = time.monotonic()
        self.busy: str | None = None
        self._reported = False

    def turned(self) -> None:
        """The loop came round (or finished a piece of long work)."""
        self.at = time.monotonic()

    def stalled(self) -> bool:
        """Whether the loop has not come round for ``stall_s`` seconds while not ``busy``. Logs
        once when a stall starts (error) and once when the loop runs again (warning)."""
        # ``busy`` first: work that ends sets ``at`` before it clears ``busy``, so a stall is
        # never counted from an ``at`` read before the work's end and a ``busy`` read after it.
        busy = self.busy
        stalled_for = time.monotonic() - self.at
        if busy is None and stalled_for > self.stall_s:
            if not self._reported:
                self._reported = True
                log.error(
                    "%s: the serving loop has not come round for %.0f s (SERVING_STALL_S %g):" " heartbeat withheld",
                    self.process,
                    stalled_for,
                    self.stall_s,
                )
            return True
        if self._reported:
            self._reported = False
            log.warning("%s: the serving loop runs again; heartbeat resumed", self.process)
        return False
