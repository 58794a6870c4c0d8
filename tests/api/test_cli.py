"""``python -m api.cli``: arguments checked as the API checks the same fields, before any
connection is made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
