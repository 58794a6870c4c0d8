"""Autovacuum's work, done by the portal where autovacuum is off.

Without autovacuum the tables every prediction writes to (jobs, predictions, batch items) keep
their dead rows and, worse, never get planner statistics: the batch lane's query over pending jobs
went from milliseconds to 1.5 s within an hour of batches, the planner taking a table of 30,000
rows for one of a single row. ``/health/ready`` warns of the setting; this keeps the portal usable
meanwhile."""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

MAINTENANCE_SECONDS = 60.0
"""How often each API process looks for tables past the thresholds."""

# PostgreSQL's defaults for autovacuum_vacuum_threshold / _scale_factor and
# autovacuum_analyze_threshold / _scale_factor, and the rule they enter: a table is vacuumed once
# its dead rows exceed threshold + scale factor × its rows, analyzed once the rows changed since
# the last ANALYZE do. https://www.postgresql.org/docs/15/routine-vacuuming.html#AUTOVACUUM
VACUUM_THRESHOLD, VACUUM_SCALE_FACTOR = 50, 0.2
ANALYZE_THRESHOLD, ANALYZE_SCALE_FACTOR = 50, 0.1

_DUE = text("""
    SELECT s.relname,
           s.n_dead_tup > :vacuum_threshold + :vacuum_scale * s.n_live_tup,
           s.n_mod_since_analyze > :analyze_threshold + :analyze_scale * s.n_live_tup
    FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
    WHERE s.schemaname = current_schema()
      AND (current_setting('autovacuum') = 'off' OR 'autovacuum_enabled=false' = ANY(coalesce(c.reloptions, '{}')))
    ORDER BY s.relname
    """)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def vacuum_and_analyze_due(*, engine: AsyncEngine) -> list[str]:
    """VACUUMs (with ANALYZE) or ANALYZEs each table of the current schema that autovacuum does not
    look after (off for the server, or ``autovacuum_enabled = false`` for the table) once it is past
    autovacuum's own default thresholds (``VACUUM_*``, ``ANALYZE_*``). Skips a table another
    session holds (``SKIP_LOCKED``), as autovacuum would. Returns the tables worked on, by name;
    with autovacuum on everywhere, none and nothing done beyond one catalog query."""
    async with engine.connect() as connection:
        connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        due = (
            await connection.execute(
                _DUE,
                {
                    "vacuum_threshold": VACUUM_THRESHOLD,
                    "vacuum_scale": VACUUM_SCALE_FACTOR,
                    "analyze_threshold": ANALYZE_THRESHOLD,
                    "analyze_scale": ANALYZE_SCALE_FACTOR,
                },
            )
        ).all()
        done = []
        for name, vacuum, analyze in due:
            if vacuum:
                await connection.execute(text(f"VACUUM (SKIP_LOCKED, ANALYZE) {_quoted(name)}"))
            elif analyze:
                await connection.execute(text(f"ANALYZE (SKIP_LOCKED) {_quoted(name)}"))
            else:
                continue
            done.append(name)
    if done:
        log.info("autovacuum is off for %s: vacuumed or analyzed them", ", ".join(done))
    return done


async def maintain(*, engine: AsyncEngine) -> None:
    """``vacuum_and_analyze_due``, for a periodic task."""
    await vacuum_and_analyze_due(engine=engine)
