"""Child processes and ports shared by the benchmarks and the tests, on mirakuru and port-for."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import redis
from mirakuru.exceptions import ProcessExitedWithError

from bench.processes import (
    Service,
    cpu_ms_between,
    cpu_snapshot,
    free_port,
    start_on_free_port,
    start_redis,
    wait_until,
)


def test_free_ports_are_outside_the_ephemeral_range_and_free() -> None:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(20):
        port = free_port()
        assert 1024 <= port < 65536 and not low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_taken_before_the_child_binds_it_is_replaced(tmp_path: Path) -> None:
    tried: list[int] = []
    squatter = socket.socket()

    def start(port: int) -> Service:
        tried.append(port)
        if len(tried) == 1:  # someone else binds the port between choosing and starting
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
        return start_redis(port, log_dir=tmp_path, cwd=tmp_path)

    try:
        server = start_on_free_port(start)
        try:
            assert len(tried) == 2 and tried[0] != tried[1]
            assert redis.Redis(port=tried[1]).ping()
        finally:
            server.stop()
    finally:
        squatter.close()


def test_a_child_that_fails_to_start_raises_with_its_log(tmp_path: Path) -> None:
    args = [sys.executable, "-c", "import sys; print('no such setting'); sys.exit(3)"]
    child = Service("failing", args, {}, log_dir=tmp_path, cwd=tmp_path)
    with pytest.raises(ProcessExitedWithError) as raised:
        child.start(lambda: False, timeout=10)
    assert "no such setting" in "".join(raised.value.__notes__)
    assert not child.alive()


def test_stop_ends_the_child_and_its_children(tmp_path: Path) -> None:
    args = ["sh", "-c", "sleep 300 & sleep 300 & wait"]
    child = Service("parent", args, {}, log_dir=tmp_path, cwd=tmp_path).start()
    parent = psutil.Process(child.proc.pid)
    wait_until(lambda: len(parent.children()) == 2, 5, "the two sleeps")
    kids = parent.children()
    child.stop()
    _, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive and not child.alive()


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_between_two_snapshots_counts_the_work_done_and_not_a_thread_that_ended() -> None:
    release = threading.Event()

    def busy_then_wait() -> None:
        _spin(0.3)
        release.wait()

    thread = threading.Thread(target=busy_then_wait)
    thread.start()
    time.sleep(0.05)
    while thread.is_alive() and not _spun(thread):
        time.sleep(0.05)
    before = cpu_snapshot([os.getpid()])
    release.set()
    thread.join()  # 0.3 s of CPU leave with it
    _spin(0.1)
    used = cpu_ms_between(before, cpu_snapshot([os.getpid()]))
    assert 90 <= used < 250, used


def _spun(thread: threading.Thread) -> bool:
    """Whether ``thread`` has used its 0.3 s of CPU (it then waits)."""
    stat = Path(f"/proc/{os.getpid()}/task/{thread.native_id}/schedstat")
    return int(stat.read_text().split()[0]) >= 0.3e9
