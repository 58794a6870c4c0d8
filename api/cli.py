"""Portal administration.

python -m api.cli create-user EMAIL [--name N] [--admin] [--password P]
python -m api.cli export-feedback OUT [--model NAME] [--version N]
python -m api.cli sweep-blobs [--older-than-hours H] [--dry-run]
python -m api.cli registry list | history [--model NAME]
python -m api.cli registry register SPEC.yaml --reason WHY
python -m api.cli registry weights NAME VERSION=WEIGHT... --reason WHY [--force]
python -m api.cli registry promote NAME VERSION --reason WHY [--force]
python -m api.cli registry rollback NAME --reason WHY [--from-version N]
python -m api.cli registry channel NAME VERSION {canary,shadow,retired} --reason WHY
python -m api.cli registry enable|disable NAME VERSION --reason WHY

Registry changes are the admin API's, checked and audited the same way (the actor is
``cli:<login name>``); API processes serve them within REGISTRY_REFRESH_SECONDS.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import redis
import redis.asyncio as aioredis
import yaml
from fastapi import HTTPException
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.catalog.service import ModelAvailability, WorkerDirectory
from api.app.core.config import Settings, get_settings, settings_problems
from api.app.core.db import make_engine, make_sessionmaker
from api.app.core.errors import DB_ERRORS, database_status
from api.app.core.fields import INT32_MAX
from api.app.core.security import PasswordHasher
from api.app.exports.service import check_known
from api.app.feedback.export import ExportSummary, export_feedback
from api.app.images import service as images_service
from api.app.images.storage import LocalBlobStore
from api.app.registry import service as registry_service
from api.app.registry.live import LiveRegistry
from api.app.registry.models import ModelVersion
from api.app.registry.schemas import Reason, VersionCreate
from api.app.releases import service as releases_service
from api.app.users.models import Role
from api.app.users.service import check_password_policy, create_user
from contracts import workers
from contracts.registry import MAX_WEIGHT, ModelEntry, load_registry


@asynccontextmanager
async def _session(settings: Settings) -> AsyncIterator[AsyncSession]:
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as session:
            yield session
    finally:
        await engine.dispose()


async def _create_user(email: str, password: str, name: str, admin: bool) -> int:
    settings = get_settings()
    check_password_policy(password, settings)
    async with _session(settings) as session:
        user = await create_user(
            session=session,
            hasher=PasswordHasher(settings),
            email=email,
            password=password,
            name=name,
            role=Role.admin if admin else Role.user,
        )
        return user.id


async def _export_feedback(out: Path, model: str | None, version: int | None) -> ExportSummary:
    """Raises HTTPException 404 for a model or version the registry does not know, as
    ``GET /v1/admin/feedback-export`` answers it (the registry as the API serves it: PostgreSQL's,
    else the file's), before ``out`` is touched."""
    settings = get_settings()
    async with _session(settings) as session:
        registry = LiveRegistry(load_registry(settings.registry_path))
        await registry.refresh(session)
        check_known(registry=registry.current, model=model, version=version)
        store = LocalBlobStore(settings.storage_dir)
        return await export_feedback(session=session, store=store, out=out, model=model, version=version)


def _export_error(exc: BaseException, out: Path) -> str | None:
    """The line a failed ``export-feedback`` into ``out`` is reported with; None for an error that
    is a bug (shown with its traceback)."""
    if isinstance(exc, HTTPException):
        return str(exc.detail)
    if isinstance(exc, FileExistsError):
        return str(exc)
    # Checked before OSError: a refused connection or a host not found is one, a write error never them.
    if (unusable := _unusable(exc)) is not None:
        return f"{unusable}; nothing was exported"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename or out}; nothing was exported"
    return None


def _missing_from(out: Path) -> Path | None:
    """The outermost of ``out`` and its parents that does not exist: what an export into ``out``
    creates (None: ``out`` exists)."""
    missing = None
    for folder in (out, *out.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing = folder
    return missing


def _undo_export(out: Path, created: Path | None) -> None:
    """After a failed export: removes the folders it created, or what it wrote into ``out`` when
    that was an empty folder already, so that neither an empty nor a half-written folder is left
    (a half-written one would also refuse the next export as not empty)."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    if not out.is_dir():
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


async def _sweep_blobs(older_than_hours: float, dry_run: bool) -> images_service.Sweep:
    settings = get_settings()
    async with _session(settings) as session:
        store = LocalBlobStore(settings.storage_dir)
        return await images_service.sweep_orphaned_blobs(
            session=session, store=store, older_than_seconds=older_than_hours * 3600, dry_run=dry_run
        )


def _available(settings: Settings) -> dict[str, int]:
    """The versions some live worker has loaded and healthy, from their heartbeats in Redis, each
    with the number of classes its workers report."""
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)
    try:
        return {
            f"{m.name}@{m.version}": m.num_classes for b in workers.live_heartbeats(client) for m in b.models if m.ready
        }
    finally:
        client.close()


async def _worker_reports(settings: Settings) -> dict[str, ModelAvailability]:
    """What the live workers report of each version (``WorkerDirectory.availability``): loaded
    and healthy, or why it failed to load, so a refusal can say which."""
    client = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)
    try:
        return await WorkerDirectory(client).availability(fresh=True)
    finally:
        await client.aclose()


def _print_versions(rows: list[ModelVersion]) -> None:
    for row in rows:
        state = "enabled" if row.enabled else "disabled"
        print(f"{row.name}@{row.version}\t{row.channel}\tweight {row.weight}\t{state}\t{row.display_name}")


def _one_line(exc: ValidationError) -> str:
    """A validation error's problems on one line, each with the field it is about."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" if error["loc"] else error["msg"]
        for error in exc.errors()
    )


_WEIGHT = re.compile(r"([0-9]+)=([0-9]+)")
"""``VERSION=WEIGHT`` in ASCII digits (``str.isdigit`` takes "１" and "²" too)."""


def _parse_weights(pairs: list[str]) -> dict[int, int]:
    """``["3=90", "4=10"]`` -> ``{3: 90, 4: 10}``. Raises ValueError naming the first argument
    that is not a version and a weight from 0 to ``MAX_WEIGHT`` (the registry's own bound, checked
    here too so that a typo is refused before anything is touched), or a version named twice."""
    weights: dict[int, int] = {}
    for pair in pairs:
        match = _WEIGHT.fullmatch(pair)
        if match is None:
            raise ValueError(f"{pair!r}: expected VERSION=WEIGHT, both whole numbers in digits (0-9)")
        version, weight = int(match[1]), int(match[2])
        if not 1 <= version <= INT32_MAX:
            raise ValueError(f"{pair!r}: no version {version}")
        if weight > MAX_WEIGHT:
            raise ValueError(f"{pair!r}: weights are whole numbers from 0 to {MAX_WEIGHT}")
        if version in weights:
            raise ValueError(f"{pair!r}: version {version} is named twice")
        weights[version] = weight
    return weights


def _read_spec(path: str, reason: str) -> VersionCreate:
    """The registry entry of ``register``, checked as ``POST /v1/admin/registry/versions`` checks
    its body (unknown keys refused, a version up to ``MAX_VERSION``). Raises ValueError saying
    what is wrong with the file, on one line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path} holds no registry entry (a mapping of its fields)")
    if "reason" in spec:
        raise ValueError(f"{path}: give the reason with --reason, not in the file")
    try:
        return VersionCreate.model_validate({**spec, "reason": reason})
    except ValidationError as exc:
        raise ValueError(f"{path}: {_one_line(exc)}") from None


UNDEFINED_TABLE = "42P01"
INVALID_CATALOG_NAME = "3D000"
"""PostgreSQL's SQLSTATEs for a table and a database that do not exist."""


def _unusable(exc: BaseException) -> str | None:
    """The line a command that could not use PostgreSQL or Redis is reported with: out of reach
    or refusing the connection (the driver's own words, on one line, without credentials), a
    database that does not exist, or one not migrated; None for another error (a bug, shown
    with its traceback)."""
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return f"Redis cannot be used ({type(exc).__name__}: {' '.join(str(exc).split())})"
    # sqlalchemy's wrapper would add the statement and a link: the driver's error it wraps says it.
    driver_error = getattr(exc, "orig", None) or exc
    said = " ".join(str(driver_error).split())
    sqlstate = str(getattr(driver_error, "sqlstate", "") or "")
    if sqlstate == INVALID_CATALOG_NAME:
        name = make_url(get_settings().database_url).database
        return f"the database {name} (DATABASE_URL) does not exist: run `python -m api.prestart`, which creates and migrates it"
    if sqlstate == UNDEFINED_TABLE:
        return f"the database has no tables yet ({said}): run `python -m api.prestart` (alembic upgrade head) first"
    if (
        isinstance(exc, (*DB_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError, socket.gaierror, TimeoutError))
        or database_status(exc) == 503
        # Refused at login (28xxx: invalid authorization, an unknown role or a wrong password).
        or sqlstate.startswith("28")
    ):
        return f"the database cannot be used ({type(exc).__name__}: {said})"
    return None


def _left_undone(args: argparse.Namespace) -> str:
    """What a command that failed for PostgreSQL or Redis (``_unusable``) did not do, said after
    why ("" where it would change nothing anyway, or may have done part of it)."""
    if args.command == "create-user":
        return "; no user was created"
    if args.command == "registry" and args.action not in ("list", "history"):
        return "; nothing was changed"
    return ""


async def _registry(args: argparse.Namespace, spec: object, available: dict[str, int]) -> None:
    """One registry command; ``spec``: what ``register`` registers (``_read_spec``), the weights
    of ``weights`` (``_parse_weights``); ``available``: ``_available()``."""
    settings = get_settings()
    actor = registry_service.Actor(None, f"cli:{getpass.getuser()}")
    async with _session(settings) as session:
        if args.action == "list":
            _print_versions(await registry_service.list_versions(session=session))
            return
        if args.action == "history":
            changes, _ = await registry_service.list_changes(session=session, model=args.model, skip=0, limit=50)
            for c in changes:
                version = f"@{c.version}" if c.version is not None else ""
                print(f"{c.id}\t{c.at:%Y-%m-%d %H:%M:%S}\t{c.actor}\t{c.action}\t{c.model}{version}\t{c.reason}")
            return
        if args.action == "register":
            assert isinstance(spec, VersionCreate)
            # As ``POST /v1/admin/registry/versions`` does: without a number, the next free one,
            # taken under the registry's lock (concurrent registrations get one each).
            number = spec.version or await registry_service.next_version(session=session, name=spec.name)
            try:
                entry = ModelEntry.model_validate({**spec.model_dump(exclude={"reason", "version"}), "version": number})
            except ValidationError as exc:
                raise HTTPException(status_code=422, detail=_one_line(exc)) from None
            row = await registry_service.register_version(
                session=session, actor=actor, entry=entry, reason=spec.reason, next_free=spec.version is None
            )
            _print_versions([row])
            return
        if args.action == "weights":
            changed = await registry_service.set_weights(
                session=session,
                actor=actor,
                name=args.name,
                weights=spec if isinstance(spec, dict) else {},
                reason=args.reason,
                available=available.keys(),
                classes=available,
                force=args.force,
                reported=await _worker_reports(settings),
            )
        elif args.action == "promote":
            availability = await _worker_reports(settings)
            changed = await releases_service.promote(
                session=session,
                actor=actor,
                name=args.name,
                version=args.version,
                reason=args.reason,
                force=args.force,
                availability=availability,
                margin=settings.promotion_margin,
            )
        elif args.action == "rollback":
            changed = await registry_service.rollback(
                session=session,
                actor=actor,
                name=args.name,
                reason=args.reason,
                available=available.keys(),
                from_version=args.from_version,
                reported=await _worker_reports(settings),
            )
        else:
            changed = await registry_service.set_channel(
                session=session,
                actor=actor,
                name=args.name,
                version=args.version,
                channel=args.channel if args.action == "channel" else None,
                enabled={"enable": True, "disable": False}.get(args.action),
                reason=args.reason,
                available=available.keys(),
                reported=await _worker_reports(settings),
            )
        _print_versions(changed.versions)


def _export_command(out: Path, model: str | None, version: int | None) -> int:
    """``export-feedback``: the export into ``out``, its summary on stdout; the exit code. A
    failure is one line on stderr (exit 1; 130 for Ctrl-C), and leaves ``out`` as it was."""
    try:
        if out.exists() and not out.is_dir():
            print(f"error: {out} is not a folder; export into a new folder", file=sys.stderr)
            return 1
        created = _missing_from(out)
        was_empty = created is None and not any(out.iterdir())
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or out}", file=sys.stderr)
        return 1
    try:
        summary = asyncio.run(_export_feedback(out, model, version))
    except BaseException as exc:
        # Undone unless refused before writing (an unknown model, a folder not empty): then nothing there is ours.
        if (created is not None or was_empty) and not isinstance(exc, (HTTPException, FileExistsError)):
            _undo_export(out, created)
        if isinstance(exc, KeyboardInterrupt):
            print("error: interrupted; nothing was exported", file=sys.stderr)
            return 130
        message = _export_error(exc, out)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    models = ", ".join(f"{name} {count}" for name, count in sorted(summary.by_model.items())) or "none"
    print(
        f"exported {summary.examples} labelled images to {out} ({models}); "
        f"{summary.superseded} verdicts replaced by later ones, {summary.unlabelled} without a label, "
        f"{summary.missing} images missing from the store"
    )
    return 0


def _reason(value: str) -> str:
    """``--reason`` checked as the API checks it (``registry.schemas.Reason``): one line, not
    blank, at most 1,000 characters; trimmed. Raises ``argparse.ArgumentTypeError`` (exit 2)."""
    try:
        return str(TypeAdapter(Reason).validate_python(value))
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


def _registry_parser(sub: Any) -> None:
    registry = sub.add_parser("registry", help="list and change the model registry (live, audited)")
    actions = registry.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every version with its channel, weight and state")
    history = actions.add_parser("history", help="the latest 50 changes, newest first")
    history.add_argument("--model")

    def change(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help)
        parser.add_argument("--reason", required=True, type=_reason, help="why, for the audit trail (one line)")
        return parser

    change("register", "add a version from a YAML file holding one registry entry").add_argument("spec")
    weights = change("weights", "set traffic weights, e.g. 1=90 2=10")
    weights.add_argument("name")
    weights.add_argument("weights", nargs="+")
    weights.add_argument(
        "--force", action="store_true", help="even to a version that knows fewer classes than the stable one"
    )
    promote = change("promote", "make a version stable (the previous one kept for rollback)")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("--force", action="store_true", help="even when it compares worse than the stable one")
    rollback = change("rollback", "undo the latest promotion")
    rollback.add_argument("name")
    rollback.add_argument(
        "--from-version",
        type=int,
        help="only if this version is the stable one then (two operators rolling back at once undo one promotion, not two)",
    )
    channel = change("channel", "put a version in canary, shadow or retire it")
    channel.add_argument("name")
    channel.add_argument("version", type=int)
    channel.add_argument("channel", choices=["canary", "shadow", "retired"])
    for action in ("enable", "disable"):
        parser = change(action, f"{action} a version")
        parser.add_argument("name")
        parser.add_argument("version", type=int)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.cli", description="Portal administration")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-user", help="create a user")
    create.add_argument("email")
    create.add_argument("--name", default="")
    create.add_argument("--admin", action="store_true", help="give the user the admin role")
    create.add_argument("--password", help="the password (asked for when omitted)")
    export = sub.add_parser(
        "export-feedback", help="write the images users labelled, by model and label, to retrain from"
    )
    export.add_argument("out", type=Path, help="a new or empty folder")
    export.add_argument("--model", help="only this model's predictions (e.g. sketch)")
    export.add_argument("--version", type=int, help="only this version of --model (1 or more)")
    sweep = sub.add_parser(
        "sweep-blobs", help="delete stored blobs no image references (left by uploads that failed mid-way)"
    )
    sweep.add_argument(
        "--older-than-hours",
        type=float,
        default=24.0,
        help="only blobs written longer ago than this (default 24; unfinished writes: at least 1)",
    )
    sweep.add_argument("--dry-run", action="store_true", help="count them, delete nothing")
    _registry_parser(sub)
    args = parser.parse_args(argv)

    # Arguments and files that cannot be right, then settings, are refused (exit 2, as argparse
    # refuses its own) before PostgreSQL or Redis is asked anything.
    if args.command == "sweep-blobs" and not args.older_than_hours >= 0:  # NaN too
        parser.error("--older-than-hours must be 0 or more")
    if args.command == "export-feedback":
        if args.version is not None and args.model is None:
            parser.error("--version needs --model")
        if args.version is not None and args.version < 1:
            parser.error("--version must be 1 or more")
    spec: object = None
    try:
        if args.command == "registry" and args.action == "register":
            spec = _read_spec(args.spec, args.reason)
        elif args.command == "registry" and args.action == "weights":
            spec = _parse_weights(args.weights)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        get_settings()
    except ValidationError as exc:
        print(f"error: {settings_problems(exc)}", file=sys.stderr)
        return 2

    try:
        return _run(args, spec)
    except HTTPException as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    except Exception as exc:
        message = _unusable(exc)
        if message is None:
            raise
        print(f"error: {message}{_left_undone(args)}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, spec: object) -> int:
    """The command ``args`` names, its arguments checked (``spec``: as ``_registry`` takes it);
    its exit code. Raises HTTPException for what the API would refuse, and what the database
    or Redis raised."""
    if args.command == "sweep-blobs":
        found = asyncio.run(_sweep_blobs(args.older_than_hours, args.dry_run))
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {found.orphaned} blobs no image references and {found.unfinished} unfinished writes")
        return 0

    if args.command == "registry":
        needs_workers = args.action not in ("list", "history", "register")
        available = _available(get_settings()) if needs_workers else {}
        asyncio.run(_registry(args, spec, available))
        return 0

    if args.command == "export-feedback":
        # Its own failures are one line already, and undo what it wrote.
        return _export_command(args.out, args.model, args.version)

    try:
        password = args.password or getpass.getpass("Password: ")
    except EOFError:
        # Standard input ended (a script, `< /dev/null`), which was a traceback; the line goes
        # below the prompt.
        print("\nerror: no password given: standard input ended (give it with --password)", file=sys.stderr)
        return 2
    user_id = asyncio.run(_create_user(args.email, password, args.name, args.admin))
    print(f"created user {user_id} <{args.email}>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
