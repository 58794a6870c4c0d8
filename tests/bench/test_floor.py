"""The floor benchmark runs every step of a prediction against real servers and tables them."""

from __future__ import annotations

from pathlib import Path

from bench.floor import ROUTES, Row, measure, table

PHOTOS = Path(__file__).resolve().parents[3] / "shared" / "data" / "photos"


def test_every_route_answers_and_the_full_path_costs_more_than_the_bare_body() -> None:
    # /proc counts CPU in clock ticks (10 ms): enough requests for the full path to show.
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
