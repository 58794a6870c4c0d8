"""The portal's own ANALYZE of the tables autovacuum does not look after."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from api.app.core.config import Settings
from api.app.core.db import make_engine
from api.app.core.maintenance import analyze_due


async def _changes_counted(connection: AsyncConnection, table: str, at_least: int) -> None:
    """Waits until ``pg_stat_user_tables`` shows the table's changes (they reach it a moment after
    the commit)."""
    deadline = time.monotonic() + 30
    query = text("SELECT n_mod_since_analyze FROM pg_stat_user_tables WHERE relname = :t")
    while ((await connection.scalar(query, {"t": table})) or 0) < at_least:
        assert time.monotonic() < deadline, f"the changes of {table} never showed in pg_stat_user_tables"
        await asyncio.sleep(0.2)


async def test_a_table_autovacuum_skips_is_analyzed_past_its_threshold(fresh_settings: Settings) -> None:
    """A table with autovacuum off (the server's setting, or the table's, as here) whose changes
    pass autovacuum's own threshold is analyzed, and then not again; one below it is left alone;
    one another session holds is skipped, not reported as analyzed, and analyzed once free."""
    engine = make_engine(fresh_settings)
    try:
        async with engine.connect() as connection:
            connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            for table in ("probe", "quiet", "held"):
                await connection.execute(text(f"CREATE TABLE {table} (id int) WITH (autovacuum_enabled = false)"))
            await connection.execute(text("INSERT INTO probe SELECT generate_series(1, 1000)"))
            await connection.execute(text("INSERT INTO held SELECT generate_series(1, 1000)"))
            await connection.execute(text("INSERT INTO quiet SELECT generate_series(1, 10)"))
            await _changes_counted(connection, "probe", 1000)
            await _changes_counted(connection, "held", 1000)

            async with engine.connect() as holder:
                await holder.execute(text("LOCK TABLE held IN ACCESS EXCLUSIVE MODE"))
                done = await analyze_due(engine=engine)
                await holder.rollback()
            assert "probe" in done and "quiet" not in done and "held" not in done, done
            analyzed = await connection.scalar(
                text("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'probe'")
            )
            assert analyzed is not None
            again = await analyze_due(engine=engine)
            assert again == ["held"], again  # free now, its turn; probe's is done
    finally:
        await engine.dispose()
