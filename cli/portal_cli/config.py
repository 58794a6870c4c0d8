"""Where the CLI keeps its login and the batches it follows.

The config file (``$PORTAL_CONFIG``, else ``~/.config/portal/config.json``, mode 0600) holds the
portal's URL and the login token. Beside it, ``batches/`` holds one small file per input being
sent as a batch, named by a hash of the input's absolute path, so that running the same command
again resumes that batch; one file per input keeps two commands running at once from overwriting
each other's state.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from portal_cli.errors import ExitCode, PortalError

DEFAULT_URL = "http://127.0.0.1:8000"
"""The API's address under ``make run``."""


def config_path() -> Path:
    """The config file: ``$PORTAL_CONFIG``, else ``$XDG_CONFIG_HOME/portal/config.json`` (XDG's
    default ``~/.config``)."""
    if explicit := os.environ.get("PORTAL_CONFIG"):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "portal" / "config.json"


def normalise_url(url: str) -> str:
    """``url`` without trailing slashes, so that one portal compares equal to itself."""
    return url.strip().rstrip("/")


@dataclass
class Login:
    """A login token and when this machine received it."""

    token: str
    issued_at: float
    """Epoch seconds on this machine's clock (the server's clock never matters)."""
    expires_in: int
    """Seconds the token stays valid from ``issued_at``, as the API said."""

    def renew_due(self, now: float | None = None) -> bool:
        """Past half its life: time to trade it for a fresh one (as the UI does)."""
        return (now or time.time()) >= self.issued_at + self.expires_in / 2

    def expired(self, now: float | None = None) -> bool:
        return (now or time.time()) >= self.issued_at + self.expires_in


@dataclass
class Config:
    """The config file's content."""

    url: str = DEFAULT_URL
    email: str | None = None
    login: Login | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know, kept as they were."""


def load_config(path: Path | None = None) -> Config:
    """The config at ``path`` (default :func:`config_path`); an empty one when there is no file.

    Raises PortalError (exit 1) when the file is not JSON of the expected shape."""
    path = path or config_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Config()
    except (OSError, ValueError) as exc:
        raise PortalError(f"Cannot read the config file {path} ({exc}); fix or delete it.") from None
    if not isinstance(raw, dict):
        raise PortalError(f"The config file {path} is not a JSON object; fix or delete it.")
    try:
        login = Login(**raw.pop("login")) if raw.get("login") else None
        return Config(url=str(raw.pop("url", DEFAULT_URL)), email=raw.pop("email", None), login=login, extra=raw)
    except TypeError:
        raise PortalError(f"The config file {path} has an unexpected login entry; run `portal login`.") from None


def save_config(config: Config, path: Path | None = None) -> Path:
    """Writes ``config`` readable by its owner only (it holds a bearer token); returns the path."""
    path = path or config_path()
    body = {
        **config.extra,
        "url": config.url,
        "email": config.email,
        "login": asdict(config.login) if config.login else None,
    }
    write_private(path, json.dumps(body, indent=2) + "\n")
    return path


def write_private(path: Path, text: str) -> None:
    """Replaces ``path`` with ``text`` atomically, mode 0600, its folder 0700 when created here.

    Atomic so that a crash or a second process never leaves a half-written file behind."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class BatchState:
    """A batch sent for one input, remembered from just before it is sent until its results are
    downloaded."""

    source: str
    """The input's absolute path."""
    batch_id: str | None
    """None from just before it is sent until the portal answers with the batch's id."""
    url: str
    models: list[str]
    created_at: float
    """Epoch seconds."""
    idempotency_key: str = ""
    """The ``Idempotency-Key`` it is sent with: sent again with it after an interruption before
    the answer, the portal answers with the batch it received, if it did."""


class BatchStates:
    """The remembered batches, one JSON file per input under ``folder``."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or config_path().parent / "batches"

    def _file(self, source: str) -> Path:
        # The path's own bytes: a name that is not UTF-8 has no UTF-8 text to hash.
        return self.folder / (hashlib.sha256(os.fsencode(source)).hexdigest()[:32] + ".json")

    def get(self, source: str) -> BatchState | None:
        """The batch remembered for ``source`` (an absolute path), None when none or unreadable
        (a damaged state file only costs a new upload)."""
        try:
            state = BatchState(**json.loads(self._file(source).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None
        return state if state.source == source else None

    def unreadable(self, source: str) -> Path | None:
        """The state file of ``source`` when there is one that ``get`` cannot read (damaged, or
        written by another version), else None."""
        file = self._file(source)
        return file if file.exists() and self.get(source) is None else None

    def remember(self, state: BatchState) -> None:
        write_private(self._file(state.source), json.dumps(asdict(state), indent=2) + "\n")

    def forget(self, source: str) -> None:
        self._file(source).unlink(missing_ok=True)

    def lock(self, source: str) -> FileLock:
        """The lock one ``portal batch`` of ``source`` holds while it runs (not blocking: acquiring
        it while another run holds it raises ``filelock.Timeout`` at once), so that two runs of
        one input never both send it."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return FileLock(self._file(source).with_suffix(".lock"), timeout=0)


def not_logged_in(url: str) -> PortalError:
    """The error of a command that needs a login it does not have."""
    return PortalError(
        f"Not logged in to {url}: run `portal login --url {url}`, or give an API key (--api-key or PORTAL_API_KEY).",
        ExitCode.AUTH,
    )
