"""Planner statistics for the portal's tables where autovacuum is off.

Without autovacuum no table is ever analyzed: the batch lane's query over pending jobs went from
milliseconds to over a second within an hour of batches, the planner taking a table of tens of
thousands of rows for one of a single row (seen with ``EXPLAIN ANALYZE``). ``/health/ready`` warns of the setting; this keeps the plans sound meanwhile.
Only ANALYZE: it reads a fixed sample of each table (``default_statistics_target`` × 300 rows), so
it takes about as long on a large table as on a small one. A VACUUM's time grows with the table
and, unlike autovacuum's, it does not give way to a migration's ``ALTER TABLE``: dead rows are left
to autovacuum, or to an operator's VACUUM."""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.app.core.errors import outage_of

log = logging.getLogger(__name__)

MAINTENANCE_SECONDS = 60.0
"""How often each API process looks for tables whose statistics are due."""

# PostgreSQL's defaults for autovacuum_analyze_threshold and autovacuum_analyze_scale_factor, and
# the rule they enter: a table is analyzed once the rows changed since its last ANALYZE exceed
# threshold + scale factor × its rows. https://www.postgresql.org/docs/15/routine-vacuuming.html#AUTOVACUUM
ANALYZE_THRESHOLD, ANALYZE_SCALE_FACTOR = 50, 0.1

_DUE = text("""
    SELECT s.relname
    FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
    WHERE s.schemaname = current_schema()
      AND (current_setting('autovacuum') = 'off' OR 'autovacuum_enabled=false' = ANY(coalesce(c.reloptions, '{}')))
      AND s.n_mod_since_analyze > :threshold + :scale * s.n_live_tup
    ORDER BY s.relname
    """)

_STILL_DUE = text("""
    SELECT s.n_mod_since_analyze > :threshold + :scale * s.n_live_tup
    FROM pg_stat_user_tables s WHERE s.schemaname = current_schema() AND s.relname = :name
    """)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def analyze_due(*, engine: AsyncEngine) -> list[str]:
    """ANALYZEs each table of the current schema that autovacuum does not look after (off for the
    server, or ``autovacuum_enabled = false`` for the table) once its changed rows pass
    autovacuum's own default threshold (``ANALYZE_*``). A table another session holds is skipped
    (``SKIP_LOCKED``), as autovacuum would; one whose ANALYZE fails (a statement timeout, a table
    dropped meanwhile) is logged and the others are still done; one that times out ends the pass. Returns the tables analyzed, by
    name (those skipped are not); with autovacuum on everywhere, none, after one catalog query.
    Raises an outage of PostgreSQL (``errors.outage_of``) for the caller's loop to report."""
    limits = {"threshold": ANALYZE_THRESHOLD, "scale": ANALYZE_SCALE_FACTOR}
    async with engine.connect() as connection:
        connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        due = list((await connection.scalars(_DUE, limits)).all())
        analyzed = []
        for name in due:
            try:
                await connection.execute(text(f"ANALYZE (SKIP_LOCKED) {_quoted(name)}"))
                still_due = await connection.scalar(_STILL_DUE, {**limits, "name": name})
            except TimeoutError:
                # Past the driver's statement timeout: a hung server, or a table whose sample
                # takes that long. Not an outage to report; this pass ends, the next tries again.
                log.warning("ANALYZE of %s timed out; the next pass tries again", name)
                break
            except Exception as exc:
                if outage_of(exc) is not None:
                    raise
                log.warning("ANALYZE of %s failed, the other tables go on: %r", name, exc)
                continue
            if not still_due:  # skipped, not analyzed, when another session held the table
                analyzed.append(name)
    if analyzed:
        log.info("autovacuum is off for %s: analyzed them", ", ".join(analyzed))
    return analyzed


async def maintain(*, engine: AsyncEngine) -> None:
    """``analyze_due``, for a periodic task."""
    await analyze_due(engine=engine)
