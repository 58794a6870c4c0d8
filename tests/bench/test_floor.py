"""The floor benchmark runs every step of a prediction against real servers and tables them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.e2e import psql
from bench.floor import ROUTES, Row, measure, table

PHOTOS = Path(__file__).resolve().parents[3] / "shared" / "data" / "photos"
SERVER = "postgresql://postgres@127.0.0.1:5432"  # bench.floor's default


def test_every_route_answers_and_the_full_path_costs_more_than_the_bare_body() -> None:
    # Enough requests for the means to settle on a busy 2-core host.
    rows = measure(requests=30, photos=PHOTOS)  # a route that fails (the stub worker silent: 504) raises
    assert [row.route for row in rows] == list(ROUTES)
    by_route = {row.route: row for row in rows}
    assert by_route["answered"].api_cpu_ms > by_route["raw"].api_cpu_ms
    # Only the routes that store something make PostgreSQL work.
    assert by_route["raw"].postgres_cpu_ms == 0
    assert by_route["answered"].latency_ms > by_route["raw"].latency_ms


def test_the_table_gives_what_each_step_adds_and_sets_minimal_against_answered() -> None:
    text = table(
        [
            Row("raw", 0.5, 0.0, 0.0, 1.0),
            Row("multipart", 1.75, 0.0, 0.0, 2.0),
            Row("answered", 9.0, 1.0, 1.0, 12.0),
            Row("minimal", 8.5, 0.5, 1.0, 11.0),
        ]
    )
    assert "| raw | 0.50 | +0.50 | 0.00 | 0.00 | 0.50 | 1.00 |" in text
    assert "| multipart | 1.75 | +1.25 | 0.00 | 0.00 | 1.75 | 2.00 |" in text
    assert "| answered | 9.00 | +7.25 | 1.00 | 1.00 | 11.00 | 12.00 |" in text
    assert "| minimal | 8.50 | -0.50 against answered | 0.50 | 1.00 | 10.00 | 11.00 |" in text


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_run_stopped_with_a_signal_leaves_no_server_and_no_database(stop: signal.Signals) -> None:
    run = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", "--requests", "100000", "--photos", str(PHOTOS), "--out", "/nonexistent"],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    database = f"portal_floor_{run.pid}"
    try:
        deadline = time.monotonic() + 60
        # Measuring once the API (the last child, beside Redis and the stub worker) holds its
        # four connections to the scratch database.
        while int(_psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'")) < 4:
            assert run.poll() is None and time.monotonic() < deadline, "the run did not start its servers"
            time.sleep(0.2)
        time.sleep(2)
        children = psutil.Process(run.pid).children(recursive=True)
        assert len(children) == 3, children
        assert _psql(f"SELECT count(*) FROM pg_database WHERE datname = '{database}'") == "1"
        run.send_signal(stop)
        time.sleep(0.2)
        run.send_signal(stop)  # a second one, as an impatient person sends it, changes nothing
        assert run.wait(30) == 128 + stop
    finally:
        if run.poll() is None:
            run.kill()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, alive
    assert _psql(f"SELECT count(*) FROM pg_database WHERE datname = '{database}'") == "0"


def _psql(sql: str) -> str:
    return psql(SERVER, sql, check=True)
