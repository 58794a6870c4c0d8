"""The ``portal`` command: ``login``, ``logout``, ``predict`` and ``batch``.

Results go to stdout, everything else (progress, notes, errors) to stderr, so that
``portal predict --json x.jpg > out.json`` captures only the answer. A failure is one line on
stderr and an exit code from :class:`ExitCode`, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import filelock
import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from portal_cli.archive import (
    Unreadable,
    collect,
    readable,
    remove_stale_zips,
    remove_temporary_zips,
    temporary_zip,
    would_collect,
    zip_images,
)
from portal_cli.client import Portal, SentBatch
from portal_cli.config import (
    BatchState,
    BatchStates,
    Login,
    load_config,
    normalise_url,
    not_logged_in,
    save_config,
)
from portal_cli.errors import ExitCode, Forbidden, PortalError, Terminated

EPILOG = """**Exit codes**: **0** done;
**1** the input was refused, by the portal (a 4xx other than 401/403) or here (no images, a file that cannot be read
or written); **2** wrong usage; **3** not logged in, login expired or revoked, API key refused, or not allowed (401,
403); **4** the portal cannot be reached, timed out or answered 5xx; **130** interrupted (Ctrl-C); **143**
terminated (SIGTERM).

**Settings**: PORTAL_URL, PORTAL_API_KEY, PORTAL_CONFIG (default ~/.config/portal/config.json)."""

app = typer.Typer(
    name="portal",
    help="The image classification portal from a terminal: log in, classify images, classify whole "
    "collections as batches.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    # Errors are ours to report as one line; a rich traceback is for bugs only (PORTAL_DEBUG=1).
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _portal_url(value: str | None) -> str | None:
    """``--url`` (or PORTAL_URL) as given; a usage error (exit 2) naming it when it is not an
    http or https address with a host, which httpx would only trip over once a request is made."""
    if value is None:
        return None
    try:
        url = httpx.URL(normalise_url(value))
    except httpx.InvalidURL as exc:
        raise typer.BadParameter(f"{value!r} is not a URL ({exc}).") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise typer.BadParameter(f"{value!r} is not a portal address such as http://127.0.0.1:8000.")
    if url.port is not None and not 0 < url.port < 65536:
        raise typer.BadParameter(f"{value!r} has no valid port (1 to 65535).")
    return value


UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="PORTAL_URL",
        help="The portal API's address (default: the one logged in to).",
        show_default=False,
        callback=_portal_url,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="PORTAL_API_KEY",
        help="A personal API key (ipk_...) instead of the login; sent as X-API-Key.",
        show_default=False,
    ),
]
ModelOption = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        "-m",
        help="A model as name or name@version; repeat (or separate with commas) for several. "
        "Default: the portal's default model.",
        show_default=False,
    ),
]

POLL_SECONDS = 1.0
"""How often ``batch`` asks for the counts."""
RETRY_SECONDS = 5.0
RETRIES = 12
"""A batch being followed survives a minute of the portal being unreachable (a restart)."""

_stderr = Console(stderr=True, highlight=False)


def _note(text: str) -> None:
    """A line for the person at the terminal, on stderr; a path in it that is not UTF-8 shows
    U+FFFD for its odd bytes (``readable``)."""
    _stderr.print(readable(text), markup=False, soft_wrap=True)


@contextmanager
def _reported() -> Iterator[None]:
    """Turns PortalError and local file errors into one line on stderr and their exit code."""
    try:
        yield
    except PortalError as exc:
        _note(f"portal: {exc.message}")
        raise typer.Exit(exc.code) from None
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _note(f"portal: {exc.strerror or exc}{where}")
        raise typer.Exit(ExitCode.INPUT) from None
    except typer.Abort:
        # Ctrl-C or Ctrl-D at a prompt: Click would exit 1 with "Aborted!".
        _note("portal: interrupted.")
        raise typer.Exit(ExitCode.INTERRUPTED) from None


def _models(options: list[str] | None) -> list[str]:
    """The model references of the ``-m`` options (repeated, or separated by commas), each as the
    catalogue writes it: ``sketch@03`` is ``sketch@3``, as the portal reads it."""
    return [_as_listed(m.strip()) for option in options or [] for m in option.split(",") if m.strip()]


def _as_listed(ref: str) -> str:
    name, at, version = ref.partition("@")
    return f"{name}@{int(version)}" if at and version.isascii() and version.isdigit() else ref


def open_portal(url: str | None, api_key: str | None) -> Portal:
    """The portal at ``url`` (else the config's), authenticated by ``api_key`` or the stored login.

    The stored token is sent only to the URL it was issued by, so ``--url`` or ``PORTAL_URL``
    pointing elsewhere never hands it to another server. Raises PortalError 3 without either."""
    config = load_config()
    target = normalise_url(url or config.url)
    if api_key:
        return Portal(target, api_key=api_key)
    if config.login is None or normalise_url(config.url) != target:
        raise not_logged_in(target)

    def keep(login: Login) -> None:
        config.login = login
        save_config(config)

    return Portal(target, login=config.login, on_login=keep)


def _ask(what: str, *, default: str | None = None, hide_input: bool = False) -> str:
    """The answer to a prompt for ``what`` (hidden with ``hide_input``). Standard input ending
    there (a script piping nothing, or too little) is wrong usage, PortalError 2 naming what was
    missing, not the "interrupted" of Ctrl-C."""
    try:
        return str(typer.prompt(what.capitalize(), default=default, hide_input=hide_input))
    except typer.Abort as exc:
        # Click turns both Ctrl-C and the end of input into Abort; the end of input stays its context.
        if isinstance(exc.__context__, EOFError):
            raise PortalError(f"No {what} given: standard input ended.", ExitCode.USAGE) from None
        raise


def _piped_password() -> str:
    """The password on standard input, as ``docker login --password-stdin`` reads it: everything,
    less the line ending after it (a password may hold spaces, not a line break). An empty one
    is wrong usage, PortalError 2."""
    password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if not password:
        raise PortalError("No password given: standard input was empty.", ExitCode.USAGE)
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes that are not UTF-8 reach Python as lone surrogates, which no request can carry.
        raise PortalError("The password on standard input is not valid UTF-8.", ExitCode.USAGE) from None
    return password


@app.command()
def login(
    url: UrlOption = None,
    email: Annotated[str | None, typer.Option("--email", "-e", help="Your email (asked when missing).")] = None,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin",
            help="Read the password from standard input (a pipe or a file; needs --email), not from a prompt.",
        ),
    ] = False,
) -> None:
    """Log in with your email and password (asked, hidden; or piped with ``--password-stdin``).

    Keeps the URL and a token in the config file, readable by you only. The token is renewed while
    used; when it has expired, log in again."""
    with _reported():
        if password_stdin and not email:
            raise PortalError("--password-stdin needs --email: standard input holds the password.", ExitCode.USAGE)
        config = load_config()
        target = normalise_url(url or config.url)
        same_portal = normalise_url(config.url) == target
        email = email or _ask("email", default=config.email if same_portal and config.email else None)
        password = _piped_password() if password_stdin else _ask("password", hide_input=True)
        with Portal(target) as portal:
            session = portal.log_in(email, password)
        config.url, config.email, config.login = target, email, session
        path = save_config(config)
        _note(f"Logged in to {target} as {email} (token kept in {path}).")


@app.command()
def logout() -> None:
    """Revoke the stored login at the portal and forget it here."""
    with _reported():
        config = load_config()
        if config.login is None:
            _note("Not logged in.")
            return
        try:
            with Portal(config.url, login=config.login) as portal:
                portal.log_out()
        except PortalError as exc:
            # An expired or revoked token is as good as logged out; an unreachable portal is not.
            if exc.code != ExitCode.AUTH:
                raise
        config.login = None
        save_config(config)
        _note(f"Logged out of {config.url}.")


def _kind(mode: int) -> str:
    """What a file that is not a regular one is, in words, from its ``st_mode``."""
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check_regular(files: list[Path]) -> None:
    """Refuses (PortalError 1), before any of ``files`` is read or sent, one that is not a regular
    file once symbolic links are followed: reading a named pipe waits for a writer (forever, in
    a glob such as ``odd/*.jpg``) and a device such as /dev/zero never ends. Raises OSError when
    one cannot be looked at."""
    for path in files:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise PortalError(f"{readable(path)} is {_kind(mode)}, not a regular file: nothing was sent.")


@app.command()
def predict(
    files: Annotated[
        list[Path],
        typer.Argument(help="Images to classify.", exists=True, dir_okay=False, readable=True, show_default=False),
    ],
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answers as JSON.")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Classify images: one line per file and model (file, model@version, label, score).

    A file the portal refuses is reported on stderr and the others go on (exit 1 at the end). A
    pipe, device or socket among the files is refused before anything is sent (exit 1)."""
    refused = False
    rows: list[dict[str, Any]] = []
    with _reported():
        _check_regular(files)
    with _reported(), open_portal(url, api_key) as portal:
        for path in files:
            name = readable(path)
            try:
                answer = portal.predict(path, _models(model))
            except PortalError as exc:
                if exc.code != ExitCode.INPUT:
                    raise
                refused = True
                _note(f"portal: {name}: {exc.message}")
                rows.append({"file": name, "status": "refused", "error": exc.message})
                continue
            for ref, result in answer.get("results", {}).items():
                row = {
                    "file": name,
                    "model": ref,
                    "status": result.get("status"),
                    "label": result.get("label"),
                    "score": result.get("score"),
                    "top_k": result.get("top_k", []),
                    "error": result.get("error"),
                }
                rows.append(row)
                if row["status"] != "done":
                    refused = True
                    _note(f"portal: {name}: {ref} {row['status']}: {row['error'] or 'no answer'}")
                elif not as_json:
                    print(f"{name}  {ref}  {row['label']}  {100 * float(row['score'] or 0):.1f}%", flush=True)
    if as_json:
        print(json.dumps(rows, indent=2))
    if refused:
        raise typer.Exit(ExitCode.INPUT)


def _eta(counts: dict[str, Any]) -> str:
    seconds = counts.get("eta_seconds")
    failed = f"  {counts['failed']} failed" if counts.get("failed") else ""
    if seconds is None:
        return "ETA …" + failed
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"ETA {hours}:{minutes:02d}:{secs:02d}" if hours else f"ETA {minutes}:{secs:02d}") + failed


def _finished(batch: dict[str, Any]) -> bool:
    counts = batch["counts"]
    return batch["status"] in ("done", "cancelled") and counts["queued"] + counts["running"] == 0


def _waiting(refs: list[str]) -> str:
    """What the bar says while the batch waits for the versions ``refs`` (``waiting_for``)."""
    return f"waiting for {', '.join(refs)}: no live worker serves {'it' if len(refs) == 1 else 'them'}"


def _follow(portal: Portal, batch_id: str) -> dict[str, Any]:
    """Shows the batch's progress (images done or failed of all, the portal's ETA; where it
    stopped once cancelled; the versions it waits for while no live worker serves them, said once
    more in a note each time they change) until it has finished; the last answer. Rides out up to
    RETRIES unreachable or 5xx answers in a row."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[eta]}"))
    with Progress(*columns, console=_stderr) as bar:
        task = bar.add_task("Classifying", total=None, eta="")
        misses = 0
        waited: list[str] = []
        while True:
            try:
                batch = portal.batch(batch_id)
            except PortalError as exc:
                misses += 1
                if exc.code != ExitCode.UNAVAILABLE or misses > RETRIES:
                    raise
                bar.update(task, eta=f"portal unreachable, retrying ({misses}/{RETRIES})")
                time.sleep(RETRY_SECONDS)
                continue
            misses = 0
            counts = batch["counts"]
            cancelled = batch["status"] == "cancelled"
            waiting = [str(ref) for ref in batch.get("waiting_for") or []]
            if waiting and waiting != waited:
                # Also a line of its own: a log (no terminal) shows no bar until the end.
                one = len(waiting) == 1
                _note(
                    f"Batch {batch_id} waits for {', '.join(waiting)}: no live worker serves {'it' if one else 'them'} "
                    f"now. Its images wait at the portal, nothing is lost, and go on once {'it is' if one else 'they are'} "
                    "served again (or the batch is cancelled)."
                )
            waited = waiting
            # Cancelled images were never classified: the bar stops where the answers stopped.
            if cancelled:
                eta = f"{counts.get('cancelled', 0)} not classified"
            else:
                eta = _waiting(waiting) if waiting else _eta(counts)
            bar.update(
                task,
                description="Cancelled" if cancelled else "Classifying",
                total=counts["images"],
                completed=counts["done"] + counts["failed"],
                eta=eta,
            )
            if _finished(batch):
                return batch
            time.sleep(POLL_SECONDS)
            _still_running()


UNREADABLE_NAMED = 5
"""How many of the folders and files that could not be read a note names (all are counted)."""


def _unreadable_note(source: Path, left: list[Unreadable]) -> str:
    """The note on the folders and files of ``source`` that could not be read and were left out:
    how many, and the first ``UNREADABLE_NAMED`` of them by their path in ``source``, with why."""
    folders = sum(1 for entry in left if entry.folder)
    files = len(left) - folders
    counted = []
    if folders:
        counted.append(f"{folders} folder(s)")
    if files:
        counted.append(f"{files} file(s)")

    def name(entry: Unreadable) -> str:
        inside = entry.path.relative_to(source).as_posix() if entry.path != source else str(source)
        return f"{inside}{'/' if entry.folder else ''} ({entry.reason})"

    named = ", ".join(name(entry) for entry in left[:UNREADABLE_NAMED])
    more = f", and {len(left) - UNREADABLE_NAMED} more" if len(left) > UNREADABLE_NAMED else ""
    return f"{' and '.join(counted)} that could not be read left out: {named}{more}."


def _zip_folder(source: Path, target: Path) -> None:
    """Zips the images of the directory ``source`` into ``target``, with a progress bar. Folders
    and files that cannot be read (no permission, or gone since they were listed: a folder still
    being written to) are left out, counted and named in a note, and the rest is sent. Raises
    PortalError 1 for a directory without images, or none of whose images could be read."""
    found = collect(source)
    if found.left_out:
        _note(f"{found.left_out} file(s) without an image extension left out.")
    if found.not_regular:
        _note(f"{found.not_regular} symbolic link(s), pipe(s) or device(s) left out: only regular files are sent.")
    if found.unreadable:
        _note(_unreadable_note(source, found.unreadable))
    if not found.images:
        raise PortalError(f"No images in {source} (looked for .jpg, .png, .gif, .bmp, .webp, .tif).")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=_stderr) as bar:
        task = bar.add_task("Zipping", total=len(found.images))
        left = zip_images(target, source, found.images, lambda n: _advanced(bar, task, completed=n))
    if left:
        _note(_unreadable_note(source, left))
    if len(left) == len(found.images):
        raise PortalError(f"None of the {len(left)} images in {source} could be read: nothing was sent.")


def _upload(portal: Portal, archive: Path, name: str, models: list[str], idempotency_key: str) -> SentBatch:
    """Sends ``archive`` as the file ``name`` with ``idempotency_key``, with a progress bar; the
    API's answer."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeRemainingColumn(), console=_stderr) as bar:
        task = bar.add_task("Uploading", total=archive.stat().st_size)
        return portal.create_batch(
            archive,
            models,
            name=name,
            idempotency_key=idempotency_key,
            on_sent=lambda sent: _advanced(bar, task, completed=sent),
        )


NOT_SERVED = "no live model worker serves it"
"""The catalogue's reason for a version no live worker serves now (``api.app.catalog.service``'s
NOT_SERVED; this package is installed without the portal's code, and a test keeps the two equal):
its worker is down or still loading it: the portal takes a batch for it, which waits for the
version, not a refusal. Any other reason is one its workers gave (not trained, not installed, failed to load),
which the portal refuses a batch for (422)."""


def _unavailable_reason(ref: str, offered: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The version ``ref`` names among ``offered`` (``GET /v1/models``) and the reason the portal
    would refuse a batch for it, as the portal picks it: a bare name is a served version of it when
    there is one, else its newest stable (else newest) version. None when the portal would take it,
    or take it to wait for the version (``NOT_SERVED``)."""
    name, _, version = ref.partition("@")
    if version:
        versions = [m for m in offered if m["ref"] == ref]
    elif any(m["available"] for m in offered if m["name"] == name):
        return None
    else:
        same = [m for m in offered if m["name"] == name]
        stable = [m for m in same if m.get("channel") == "stable"] or same
        versions = sorted(stable, key=lambda m: int(m["version"]))[-1:]
    for entry in versions:
        reason = entry.get("reason")
        if not entry["available"] and reason and reason != NOT_SERVED:
            return str(entry["ref"]), str(reason)
    return None


def _check_before_sending(portal: Portal, models: list[str]) -> list[dict[str, Any]]:
    """Refuses, before anything is zipped or sent (the portal reads a whole batch before it
    answers), a credential that may not read or may not send (an API key without the read or the
    predict scope: PortalError 3) and a model the portal does not offer (PortalError 1). Without
    the read scope the upload would work and make a batch whose progress and results the run could
    never fetch; without the predict scope the whole upload would be sent for a 403. The
    catalogue (``GET /v1/models``), for ``_check_available``."""
    scopes = portal.key_scopes()
    if scopes is not None and "predict" not in scopes:
        raise PortalError(
            "This API key lacks the predict scope, which sending a batch needs, so nothing was sent.", ExitCode.AUTH
        )
    try:
        offered = portal.models()
    except Forbidden as exc:
        raise PortalError(
            f"{exc.message}; following a batch and downloading its results needs an API key with the read "
            "scope, so nothing was sent.",
            ExitCode.AUTH,
        ) from None
    if not models:
        return offered
    known = {m["ref"] for m in offered} | {m["name"] for m in offered}
    if unknown := [ref for ref in models if ref not in known]:
        served = sorted(m["ref"] for m in offered if m["available"])
        raise PortalError(
            f"Unknown model {unknown[0]!r} on {portal.url}; models served now: {', '.join(served) or 'none'}."
        )
    return offered


def _check_available(offered: list[dict[str, Any]], models: list[str]) -> None:
    """Refuses (PortalError 1), before anything is zipped or sent, a model of ``models`` the
    portal would refuse a new batch for, with the catalogue's reason (not trained yet, not
    installed, failed to load: ``_unavailable_reason``). A version without a live worker now is
    left to the portal (a worker restarting or loading it: the batch waits, see ``NOT_SERVED``).
    Not asked of a batch the portal has received already: that one waits for its versions."""
    for ref in models:
        if (refused := _unavailable_reason(ref, offered)) is not None:
            raise PortalError(f"Model {refused[0]} is unavailable: {refused[1]}; nothing was sent.")


def _send_batch(
    portal: Portal, states: BatchStates, state: BatchState, resend: str | None, offered: list[dict[str, Any]]
) -> SentBatch:
    """Sends the input of ``state`` (a zip, or a directory zipped first and named after it) as a
    batch with a new key, or ``resend``, the key of a send interrupted before its answer; the
    portal's answer. ``offered`` is the catalogue from ``_check_before_sending``, which the caller
    asks before it says anything about sending. The state is remembered once the zip is ready,
    before it is sent, and again with the batch's id. A refused input is forgotten: the next run
    sends it with a new key.

    Before sending again, the portal is asked for the batch the interrupted send made (by its
    key): found, it is followed, received or still being received, without sending anything, as
    a batch whose id was known would be. Otherwise the input is sent with the same key: the same
    unchanged input is the same request (``zip_images`` writes the same bytes), so a send that
    arrives meanwhile is still answered with its batch."""
    source = Path(state.source)
    if resend and (earlier := portal.batch_sent_with(resend)) is not None:
        state.idempotency_key, state.batch_id = resend, str(earlier["id"])
        states.remember(state)
        if earlier["status"] == "receiving":
            _note(f"The portal is still receiving batch {state.batch_id} from the interrupted send: following it.")
        else:
            _note(
                f"The portal had received batch {state.batch_id} before the interruption: following it "
                f"(--new sends {source} as it is now)."
            )
        return SentBatch(batch_id=state.batch_id, batch=None, replayed=True)
    # A batch is made from here on: its models must be ones the portal takes (a resend's were not
    # checked yet, as a batch the portal already has waits for its versions).
    _check_available(offered, state.models)
    with contextlib.ExitStack() as temporary:
        archive = source
        if source.is_dir():
            archive = temporary.enter_context(temporary_zip())
            _zip_folder(source, archive)
        state.idempotency_key = resend or str(uuid.uuid4())
        states.remember(state)
        name = readable(source.name) if archive == source else f"{readable(source.name)}.zip"
        try:
            sent = _upload(portal, archive, name, state.models, state.idempotency_key)
        except PortalError as exc:
            if exc.code == ExitCode.INPUT:
                states.forget(state.source)
                raise
            if exc.code == ExitCode.UNAVAILABLE:
                raise PortalError(
                    f"{exc.message} Run the same command again: the portal answers with the batch if it "
                    "received it, and it is sent again if not.",
                    exc.code,
                ) from None
            raise
    state.batch_id = sent.batch_id
    # Remembered before following, so that an interruption from here on resumes it.
    states.remember(state)
    if sent.changed:
        _note(
            f"The interrupted send made batch {sent.batch_id} before {source} changed: following it "
            "(--new sends it as it is now)."
        )
    elif sent.batch is None:
        _note(f"The portal is still receiving batch {sent.batch_id} from the interrupted send: following it.")
    elif sent.replayed:
        _note(f"The portal had received batch {sent.batch_id} before the interruption: following it.")
    else:
        counts = sent.batch["counts"]
        _note(
            f"Batch {sent.batch_id}: {counts['images']} images to classify, {counts['skipped']} files skipped"
            f"{_identical(sent.batch)}."
        )
    return sent


def _identical(batch: dict[str, Any]) -> str:
    """The files of ``batch`` identical to another of its files, which the portal computes once
    (``counts.images`` counts distinct images) and whose result they share, as a part of a
    summary (", 2 file(s) identical to another (sharing its result)"), so that its counts add up
    to the files sent (``entries``: images, skipped, deleted and these); "" when there are none,
    or while ``entries`` is only what the request announced (not ``fully_received``)."""
    counts = batch["counts"]
    if not batch.get("fully_received") or "entries" not in batch:
        return ""
    shared = int(batch["entries"]) - counts["images"] - counts["skipped"] - counts.get("deleted", 0)
    return f", {shared} file(s) identical to another (sharing its result)" if shared > 0 else ""


def _try_lock(held: contextlib.ExitStack, states: BatchStates, key: str) -> bool:
    """Takes the lock of ``key`` (``_alone``) until ``held`` closes, when no other run holds it;
    whether it was taken."""
    lock = states.lock(key)
    try:
        lock.acquire()
    except filelock.Timeout:
        return False
    held.callback(lock.release)
    return True


def _cancel(
    portal: Portal, states: BatchStates, key: str, source: Path, remembered: BatchState | None, *, followed: bool
) -> None:
    """Cancels the batch ``remembered`` for ``source`` (whose state is ``key``; found by its
    ``Idempotency-Key`` when its send was interrupted before the answer) and says how far it got;
    PortalError 1 when there is none.

    ``followed``: another run of ``source`` holds its lock and follows the batch. The state is
    then only read (it is replaced whole, never half-written) and left to that run, which sees
    the batch cancelled and ends as it does for any cancel; otherwise it is forgotten."""
    if remembered is None:
        running = ": the `portal batch` of it running now has sent none there yet" if followed else ""
        raise PortalError(f"No batch of {source} to cancel on {portal.url}{running}.")
    batch_id = remembered.batch_id
    if batch_id is None and remembered.idempotency_key:
        # Interrupted before the answer: the portal knows the batch by the key it was sent with.
        found = portal.batch_sent_with(remembered.idempotency_key)
        batch_id = str(found["id"]) if found is not None else None
    if batch_id is None:
        if followed:
            raise PortalError(
                f"The `portal batch` of {source} running now is sending it and the portal has no batch with its "
                "key yet: stop that run (Ctrl-C), or cancel once the portal has it."
            )
        states.forget(key)
        raise PortalError(
            f"The batch of {source} was interrupted while it was being sent and the portal has no batch "
            "sent with its key: it never arrived, or it is among your batches (the UI, or GET /v1/batches) "
            "and can be cancelled there."
        )
    counts = portal.cancel_batch(batch_id)["counts"]
    if not followed:
        states.forget(key)
    parts = [f"{counts['done']} done", f"{counts['cancelled']} cancelled"]
    # Jobs a worker already has are still answered: said, so that the numbers add up.
    if in_flight := counts["queued"] + counts["running"]:
        parts.append(f"{in_flight} already with a worker (still answered)")
    if counts.get("failed"):
        parts.append(f"{counts['failed']} failed")
    # Deleted images are no longer among the batch's images: said apart from the sum.
    deleted = f"; {counts['deleted']} deleted since" if counts.get("deleted") else ""
    _note(f"Cancelled batch {batch_id}: {', '.join(parts)} (of {counts['images']} images){deleted}.")
    if followed:
        _note(
            f"The `portal batch` of {source} following it ends once it sees the cancel, writing the results of "
            "the images answered."
        )


@contextmanager
def _alone(states: BatchStates, key: str, source: Path) -> Iterator[None]:
    """Holds ``source``'s lock for the block; PortalError 1 when another run of it holds it."""
    lock = states.lock(key)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise PortalError(
            f"Another `portal batch` of {source} is running: wait for it to end, or stop it first."
        ) from None
    try:
        yield
    finally:
        lock.release()


def _send_and_follow(
    portal: Portal, states: BatchStates, state: BatchState, resend: str | None, offered: list[dict[str, Any]]
) -> dict[str, Any]:
    """Follows the batch of ``state``, sent first when it has no id yet (``_send_batch``, with
    ``offered``, the catalogue from ``_check_before_sending``), until it has finished; the last
    answer. Raises PortalError 1 when it ended cancelled before the portal had received all of it
    (``fully_received``: its sending was cut off, its API process stopped, or it was cancelled
    then), remembering the input as sent but unanswered: the next run sends it again with its
    key, and the portal makes a new batch of it."""
    if state.batch_id is None:
        _send_batch(portal, states, state, resend, offered)
    assert state.batch_id is not None
    final = _follow(portal, state.batch_id)
    if final["status"] == "cancelled" and not final.get("fully_received", True):
        cut_off = state.batch_id
        state.batch_id = None
        states.remember(state)
        raise PortalError(
            f"Batch {cut_off} was cancelled before the portal had received all of it (its sending was cut off, "
            "or it was cancelled then). Run the same command to send it again, or add --cancel to forget it."
        )
    return final


def _write_results(portal: Portal, batch_id: str, out: str) -> None:
    """Downloads the CSV to ``out`` ("-": stdout) through a temporary file beside it, so that an
    interrupted download never leaves half a CSV under the expected name."""
    if out == "-":
        portal.download_results(batch_id, sys.stdout.buffer)
        sys.stdout.flush()
        return
    target = Path(out)
    partial = target.with_name(f".{target.name}.part")
    try:
        with partial.open("wb") as sink:
            portal.download_results(batch_id, sink)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _check_writable(out: Path) -> None:
    """Refuses an --out the results could not be written to, before anything is sent."""
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a directory: name the CSV file to write.", param_hint="--out")
    folder = out.parent
    if not folder.is_dir():
        raise typer.BadParameter(f"{folder} does not exist: create it first.", param_hint="--out")
    if not os.access(folder, os.W_OK):
        raise typer.BadParameter(f"{folder} is not writable.", param_hint="--out")


def _check_not_input(out: Path, source: Path) -> None:
    """Refuses an --out that would overwrite the input (followed through symbolic links and
    relative paths): the zip itself, or an image in the directory that is being sent."""
    if source.is_dir():
        if would_collect(source, out):
            raise typer.BadParameter(f"{out} is an image in {source}, which is being sent.", param_hint="--out")
    elif out.resolve() == source.resolve():
        raise typer.BadParameter(f"{out} is the input {source}: name another file.", param_hint="--out")


@app.command()
def batch(
    source: Annotated[
        Path,
        typer.Argument(
            help="A directory of images (zipped here, images by extension only) or a zip of images.",
            exists=True,
            readable=True,
            show_default=False,
            metavar="DIR|ZIP",
        ),
    ],
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", help="Where to write the results CSV ('-': stdout).", show_default=False),
    ] = None,
    model: ModelOption = None,
    new: Annotated[bool, typer.Option("--new", help="Send a new batch even if one is remembered for DIR|ZIP.")] = False,
    cancel: Annotated[bool, typer.Option("--cancel", help="Cancel the batch remembered for DIR|ZIP.")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Classify a collection as one batch, with a progress bar; the results CSV to --out.

    A directory is zipped first (files with an image extension only; hidden files skipped). The
    batch is remembered: after an interruption (Ctrl-C, a crash) the same command follows the same
    batch instead of sending it again; --new sends a new one, --cancel cancels it, also while another
    run follows it (not both)."""
    if new and cancel:
        # Either would be a guess at which one was meant, and a cancel cannot be undone.
        raise typer.BadParameter("it cannot be used together with --cancel.", param_hint="--new")
    if not cancel and out is None:
        raise typer.BadParameter("--out is required (the results CSV, or '-' for stdout).", param_hint="--out")
    if not source.is_dir() and not source.is_file():
        # Reading a named pipe waits for a writer; a device never ends.
        kind = _kind(source.stat().st_mode)
        raise typer.BadParameter(f"{source} is {kind}: neither a directory nor a .zip file.", param_hint="DIR|ZIP")
    if source.is_file() and source.suffix.lower() != ".zip":
        raise typer.BadParameter(f"{source} is neither a directory nor a .zip file.", param_hint="DIR|ZIP")
    if out not in (None, "-"):
        _check_writable(Path(out))
        _check_not_input(Path(out), source)
    key = str(source.resolve())
    states = BatchStates()
    models = _models(model)
    batch_id: str | None = None
    with _reported(), contextlib.ExitStack() as held:
        if not cancel:
            # A cancel only asks the portal: it goes ahead while another run follows the batch.
            held.enter_context(_alone(states, key, source))
        portal = held.enter_context(open_portal(url, api_key))
        if stale := remove_stale_zips():
            _note(f"Deleted {stale} temporary zip(s) left by runs of `portal batch` that were killed.")
        remembered = states.get(key)
        if remembered is None and (damaged := states.unreadable(key)) is not None:
            _note(
                f"The batch remembered for {source} could not be read ({damaged}): an earlier run's batch, if any, "
                "is among your batches (the UI, or GET /v1/batches), where it can be followed or cancelled."
            )
        if remembered and remembered.url != portal.url:
            remembered = None  # sent to another portal: not this one's batch
        if cancel:
            _cancel(portal, states, key, source, remembered, followed=not _try_lock(held, states, key))
            return
        resend: str | None = None
        # Why a new batch is sent instead of the remembered one: said once the portal is known to
        # take its models, so that a refusal is all a refused run says.
        sending_anew: str | None = None
        if remembered and not new and sorted(remembered.models) != sorted(models):
            sending_anew = f"The batch sent for {source} before used other models; sending a new one."
        elif remembered and not new and remembered.batch_id is None:
            # Interrupted before the portal answered: the same key gets the batch if it arrived.
            resend = remembered.idempotency_key or None
        elif remembered and not new and remembered.batch_id is not None:
            try:
                portal.batch(remembered.batch_id)
                batch_id = remembered.batch_id
                _note(f"Following batch {batch_id} of {source} again (--new sends a new one).")
            except PortalError as exc:
                if exc.code != ExitCode.INPUT:
                    raise
                sending_anew = f"Batch {remembered.batch_id} is gone ({exc.message}); sending a new one."
        elif remembered and remembered.batch_id is not None:
            sending_anew = f"Sending a new batch; the earlier one ({remembered.batch_id}) goes on."
        elif remembered:
            sending_anew = (
                f"Sending a new batch; the interrupted send of {source} may have reached the portal: "
                "see your batches (the UI, or GET /v1/batches)."
            )
        offered: list[dict[str, Any]] = []
        if batch_id is None:
            # Before anything is said about sending: a refused key or model is the run's one line.
            offered = _check_before_sending(portal, models)
            if resend is None:
                _check_available(offered, models)
        if sending_anew:
            _note(sending_anew)
        state = BatchState(key, batch_id, portal.url, models, time.time())
        final: dict[str, Any] | None = None
        try:
            final = _send_and_follow(portal, states, state, resend, offered)
            assert out is not None and state.batch_id is not None
            _write_results(portal, state.batch_id, out)
        except PortalError as exc:
            # The portal has the batch: a lost connection or login here loses nothing of it.
            if state.batch_id is None or exc.code not in (ExitCode.AUTH, ExitCode.UNAVAILABLE):
                raise
            if final is None:
                how_on = "goes on at the portal: run the same command again to follow it and download the results "
                how_on += "(or add --cancel)"
            else:
                how_on = "has finished at the portal: run the same command again to download the results"
            raise PortalError(f"{exc.message} Batch {state.batch_id} {how_on}.", exc.code) from None
        except (KeyboardInterrupt, Terminated) as stopped:
            how = "terminated" if isinstance(stopped, Terminated) else "interrupted"
            batch_id = state.batch_id
            if batch_id is None:
                _note(
                    f"portal: {how} while the batch was being sent. Run the same command again: the "
                    "portal answers with the batch if it received it, and it is sent again if not."
                )
            else:
                _note(
                    f"portal: {how}. Batch {batch_id} goes on at the portal: run the same command to follow it "
                    "and download the results (or add --cancel)."
                )
            if isinstance(stopped, Terminated):
                raise
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        batch_id = state.batch_id
        assert final is not None
        states.forget(key)
        counts = final["counts"]
        where = "stdout" if out == "-" else out
        cancelled = f"{counts['cancelled']} cancelled, " if counts.get("cancelled") else ""
        deleted = f", {counts['deleted']} deleted since" if counts.get("deleted") else ""
        partly = counts.get("partly_answered", 0)
        missing = f" ({partly} without every model's answer: see the error column)" if partly else ""
        _note(
            f"Batch {batch_id} {final['status']}: {counts['done']} done{missing}, {counts['failed']} failed, "
            f"{cancelled}{counts['skipped']} skipped{deleted}{_identical(final)}; results in {where}."
        )
        if final["status"] == "cancelled":
            raise typer.Exit(ExitCode.INPUT)


_TERMINATING: list[int] = []
"""The signal that asked the command to end, once one did (``_terminated``)."""


def _terminated(signum: int, _frame: object) -> None:
    # SIGTERM (kill) or SIGHUP (a closed terminal) ends the command as Ctrl-C does not: the
    # temporary zip is still deleted on the way out.
    _TERMINATING.append(signum)
    raise Terminated(ExitCode.TERMINATED if signum == signal.SIGTERM else 128 + signum)


def _still_running() -> None:
    """Raises ``Terminated`` again when a signal asked the command to end and it goes on: the
    handler's raise is lost when the signal lands while Python runs a finalizer (it drops what a
    ``__del__`` raises), and a SIGHUP while a folder was zipped was ignored, the batch sent and
    followed to its end. Called at each step of the zip, the upload and the following."""
    if _TERMINATING:
        signum = _TERMINATING[0]
        raise Terminated(ExitCode.TERMINATED if signum == signal.SIGTERM else 128 + signum)


def _advanced(bar: Progress, task: TaskID, **fields: Any) -> None:
    """Moves ``task`` of ``bar``, after ``_still_running``."""
    _still_running()
    bar.update(task, **fields)


def main() -> None:
    """The console script: runs the app; a bug of ours still ends in one line (PORTAL_DEBUG=1
    shows the traceback)."""
    signal.signal(signal.SIGTERM, _terminated)
    if hasattr(signal, "SIGHUP"):  # not on Windows
        signal.signal(signal.SIGHUP, _terminated)
    try:
        app()
    except Exception as exc:
        if os.environ.get("PORTAL_DEBUG"):
            raise
        print(f"portal: unexpected error ({type(exc).__name__}: {exc}); PORTAL_DEBUG=1 shows where.", file=sys.stderr)
        sys.exit(ExitCode.INPUT)
    finally:
        remove_temporary_zips()
