"""The worker's CPUs narrowed while a batch lane's job is inferred, and given back after."""

from __future__ import annotations

import os
import threading

import pytest

from model.affinity import narrowed_cpus, spread_over

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs and Linux"
)


def test_every_thread_runs_on_the_narrowed_cpus_then_on_its_own_again() -> None:
    """A thread started before (as an inference runtime's pool is) is narrowed with the caller,
    and each gets back the CPUs it had, a thread pinned to one of its own included."""
    allowed = os.sched_getaffinity(0)
    first = min(allowed)
    seen: dict[str, set[int]] = {}
    entered, checked, done = threading.Event(), threading.Event(), threading.Event()

    def pool_thread() -> None:
        os.sched_setaffinity(0, {first})  # a thread with CPUs of its own
        entered.set()
        checked.wait(10)
        seen["inside"] = os.sched_getaffinity(0)
        done.wait(10)
        seen["after"] = os.sched_getaffinity(0)

    def started_inside() -> None:
        done.wait(10)
        seen["started inside, after"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=pool_thread)
    thread.start()
    entered.wait(10)
    with narrowed_cpus(1) as cpus:
        checked.set()
        assert cpus == {max(allowed)} and os.sched_getaffinity(0) == cpus
        late = threading.Thread(target=started_inside)
        late.start()
        while "inside" not in seen:
            threading.Event().wait(0.01)
    done.set()
    thread.join(10)
    late.join(10)
    assert seen["inside"] == {max(allowed)} and seen["after"] == {first}
    assert seen["started inside, after"] == allowed and os.sched_getaffinity(0) == allowed


def test_nothing_is_narrowed_for_0_or_as_many_cpus_as_allowed() -> None:
    allowed = os.sched_getaffinity(0)
    for count in (0, len(allowed), len(allowed) + 1):
        with narrowed_cpus(count) as cpus:
            assert cpus is None and os.sched_getaffinity(0) == allowed


def test_spread_over_gives_every_thread_all_the_cpus_again() -> None:
    """A pool thread that put back narrowed CPUs itself after the block (as oneTBB does when its
    thread leaves an arena it joined inside the block) is spread over all of them again."""
    allowed = os.sched_getaffinity(0)
    pinned, release = threading.Event(), threading.Event()
    seen: dict[str, set[int]] = {}

    def pool_thread() -> None:
        os.sched_setaffinity(0, {max(allowed)})
        pinned.set()
        release.wait(10)
        seen["after"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=pool_thread)
    thread.start()
    pinned.wait(10)
    spread_over(allowed)
    release.set()
    thread.join(10)
    assert seen["after"] == allowed
