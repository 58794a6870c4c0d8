"""The portal's own VACUUM and ANALYZE of the tables autovacuum does not look after."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import text

from api.app.core.config import Settings
from api.app.core.db import make_engine
from api.app.core.maintenance import vacuum_and_analyze_due


async def test_a_table_autovacuum_skips_is_vacuumed_and_analyzed_past_its_thresholds(fresh_settings: Settings) -> None:
    """A table with autovacuum off (the server's setting, or the table's, as here) whose changes
    pass autovacuum's own thresholds is vacuumed and analyzed; below them, it is left alone; a
    table autovacuum looks after is never touched where the server runs it."""
    engine = make_engine(fresh_settings)
    try:
        async with engine.connect() as connection:
            connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await connection.execute(text("CREATE TABLE probe (id int) WITH (autovacuum_enabled = false)"))
            await connection.execute(text("CREATE TABLE quiet (id int) WITH (autovacuum_enabled = false)"))
            await connection.execute(text("INSERT INTO probe SELECT generate_series(1, 1000)"))
            await connection.execute(text("DELETE FROM probe WHERE id <= 600"))
            await connection.execute(text("INSERT INTO quiet SELECT generate_series(1, 10)"))

            async def counted() -> bool:
                dead = await connection.scalar(
                    text("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'probe'")
                )
                return bool(dead and dead >= 600)

            deadline = time.monotonic() + 30
            while not await counted():  # the statistics reach the catalog a moment after the commit
                assert time.monotonic() < deadline, "the deletions never showed in pg_stat_user_tables"
                await asyncio.sleep(0.2)

            done = await vacuum_and_analyze_due(engine=engine)
            assert "probe" in done and "quiet" not in done, done
            row = (
                await connection.execute(
                    text(
                        "SELECT last_vacuum, last_analyze, n_dead_tup FROM pg_stat_user_tables WHERE relname = 'probe'"
                    )
                )
            ).one()
            assert row.last_vacuum is not None and row.last_analyze is not None and row.n_dead_tup == 0, row
            if await connection.scalar(text("SHOW autovacuum")) == "on":
                assert set(done) <= {"probe", "quiet"}, done  # the portal's own tables are autovacuum's
            # Done, the table is not worked on again.
            assert "probe" not in await vacuum_and_analyze_due(engine=engine)
    finally:
        await engine.dispose()
