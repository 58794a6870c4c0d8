"""``python -m api.cli``: arguments checked as the API checks the same fields, before any
connection is made; a database it cannot use and a setting it cannot take said in one line."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.processes import free_port
from tests.conftest import _admin_dsn, _execute

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("reason", "says"),
    [
        ("   ", "a reason is not blank"),
        ("\u200b\u200b", "a reason is not blank"),  # zero-width spaces: nothing to read
        ("\x1b[31mred\x07", "must not hold control characters"),
        ("first line\nsecond line", "must not hold control characters"),
    ],
)
def test_a_registry_change_with_a_reason_the_api_refuses_is_refused(reason: str, says: str) -> None:
    """Exit 2 naming the rule, as a wrong argument (the audit trail would keep a blank reason,
    and ``registry history`` print an escape sequence to the terminal)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:1/none"}
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "registry", "weights", "sketch", "3=1", "--reason", reason],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_create_user_without_a_password_and_no_input_says_so() -> None:
    """``create-user`` asks for the password on the terminal; with standard input at its end (a
    script, ``< /dev/null``) it was an EOFError traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:1/none"}
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "create-user", "a@b.example"],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.splitlines()[-1] == (
        "error: no password given: standard input ended (give it with --password)"
    ), done.stderr


@pytest.fixture(scope="module")
def unmigrated() -> Iterator[str]:
    """The SQLAlchemy URL of a database that exists but was never migrated (no tables); dropped after."""
    name = f"portal_test_{uuid.uuid4().hex[:10]}"
    asyncio.run(_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield _admin_dsn().rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + f"/{name}"
    finally:
        asyncio.run(_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


DOWN = "the database cannot be used (ConnectionRefusedError: "
NOT_MIGRATED = (
    'error: the database has no tables yet (relation "{}" does not exist):'
    " run `python -m api.prestart` (alembic upgrade head) first"
)


CREATE = ["create-user", "a@b.example", "--password", "long-enough-1"]


@pytest.mark.parametrize(
    ("database", "command", "extra", "code", "line"),
    [
        pytest.param("down", CREATE, {}, 1, "error: " + DOWN, id="create-user-down"),
        pytest.param(
            "unmigrated",
            CREATE,
            {},
            1,
            NOT_MIGRATED.format("users") + "; no user was created",
            id="create-user-not-migrated",
        ),
        pytest.param(
            "down", ["sweep-blobs", "--dry-run", "--older-than-hours", "0"], {}, 1, "error: " + DOWN, id="sweep-down"
        ),
        pytest.param(
            "unmigrated", ["registry", "list"], {}, 1, NOT_MIGRATED.format("model_versions"), id="list-not-migrated"
        ),
        pytest.param(
            "unmigrated",
            ["export-feedback", "OUT"],
            {},
            1,
            NOT_MIGRATED.format("registry_changes") + "; nothing was exported",
            id="export-not-migrated",
        ),
        pytest.param(
            "missing",
            ["registry", "list"],
            {},
            1,
            "error: the database portal_test_missing (DATABASE_URL) does not exist:"
            " run `python -m api.prestart`, which creates and migrates it",
            id="list-no-database",
        ),
        pytest.param(
            "down",
            ["registry", "list"],
            {"DB_POOL_SIZE": "abc"},
            2,
            "error: DB_POOL_SIZE=abc: Input should be a valid integer, unable to parse string as an integer",
            id="bad-setting",
        ),
    ],
)
def test_a_database_that_cannot_be_used_or_a_bad_setting_is_one_line(
    unmigrated: str, tmp_path: Path, database: str, command: list[str], extra: dict[str, str], code: int, line: str
) -> None:
    """PostgreSQL out of reach, a database missing or not migrated, a setting that is no number:
    one line on stderr saying what to do, not a traceback (the statement, a link, the driver's
    frames)."""
    base = unmigrated.rsplit("/", 1)[0]
    url = {
        "down": f"postgresql+asyncpg://postgres:pw-{uuid.uuid4().hex}@127.0.0.1:{free_port()}/portal",
        "unmigrated": unmigrated,
        "missing": f"{base}/portal_test_missing",
    }[database]
    # A blob for the sweep to look up: with none it never asks PostgreSQL.
    sha = hashlib.sha256(b"orphan").hexdigest()
    (tmp_path / "storage" / sha[:2]).mkdir(parents=True)
    (tmp_path / "storage" / sha[:2] / sha).write_bytes(b"orphan")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": url,
        "STORAGE_DIR": str(tmp_path / "storage"),
        **extra,
    }
    args = [str(out) if arg == "OUT" else arg for arg in command]
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr[-3000:])
    said = done.stderr.splitlines()
    assert len(said) == 1 and said[0].startswith(line) and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "pw-" not in done.stderr, "no credentials"
    if command == CREATE:
        assert said[0].endswith("; no user was created"), said
    assert not out.exists()
