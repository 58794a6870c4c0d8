"""The API's init container: waits until PostgreSQL's schema is at the newest migration this image
carries, so an API process never starts against tables the migrations Job has not made yet.

``python wait_for_schema.py <migrations dir> [--timeout S]``; ``DATABASE_URL`` as the API reads it.
The migration files import the project (``from api.app... import``), and Python puts only this
script's own folder (a mounted ConfigMap) on ``sys.path``: the folder holding the migrations'
package (``/app`` for ``/app/api/migrations``) is added, so it runs without ``PYTHONPATH``.
Exits 0 once every revision in ``alembic_version`` is a head of ``<migrations dir>`` or one this
image does not know (a newer release migrated already: its migrations only add to the schema, so
this release's code still runs on it); 1 after ``--timeout`` seconds (0, the default: wait for good).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import asyncpg
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import make_url


def asyncpg_dsn(database_url: str) -> str:
    """``DATABASE_URL`` (a SQLAlchemy URL) as a DSN for asyncpg, its TLS mode, spelled ``ssl=`` or
    ``sslmode=``, as ``sslmode=``: asyncpg's DSN parser sends ``ssl`` to the server as a setting,
    which the server refuses. The API's ``asyncpg_dsn`` does the same; this script is mounted on
    its own and cannot import it. Exits with a message when both spellings give different modes."""
    url = make_url(database_url).set(drivername="postgresql")
    modes = {url.query[key] for key in ("ssl", "sslmode") if key in url.query}
    if len(modes) > 1:
        raise SystemExit(f"DATABASE_URL gives two TLS modes: {' and '.join(sorted(map(str, modes)))}")
    url = url.difference_update_query(("ssl", "sslmode"))
    return (url.update_query_dict({"sslmode": modes.pop()}) if modes else url).render_as_string(hide_password=False)


def project_root(migrations: Path) -> Path:
    """The folder the migrations' top-level package lives in: the nearest ancestor of
    ``migrations`` without an ``__init__.py`` (``/app`` for ``/app/api/migrations``), from which
    the migration files' ``import api...`` resolves."""
    root = migrations.resolve().parent
    while (root / "__init__.py").is_file():
        root = root.parent
    return root


def is_current(database: set[str], script: ScriptDirectory) -> bool:
    """Whether a database at ``database`` (its ``alembic_version`` rows) is at this image's head."""
    if not database:
        return False
    heads = set(script.get_heads())
    for revision in database - heads:
        try:
            script.get_revision(revision)
        except CommandError:
            continue  # unknown here: migrated by a newer release
        return False  # a known revision that is not a head: migrations still to run
    return True


async def database_revisions(dsn: str) -> set[str]:
    """The revisions in ``alembic_version``; empty when the table does not exist yet."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await conn.fetch("SELECT version_num FROM alembic_version")
    except asyncpg.UndefinedTableError:
        return set()
    finally:
        await conn.close()
    return {row["version_num"] for row in rows}


def main(argv: list[str] | None = None) -> int:
    """Polls until the schema is current (0) or the timeout passes (1), saying what it waits for."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("migrations", type=Path)
    parser.add_argument("--timeout", type=float, default=0.0)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args(argv)
    root = str(project_root(args.migrations))
    if root not in sys.path:
        # Before site-packages, as PYTHONPATH would be: the image's own api package is the one meant.
        sys.path.insert(0, root)
    script = ScriptDirectory(str(args.migrations))
    dsn = asyncpg_dsn(os.environ["DATABASE_URL"])
    started = time.monotonic()
    said = ""
    while True:
        try:
            revisions = asyncio.run(database_revisions(dsn))
            if is_current(revisions, script):
                print(f"schema at {', '.join(sorted(revisions))}", flush=True)
                return 0
            state = (
                f"schema at {', '.join(sorted(revisions)) or 'nothing'}, waiting for {', '.join(script.get_heads())}"
            )
        except (OSError, asyncpg.PostgresError) as exc:  # TimeoutError is an OSError
            state = f"database not reachable: {type(exc).__name__}: {exc}"
        if state != said:  # one line per change, not one per poll
            print(state, flush=True)
            said = state
        if args.timeout and time.monotonic() - started >= args.timeout:
            return 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
