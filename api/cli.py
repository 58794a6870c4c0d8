"""``python -m api.cli create-user EMAIL [--name N] [--admin] [--password P]``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys

from fastapi import HTTPException

from api.app.core.config import get_settings
from api.app.core.db import make_engine, make_sessionmaker
from api.app.core.security import PasswordHasher
from api.app.users.models import Role
from api.app.users.service import check_password_policy, create_user


async def _create_user(email: str, password: str, name: str, admin: bool) -> int:
    settings = get_settings()
    check_password_policy(password, settings)
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as session:
            user = await create_user(
                session=session,
                hasher=PasswordHasher(settings),
                email=email,
                password=password,
                name=name,
                role=Role.admin if admin else Role.user,
            )
            return user.id
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.cli", description="Portal administration")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-user", help="create a user")
    create.add_argument("email")
    create.add_argument("--name", default="")
    create.add_argument("--admin", action="store_true", help="give the user the admin role")
    create.add_argument("--password", help="the password (asked for when omitted)")
    args = parser.parse_args(argv)

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
