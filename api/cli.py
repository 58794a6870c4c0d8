"""Portal administration.

python -m api.cli create-user EMAIL [--name N] [--admin] [--password P]
python -m api.cli export-feedback OUT [--model NAME] [--version N]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import HTTPException
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.core.config import Settings, get_settings
from api.app.core.db import make_engine, make_sessionmaker
from api.app.core.security import PasswordHasher
from api.app.feedback.export import ExportSummary, export_feedback
from api.app.images.storage import LocalBlobStore
from api.app.users.models import Role
from api.app.users.service import check_password_policy, create_user


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
    settings = get_settings()
    async with _session(settings) as session:
        store = LocalBlobStore(settings.storage_dir)
        return await export_feedback(session=session, store=store, out=out, model=model, version=version)


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
    export.add_argument("--version", type=int, help="only this version of --model")
    args = parser.parse_args(argv)

    if args.command == "export-feedback":
        if args.version is not None and args.model is None:
            parser.error("--version needs --model")
        try:
            summary = asyncio.run(_export_feedback(args.out, args.model, args.version))
        except FileExistsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        models = ", ".join(f"{name} {count}" for name, count in sorted(summary.by_model.items())) or "none"
        print(
            f"exported {summary.examples} labelled images to {args.out} ({models}); "
            f"{summary.superseded} verdicts replaced by later ones, {summary.unlabelled} without a label, "
            f"{summary.missing} images missing from the store"
        )
        return 0

    password = args.password or getpass.getpass("Password: ")
    try:
        user_id = asyncio.run(_create_user(args.email, password, args.name, args.admin))
    except HTTPException as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    print(f"created user {user_id} <{args.email}>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
