"""At a million predictions the routes that could follow the history stay fast: statistics from
summaries, list pages by key at any depth, the start of an export (bench.scale grows the database
with SQL)."""

from __future__ import annotations

import pytest

from api.app.core.config import Settings
from bench.scale import Shape, measure, table
from tests.conftest import _admin_dsn
from tests.support import ARTIFACTS, RedisServer

LIMIT_MS = 50.0


@pytest.mark.serial
async def test_stats_and_deep_list_pages_stay_fast_at_a_million_predictions(settings: Settings) -> None:
    shape = Shape()
    # A Redis of its own: this API's registry, loops and queues must not meet the suite's.
    redis_server = RedisServer()
    redis_server.start()
    try:
        private = settings.model_copy(update={"redis_url": redis_server.url})
        timings = await measure(shape, base=private, admin_dsn=_admin_dsn(), repeat=15)
    finally:
        redis_server.stop()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "scale.md").write_text(table(timings, shape))
    assert len(timings) >= 10 and timings[-1].route.startswith("POST /v1/admin/exports")
    slow = [t for t in timings if t.p50_ms >= LIMIT_MS]
    assert not slow, table(timings, shape)


def test_the_command_makes_its_database_where_it_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--admin-dsn``, else TEST_POSTGRES_ADMIN_DSN (the server the suite uses), else the local
    default: never a server the command line and the environment did not name when they name one."""
    from bench.scale import ADMIN_DSN, arguments

    monkeypatch.delenv("TEST_POSTGRES_ADMIN_DSN", raising=False)
    assert arguments([]).admin_dsn == ADMIN_DSN
    monkeypatch.setenv("TEST_POSTGRES_ADMIN_DSN", "postgresql://postgres@10.0.0.7:6543/postgres")
    assert arguments([]).admin_dsn == "postgresql://postgres@10.0.0.7:6543/postgres"
    given = "postgresql://admin@db.example:5432/postgres"
    assert arguments(["--admin-dsn", given]).admin_dsn == given
