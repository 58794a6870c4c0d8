"""CPU affinity of the whole worker process, narrowed for a while: the batch lane's jobs are
inferred on fewer CPUs than people's, so that a batch running on a small host leaves the API and
people's requests a CPU of their own (``BATCH_INFERENCE_CPUS``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

TASKS = "/proc/self/task"
"""Linux lists a process's threads here; each can be given its own CPUs (sched_setaffinity(2))."""


def _threads() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(TASKS)]
    except OSError:
        return [0]  # no /proc: the calling thread only


def spread_over(cpus: set[int]) -> None:
    """Gives every thread of this process that runs on other CPUs than ``cpus`` exactly those:
    after a narrowed block, an inference runtime's pool thread that joined its arena inside it
    puts back the narrowed CPUs itself when it leaves (oneTBB saves a thread's mask when it joins
    and restores it when it leaves), later than ``narrowed_cpus`` gave them back."""
    if not hasattr(os, "sched_setaffinity"):
        return
    for tid in _threads():
        with contextlib.suppress(OSError):  # the thread ended since it was listed
            if os.sched_getaffinity(tid) != cpus:
                os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def narrowed_cpus(count: int) -> Iterator[set[int] | None]:
    """Runs the block with every thread of this process (an inference runtime's pool included)
    on ``count`` of the CPUs it may use (the highest-numbered ones), then gives each thread back
    the CPUs it had (one started in the block, all the process's); yields those CPUs, or None when
    nothing was narrowed: ``count`` 0, no more CPUs than that allowed, or a system without
    sched_setaffinity (macOS, Windows). A thread that ends meanwhile is passed over. Costs two
    system calls per thread on entry and one on exit."""
    if count <= 0 or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    allowed = os.sched_getaffinity(0)
    if len(allowed) <= count:
        yield None
        return
    narrow = set(sorted(allowed)[-count:])
    before: dict[int, set[int]] = {}
    for tid in _threads():
        with contextlib.suppress(OSError):  # the thread ended since it was listed
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, narrow)
    try:
        yield narrow
    finally:
        for tid in _threads():
            with contextlib.suppress(OSError):  # the thread ended since it was listed
                # A thread started in the block inherited the narrowed CPUs: it gets all of them.
                os.sched_setaffinity(tid, before.get(tid, allowed))
