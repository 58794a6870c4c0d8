"""The portal's start commands (``python -m api``, ``python -m api.prestart``, ``scripts/run.py``)
refuse a setting they cannot take, or a registry file that is not there, with one line naming
the variable, not a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.app.core.config import Settings, settings_problems
from tests.conftest import _admin_dsn, _execute
from tests.support import ROOT

INTEGER = "Input should be a valid integer, unable to parse string as an integer"


def run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("command", "variable", "line"),
    [
        pytest.param(["-m", "api"], "API_PORT", f"API refuses to start: API_PORT=abc: {INTEGER}", id="api"),
        pytest.param(
            ["-m", "api.prestart"],
            "DB_POOL_SIZE",
            f"api.prestart refuses to start: DB_POOL_SIZE=abc: {INTEGER}",
            id="prestart",
        ),
        pytest.param(["scripts/run.py"], "API_PORT", f"the portal refuses to start: API_PORT=abc: {INTEGER}", id="run"),
        pytest.param(
            ["scripts/run.py"], "UI_PORT", f"the portal refuses to start: UI_PORT=abc: {INTEGER}", id="run-ui"
        ),
    ],
)
def test_a_setting_that_is_no_number_is_one_line(command: list[str], variable: str, line: str) -> None:
    """Exit status 1 before anything is started or reached (the URLs name closed ports)."""
    done = run(
        [sys.executable, *command],
        **{variable: "abc"},
        DATABASE_URL="postgresql+asyncpg://postgres@127.0.0.1:1/portal",
        REDIS_URL="redis://127.0.0.1:1/0",
    )
    assert done.returncode == 1, (done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    assert done.stderr.splitlines() == [line] and done.stdout == "", done.stderr[-3000:]


def test_the_portal_names_a_bad_redis_url_without_its_password() -> None:
    """The model workers' settings refuse a URL the Redis client cannot take; the URL may hold a
    password, so only the variable is named."""
    done = run([sys.executable, "scripts/run.py"], REDIS_URL="http://user:hunter2@127.0.0.1:1/0")
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        "the portal refuses to start: REDIS_URL: Redis URL must specify one of the following schemes"
        " (redis://, rediss://, unix://)"
    ], done.stderr[-3000:]


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        (
            "DATABASE_URL",
            "postgresql+asyncpg://postgres:S3cretPW@127.0.0.1:5432:x/portal",
            "not a database URL SQLAlchemy can read",
        ),
        ("DATABASE_URL", "notaurl S3cretPW", "not a database URL SQLAlchemy can read"),
        ("DATABASE_URL", "mysql://u:S3cretPW@h/db", "a mysql URL; the portal runs on PostgreSQL"),
        ("REDIS_URL", "redis://:S3cretPW@127.0.0.1:notaport/0", "Port could not be cast to integer value"),
    ],
)
@pytest.mark.parametrize(
    ("command", "status", "prefix"),
    [
        pytest.param(["-m", "api.prestart"], 1, "api.prestart refuses to start: ", id="prestart"),
        pytest.param(["-m", "api.cli", "registry", "list"], 2, "error: ", id="cli"),
    ],
)
def test_a_url_the_api_cannot_read_is_one_line_without_its_password(
    command: list[str], status: int, prefix: str, variable: str, value: str, why: str
) -> None:
    """The API's processes read DATABASE_URL and REDIS_URL as the engine and the Redis client do:
    one that cannot be read, or a database other than PostgreSQL, stops them at start naming the
    variable (it was a traceback of the driver, one quoting the URL with its password)."""
    done = run([sys.executable, *command], **{variable: value})
    assert done.returncode == status, (done.returncode, done.stderr[-3000:])
    [line] = done.stderr.splitlines()
    assert line.startswith(f"{prefix}{variable}: {why}"), line
    assert "S3cretPW" not in done.stderr + done.stdout


def test_a_secret_setting_is_named_never_shown() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(secret_key=["hunter2"], database_url=["postgresql://u:hunter3@h/db"], api_port="abc")  # type: ignore[arg-type]
    said = settings_problems(refused.value)
    assert said == (
        f"API_PORT=abc: {INTEGER}; SECRET_KEY: Input should be a valid string;"
        " DATABASE_URL: Input should be a valid string"
    )
    assert "hunter" not in said


def test_the_api_names_a_registry_file_it_cannot_read(tmp_path: Path) -> None:
    """Was a traceback from the start-up of each API process, then "Application startup failed"."""
    missing = tmp_path / "registry.yaml"
    done = run(
        [sys.executable, "-m", "api"],
        REGISTRY_PATH=str(missing),
        API_PORT="1",
        DATABASE_URL="postgresql+asyncpg://postgres@127.0.0.1:1/portal",
        REDIS_URL="redis://127.0.0.1:1/0",
    )
    assert done.returncode == 1, (done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    assert done.stderr.splitlines() == [f"API refuses to start: REGISTRY_PATH={missing}: no such file"], done.stderr


def test_prestart_says_the_registry_file_is_missing(redis_url: str, tmp_path: Path) -> None:
    """Logged as prestart's other refusals are (an error line on stderr, exit status 1), after the database
    was prepared (it is idempotent: the next run, with the file, seeds the registry)."""
    name = f"portal_test_{uuid.uuid4().hex[:10]}"
    base = _admin_dsn().rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    missing = tmp_path / "registry.yaml"
    try:
        done = run(
            [sys.executable, "-m", "api.prestart"],
            DATABASE_URL=f"{base}/{name}",
            REDIS_URL=redis_url,
            REGISTRY_PATH=str(missing),
            LOG_JSON="true",
            DEPENDENCY_WAIT_ATTEMPTS="1",
        )
    finally:
        asyncio.run(_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    assert done.returncode == 1, (done.stdout[-3000:], done.stderr[-3000:])
    assert "Traceback" not in done.stdout + done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
    last = json.loads(done.stderr.splitlines()[-1])
    assert (last["level"], last["message"]) == ("ERROR", f"REGISTRY_PATH={missing}: no such file"), last
