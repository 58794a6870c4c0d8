"""The portal's HTTP API as the CLI uses it: one class, every failure a :class:`PortalError`.

Authentication is an API key (sent as ``X-API-Key``) or the login token from the config file,
renewed through ``POST /v1/auth/refresh`` once half its life is gone, so that following a long
batch outlives one token.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from portal_cli import __version__
from portal_cli.archive import readable
from portal_cli.config import Login
from portal_cli.errors import ExitCode, Forbidden, PortalError

QUICK = httpx.Timeout(30.0, connect=10.0)
"""Reads of state: the API answers these at once."""
PREDICT = httpx.Timeout(90.0, connect=10.0)
MAX_PREDICT_BYTES = 64 * 2**20
"""Largest file ``predict`` reads and sends: six times the portal's default limit per picture, so
the portal's own refusal says what its limit is, while a file of gigabytes is refused unread."""
"""POST /model/predict waits for the models up to PREDICT_DEADLINE_SECONDS (30 s by default)."""
UPLOAD = httpx.Timeout(1800.0, connect=10.0)
"""POST /v1/batches checks every image before it answers: minutes for 10,000 of them."""


def _detail(response: httpx.Response) -> str:
    """The API's ``detail`` as text (FastAPI's validation errors joined), else the status line."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        detail = "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    text = str(detail) if detail else f"{response.status_code} {response.reason_phrase}".strip()
    if (retry := response.headers.get("retry-after")) and response.status_code in (429, 503):
        text += f" (retry in {retry} s)"
    return text


class _ProgressReader(io.BufferedReader):
    """A file that reports how far it has been read, for an upload's progress bar."""

    def __init__(self, raw: io.FileIO, on_position: Callable[[int], None]) -> None:
        super().__init__(raw)
        self._on_position = on_position

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        self._on_position(self.tell())
        return chunk


@dataclass
class SentBatch:
    """What the portal answered to a batch sent."""

    batch_id: str
    batch: dict[str, Any] | None
    """The batch with its ``counts``; None while an earlier send with the same key is still being
    received (the portal's 409), or when that send had other files (``changed``)."""
    replayed: bool
    """The batch was made by an earlier send with the same key, not by this one."""
    changed: bool = False
    """The earlier send with the same key had other files or models (the portal's 422)."""


class Portal:
    """One user's view of the portal at ``url``; ``api_key`` or ``login`` authenticate the calls.

    ``on_login`` is called with each renewed login, to store it. Every method raises PortalError:
    exit 3 for 401/403 (:class:`Forbidden` for 403), 4 when the portal cannot be reached or answers 5xx, 1 for other 4xx.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        login: Login | None = None,
        on_login: Callable[[Login], None] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.login_state = login
        self.on_login = on_login
        self.http = httpx.Client(base_url=self.url, headers={"User-Agent": f"portal-cli/{__version__}"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Portal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests -----------------------------------------------------------------------------

    def _auth_headers(self) -> dict[str, str]:
        if self.api_key:
            return {"X-API-Key": self.api_key}
        if self.login_state is None:
            return {}
        if self.login_state.expired():
            raise PortalError("Your login has expired: run `portal login` again.", ExitCode.AUTH)
        if self.login_state.renew_due():
            self.refresh()
        return {"Authorization": f"Bearer {self.login_state.token}"}

    def _send(
        self,
        method: str,
        path: str,
        *,
        auth: bool = True,
        headers: dict[str, str] | None = None,
        expected: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> httpx.Response:
        """The answer; raises PortalError for an error status, unless it is one of ``expected``."""
        headers = {**(self._auth_headers() if auth else {}), **(headers or {})}
        try:
            response = self.http.request(method, path, headers=headers, **kwargs)
        except httpx.TimeoutException:
            raise PortalError(f"The portal at {self.url} did not answer in time.", ExitCode.UNAVAILABLE) from None
        except httpx.TransportError as exc:
            raise PortalError(f"Cannot reach the portal at {self.url} ({exc}).", ExitCode.UNAVAILABLE) from None
        if response.status_code not in expected:
            self._check(response)
        return response

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            with self.http.stream(method, path, headers=self._auth_headers(), **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                self._check(response)
                yield response
        except httpx.TimeoutException:
            raise PortalError(f"The portal at {self.url} did not answer in time.", ExitCode.UNAVAILABLE) from None
        except httpx.RemoteProtocolError:
            # Reached, but the answer ended early: a streamed CSV whose database went away.
            raise PortalError(
                f"The portal at {self.url} cut its answer off before its end; try again.", ExitCode.UNAVAILABLE
            ) from None
        except httpx.TransportError as exc:
            raise PortalError(f"Cannot reach the portal at {self.url} ({exc}).", ExitCode.UNAVAILABLE) from None

    def _check(self, response: httpx.Response) -> None:
        status = response.status_code
        if status < 400:
            return
        detail = _detail(response)
        if status == 401:
            if self.api_key:
                raise PortalError(f"The portal refused the API key: {detail.rstrip('.')}.", ExitCode.AUTH)
            if self.login_state is not None:
                raise PortalError(
                    f"Your login has expired or was revoked ({detail}): run `portal login` again.", ExitCode.AUTH
                )
            raise PortalError(detail, ExitCode.AUTH)
        if status == 403:
            raise Forbidden(f"Not allowed: {detail}")
        if status >= 500:
            raise PortalError(f"The portal answered {status}: {detail}", ExitCode.UNAVAILABLE)
        raise PortalError(detail, ExitCode.INPUT)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise PortalError(
                f"The portal at {self.url} answered something else than JSON.", ExitCode.UNAVAILABLE
            ) from None

    # --- auth ---------------------------------------------------------------------------------

    def log_in(self, email: str, password: str) -> Login:
        """Logs in with a password; the new login (also used for the next calls).

        Raises PortalError 3 for wrong credentials or a deactivated account, 1 when throttled."""
        body = self._json(
            "POST", "/v1/auth/login", auth=False, data={"username": email, "password": password}, timeout=QUICK
        )
        self.login_state = _login(body)
        return self.login_state

    def refresh(self) -> Login:
        """Trades the current login token for a fresh one of the same session and hands it to
        ``on_login``. Raises PortalError 3 when the session expired or was revoked."""
        assert self.login_state is not None
        old = self.login_state
        body = self._json(
            "POST", "/v1/auth/refresh", auth=False, headers={"Authorization": f"Bearer {old.token}"}, timeout=QUICK
        )
        self.login_state = _login(body)
        if self.on_login:
            self.on_login(self.login_state)
        return self.login_state

    def log_out(self) -> None:
        """Revokes the login session (its token and every token refreshed from it)."""
        self._send("POST", "/v1/auth/logout", timeout=QUICK)

    # --- predictions --------------------------------------------------------------------------

    def predict(self, path: Path, models: list[str]) -> dict[str, Any]:
        """One image classified by ``models`` (the portal's default when empty), sent under its
        ``readable`` name, waiting for every answer: the API's one-call answer, ``results`` keyed
        ``name@version`` with each model's ``status``, ``label``, ``score`` (0..1), ``top_k`` and
        ``error``. The file is read once and sent as read: streamed, a file whose size changes
        meanwhile (or that says another size than it reads, as /proc's do) would no longer match
        the Content-Length declared from its size. A file of more than ``MAX_PREDICT_BYTES`` is
        refused unread (PortalError 1): far past any upload the portal takes, it would only fill
        memory first. Raises OSError when it cannot be read."""
        with path.open("rb") as image:
            content = image.read(MAX_PREDICT_BYTES + 1)
        if len(content) > MAX_PREDICT_BYTES:
            raise PortalError(
                f"{readable(str(path))} is larger than {MAX_PREDICT_BYTES // 2**20} MiB, far past what the portal "
                "takes per picture (10 MiB unless configured otherwise): nothing was sent."
            )
        return dict(
            self._json(
                "POST",
                "/model/predict",
                params=[("models", m) for m in models],
                files={"file": (readable(path.name), content)},
                timeout=PREDICT,
            )
        )

    def models(self) -> list[dict[str, Any]]:
        """The model versions the portal offers me (``GET /v1/models``): each with its ``name``,
        ``ref`` (name@version) and whether a worker serves it now (``available``)."""
        return list(self._json("GET", "/v1/models", timeout=QUICK)["data"])

    def key_scopes(self) -> list[str] | None:
        """The scopes the API key in use grants now (``GET /v1/api-keys/current``); None when the
        calls are made with the login, or the portal cannot tell."""
        if not self.api_key:
            return None
        response = self._send("GET", "/v1/api-keys/current", expected=(404,), timeout=QUICK)
        if response.status_code == 404:
            return None
        try:
            return [str(s) for s in response.json()["scopes"]]
        except (ValueError, KeyError, TypeError):
            return None

    # --- batches ------------------------------------------------------------------------------

    def create_batch(
        self,
        archive: Path,
        models: list[str],
        *,
        name: str,
        idempotency_key: str,
        on_sent: Callable[[int], None] | None = None,
    ) -> SentBatch:
        """Sends a zip of images as a new batch, streamed from disk, as the file ``name``, with
        the ``Idempotency-Key`` header: the same zip sent again with the same key (after a lost
        answer) gets the batch the first send made, also while the portal is still receiving it
        (409) or when that send had other files (422): the portal names the batch in ``Location``.
        ``on_sent`` is told the bytes sent so far."""
        with _ProgressReader(io.FileIO(archive, "rb"), on_sent or (lambda _n: None)) as body:
            response = self._send(
                "POST",
                "/v1/batches",
                files={"file": (name, body, "application/zip")},
                data={"models": ",".join(models)},
                headers={"Idempotency-Key": idempotency_key},
                expected=(409, 422),
                timeout=UPLOAD,
            )
        location = response.headers.get("location", "")
        if response.status_code in (409, 422) and location.startswith("/v1/batches/"):
            changed = response.status_code == 422
            return SentBatch(batch_id=location.rsplit("/", 1)[1], batch=None, replayed=True, changed=changed)
        self._check(response)
        try:
            batch = dict(response.json())
        except ValueError:
            raise PortalError(
                f"The portal at {self.url} answered something else than JSON.", ExitCode.UNAVAILABLE
            ) from None
        replayed = response.headers.get("idempotent-replayed") == "true"
        return SentBatch(batch_id=str(batch["id"]), batch=batch, replayed=replayed)

    def batch(self, batch_id: str) -> dict[str, Any]:
        """A batch with its ``counts`` (images, queued, running, done, failed, skipped, eta_seconds)."""
        return dict(self._json("GET", f"/v1/batches/{batch_id}", timeout=QUICK))

    def batches(self) -> dict[str, Any]:
        """My batches, newest first: ``{"data": [...], "count": n}``."""
        return dict(self._json("GET", "/v1/batches", timeout=QUICK))

    def batch_sent_with(self, idempotency_key: str) -> dict[str, Any] | None:
        """The batch a send with ``idempotency_key`` made (any status, ``receiving`` included), or
        None when the portal has none: the send never arrived, or was cancelled before it was
        fully received."""
        found = self._json("GET", "/v1/batches", params={"idempotency_key": idempotency_key}, timeout=QUICK)
        data = found.get("data") or []
        return dict(data[0]) if data else None

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """Cancels what of the batch has not been queued; the batch with its counts."""
        return dict(self._json("DELETE", f"/v1/batches/{batch_id}", timeout=QUICK))

    def download_results(self, batch_id: str, out: BinaryIO) -> int:
        """Writes the batch's results as CSV to ``out``; the bytes written."""
        written = 0
        with self._stream(
            "GET", f"/v1/batches/{batch_id}/results", params={"format": "csv"}, timeout=QUICK
        ) as response:
            for chunk in response.iter_bytes():
                out.write(chunk)
                written += len(chunk)
        return written


def _login(body: Any) -> Login:
    try:
        return Login(token=str(body["access_token"]), issued_at=time.time(), expires_in=int(body["expires_in"]))
    except (KeyError, TypeError, ValueError):
        raise PortalError("The portal's login answer has no token.", ExitCode.UNAVAILABLE) from None
