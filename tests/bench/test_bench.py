"""``make bench``'s two halves, run small: raw model speed in process, a real Locust run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy.engine import make_url

from bench import e2e, raw
from contracts.messages import Heartbeat
from contracts.registry import Registry
from model.config import ModelSettings
from tests.support import PHOTOS, ROOT

BENCH_ENV = {**os.environ, "DB_POOL_SIZE": "10"}
"""The bench's two API processes open 10 connections each rather than the default 20: `make test`
runs these beside another test process, and all share one PostgreSQL of 100 connections."""


def test_raw_runs_every_runtime_and_checks_top1(model_settings: ModelSettings, registry: Registry) -> None:
    results, agreements = raw.measure(
        registry.get("mobilenet_v2@1"), registry, model_settings, batch_sizes=(1, 2), seconds=0.2, photos=PHOTOS
    )
    measured = {(r.runtime, r.precision, r.batch_size) for r in results}
    assert measured == {(rt, p, b) for rt, p in raw_kinds() for b in (1, 2)}
    assert all(r.throughput > 0 and r.batches >= 5 for r in results)
    fp32 = [a for a in agreements if a.precision == "fp32"]
    assert fp32 and all(a.agrees for a in fp32), [a for a in fp32 if not a.agrees]
    assert {a.photo for a in agreements if a.precision == "int8"} == {a.photo for a in fp32}


def raw_kinds() -> list[tuple[str, str]]:
    return [("tensorflow", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "int8")]


def test_end_to_end_run_writes_results_plots_and_report(database_url: str, tmp_path: Path) -> None:
    report = tmp_path / "REPORT.md"
    report.write_text("# Report\n\nprose\n")
    bench_db = make_url(database_url).set(database=f"{make_url(database_url).database}_bench")
    command = [
        sys.executable,
        "-m",
        "bench",
        "e2e",
        "--out",
        str(tmp_path),
        "--report",
        str(report),
        "--models",
        "mobilenet_v2@1",
        "--users",
        "2",
        "--workers",
        "1",
        "--e2e-seconds",
        "8",
        "--latency-requests",
        "10",
        "--mix",
        "portal,predict,login",
        "--database-url",
        bench_db.render_as_string(hide_password=False),
    ]
    done = subprocess.run(command, cwd=ROOT, env=BENCH_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row, predict_only, relogging = json.loads((tmp_path / "e2e.json").read_text())
    assert (row["mix"], predict_only["mix"], relogging["mix"]) == ("portal", "predict", "login")
    # Logged in once per user (before the statistics start), or before every task.
    assert row["logins"] == 0 and row["requests_per_s"] > 0 and 0 < row["all_p50_ms"] <= row["all_p95_ms"]
    tasks = relogging["users_requests"] + relogging["predictions"]
    # Each of the 2 users may be between a login and its task as the statistics start (a task
    # counted without its login) or as they end (a login without its task).
    assert tasks > 5 and tasks - 2 <= relogging["logins"] <= tasks + 2
    assert predict_only["users_requests"] == 0 and predict_only["predictions"] > 10
    assert predict_only["cpu_ms_per_prediction"]["portal"] > 0
    assert row["failures"] == 0 and row["overloaded"] == 0
    # Counted from the running processes' database connections; 2 is the default, as
    # docker-compose.yml runs the API.
    assert row["api_processes"] == 2
    assert row["predictions"] > 10 and row["throughput"] > 1
    assert 0 < row["predict_p50_ms"] <= row["predict_p99_ms"]
    assert row["users_requests"] > row["predictions"]  # /user/ has twice predict's weight
    assert row["worker_peak_rss_mib"] > 200
    # Recorded; PostgreSQL reports a new backend up to about 10 s late, so one short run is no test
    # of its value (tests/api/test_db.py checks that load opens no connection).
    assert isinstance(row["db_connections_opened"], int)
    assert "cpu_features" in json.loads((tmp_path / "machine.json").read_text())
    assert row["cpu_cores"]["workers"] > 0 and row["cpu_cores"]["api"] > 0 and row["cpu_cores"]["locust"] > 0
    cost = row["cpu_ms_per_prediction"]
    assert cost["portal"] == round(cost["api"] + cost["postgres"] + cost["redis"], 2) > 0
    assert (tmp_path / "e2e.png").read_bytes().startswith(b"\x89PNG")
    # The step-by-step split adds up: each part is inside the one around it.
    (split,) = json.loads((tmp_path / "latency.json").read_text())
    assert split["requests"] == 10
    assert 0 < split["inference_ms"] < split["worker_ms"] < split["api_ms"] < split["client_ms"]
    assert split["api_outside_worker_ms"] > 0 and split["client_outside_api_ms"] > 0
    text = report.read_text()
    assert "prose" in text and "| mobilenet_v2@1 | 2 | 1 | 2 |" in text and "| mobilenet_v2@1 | 10 |" in text


def test_a_hundred_pausing_users_see_no_failure(database_url: str, tmp_path: Path) -> None:
    """100 Locust users pausing 1-5 s between requests, as the classic client does, logins
    counted: no failure of any kind (a connection the server closed under a paused client's feet
    would be one) and no 503. ``python -m bench e2e --wait 1,5 --e2e-seconds 120`` is the
    two-minute run of the same."""
    bench_db = make_url(database_url).set(database=f"{make_url(database_url).database}_soak")
    (tmp_path / "REPORT.md").write_text("# Report\n")
    command = [
        sys.executable,
        "-m",
        "bench",
        "e2e",
        "--out",
        str(tmp_path),
        "--report",
        str(tmp_path / "REPORT.md"),
        "--models",
        "mobilenet_v2@1",
        "--users",
        "100",
        "--workers",
        "1",
        "--wait",
        "1,5",
        "--e2e-seconds",
        "25",
        "--latency-requests",
        "0",
        "--database-url",
        bench_db.render_as_string(hide_password=False),
    ]
    done = subprocess.run(command, cwd=ROOT, env=BENCH_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "e2e.json").read_text())
    assert row["wait"] == "1,5" and row["users"] == 100
    assert row["failures"] == 0 and row["overloaded"] == 0
    # 100 users pausing 3 s on average, a third of their tasks predictions: about 11 a second
    # once all have started.
    assert row["predictions"] > 120
    assert row["users_requests"] > row["predictions"]


def test_cpu_per_prediction_splits_the_workers_by_their_heartbeats() -> None:
    def beat(worker: str, sent_at: float, cpu: float, started_at: float = 0.0) -> Heartbeat:
        return Heartbeat(
            worker_id=worker, pid=1, hostname="h", started_at=started_at, sent_at=sent_at, inference_cpu_seconds=cpu
        )

    before = {"a": beat("a", 100.0, 10.0), "b": beat("b", 101.0, 4.0), "d": beat("d", 100.0, 50.0)}
    # a: 15 s of inference CPU in 20 s of its beats; b: the same beat read twice (no figure);
    # c: started meanwhile, 3 s in its 10 s; d: restarted meanwhile (its counter began again), 2 s in 10 s;
    # e: a worker that counts no inference CPU.
    after = [
        beat("a", 120.0, 25.0),
        beat("b", 101.0, 4.0),
        beat("c", 120.0, 3.0, started_at=110.0),
        beat("d", 120.0, 2.0, started_at=110.0),
        Heartbeat(worker_id="e", pid=1, hostname="h", started_at=0.0, sent_at=120.0),
    ]
    cores = e2e.inference_cores(before, after)
    assert cores == 0.75 + 0.3 + 0.2
    assert e2e.inference_cores({"b": before["b"]}, [after[1], after[4]]) is None
    parts = {"workers": 0.9, "api": 0.2, "postgres": 0.05, "redis": 0.05, "locust": 0.3, "worker_inference": 0.75}
    ms = e2e.per_prediction(parts, throughput=50.0)
    assert ms["portal"] == 6.0 and ms["locust"] == 6.0  # the load generator is reported, not counted
    assert ms["workers"] == 18.0 and ms["worker_inference"] == 15.0 and ms["worker_outside_inference"] == 3.0
    assert "worker_outside_inference" not in e2e.per_prediction({"workers": 0.9}, throughput=50.0)
    assert e2e.per_prediction({"api": 0.2}, throughput=0.0) == {}


def test_predict_only_users_never_list_users() -> None:
    """``--mix predict``: the locustfile's users then only predict (a task of weight 0 is left out)."""
    probe = "from stress_test.locustfile import PortalUser; print(sorted({t.__name__ for t in PortalUser.tasks}))"
    for flag, tasks in (("1", "['predict']"), ("", "['list_users', 'predict']")):
        env = {**os.environ, "PORTAL_PREDICT_ONLY": flag, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == tasks


def test_a_mix_must_be_known_and_named_once() -> None:
    for mix, message in (("portal,", "unknown mix ''"), ("bogus", "unknown mix 'bogus'"), ("predict,predict", "twice")):
        done = subprocess.run(
            [sys.executable, "-m", "bench", "e2e", "--mix", mix], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and message in done.stderr, done.stderr[-500:]
