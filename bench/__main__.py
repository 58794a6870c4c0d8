"""``python -m bench [raw|e2e|report|all]``: measure, then write JSON/CSV, PNG plots and the report.

make bench                              # everything, about 30 minutes on two cores
python -m bench raw --seconds 2         # raw model speed only
python -m bench e2e --users 1,10 --workers 1 --models mobilenet_v2@1
python -m bench e2e --models mobilenet_v2@1 --users 100 --workers 1 --wait 1,5 --e2e-seconds 120 \
    --latency-requests 0 --out var/soak --report var/soak/REPORT.md     # paused users: nothing may fail
python -m bench report                  # tables and plots again from the saved files
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from contracts.registry import RegistryUnreadable, load_registry, read_registry
from model.config import ModelSettings, load_model_settings
from model.runtimes import configure_tensorflow

from . import report

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _write(out: Path, name: str, rows: list[dict]) -> None:
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    if rows:
        with open(out / f"{name}.csv", "w", newline="") as fh:
            flat = [{k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()} for r in rows]
            writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)


def run_raw(args: argparse.Namespace, out: Path) -> None:
    from . import raw

    threads = _ints(args.threads)
    # TensorFlow's thread pools are fixed once created: its one-thread rows would need a new process.
    configure_tensorflow(ModelSettings(inference_threads=threads[0]))
    registry = load_registry(ModelSettings().registry_path)
    results, agreements = [], []
    for n in threads:
        settings = ModelSettings(inference_threads=n)
        runtimes = raw.FP32_RUNTIMES if n == threads[0] else ("onnxruntime", "openvino")
        for key in args.raw_models.split(","):
            r, a = raw.measure(
                registry.get(key),
                registry,
                settings,
                batch_sizes=_ints(args.batch_sizes),
                seconds=args.seconds,
                runtimes=runtimes,
                photos=args.photos if n == threads[0] else None,
            )
            results += r
            agreements += a
    _write(out, "raw", [asdict(r) for r in results])
    _write(out, "agreement", [asdict(a) for a in agreements])


def run_e2e(args: argparse.Namespace, out: Path) -> None:
    from . import e2e, latency

    cores = os.cpu_count() or 2
    models = args.models.split(",")
    results, latencies = [], []
    models_dir = Path(os.environ.get("MODELS_DIR", ROOT / "var" / "models"))
    for workers in _ints(args.workers):
        for model in models:
            # A fresh database and Redis for each group of runs: a history of thousands of jobs
            # slows PostgreSQL and Redis down, and the group measured last would pay for it.
            with e2e.portal(args.database_url, models_dir, args.api_workers) as portal:
                portal.start_workers(workers, cores)
                portal.wait_for_models([model], workers)
                if workers == 1 and args.latency_requests:
                    latencies.append(
                        latency.measure(portal, model=model, requests=args.latency_requests, images=args.photos)
                    )
                    _write(out, "latency", [asdict(r) for r in latencies])
                for users in _ints(args.users):
                    for mix in args.mix.split(","):
                        results.append(
                            e2e.measure(
                                portal,
                                model=model,
                                workers=workers,
                                users=users,
                                seconds=args.e2e_seconds,
                                images=args.photos,
                                cores=cores,
                                wait=args.wait,
                                mix=mix,
                            )
                        )
                        _write(out, "e2e", [asdict(r) for r in results])


def run_report(out: Path, report_path: Path) -> None:
    registry = load_registry(ModelSettings().registry_path)
    raw, agreement, e2e = report.load(out, "raw.json"), report.load(out, "agreement.json"), report.load(out, "e2e.json")
    latency = report.load(out, "latency.json")
    machine_file = out / "machine.json"
    info = json.loads(machine_file.read_text()) if machine_file.exists() else report.machine()
    report.plots(raw, e2e, out)
    body = report.tables(raw, agreement, e2e, registry, info, latency)
    (out / "tables.md").write_text(body + "\n")
    report.update_report(report_path, body)


MIXES = ("portal", "predict", "login")
"""What Locust users do in an end-to-end run (``bench.e2e.E2EResult.mix``)."""


def _mixes(value: str) -> str:
    names = value.split(",")
    unknown = [name for name in names if name not in MIXES]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown)
        raise argparse.ArgumentTypeError(f"unknown mix {shown}; choose from {', '.join(MIXES)}")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"a mix is named twice in {value!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["raw", "e2e", "report", "all"], nargs="?", default="all")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--report", type=Path, default=ROOT / "ML_API_STRESS_TESTING_REPORT.md")
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photos")
    parser.add_argument("--raw-models", default="resnet50_random@1,mobilenet_v2@1")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--threads", default="2,1", help="raw: inference threads (cores per worker), first = all")
    parser.add_argument("--seconds", type=float, default=5.0, help="raw: seconds per batch size")
    parser.add_argument("--models", default="resnet50_random@1,resnet50_random@2,mobilenet_v2@1")
    parser.add_argument("--users", default="1,10,25,50,100")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--api-workers", type=int, default=2, help="e2e: API processes (API_WORKERS), as docker-compose.yml runs them"
    )
    parser.add_argument(
        "--latency-requests", type=int, default=100, help="e2e: sequential requests per model split step by step"
    )
    parser.add_argument("--e2e-seconds", type=float, default=30.0, help="e2e: seconds per Locust run")
    parser.add_argument(
        "--wait",
        default="0",
        help='e2e: each user\'s pause between tasks, "min,max" seconds ("1,5" as the classic client; 0: none)',
    )
    parser.add_argument(
        "--mix",
        type=_mixes,
        default="portal",
        help="e2e: what users do, one run each: predict and list users 1:2 (portal), only predict (predict: "
        "what one prediction costs each part), or as portal, logging in before each task (login); "
        '"portal,predict" runs both',
    )
    parser.add_argument(
        "--database-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/portal_bench", help="dropped after"
    )
    args = parser.parse_args()
    # A bad setting or registry file is one line, before minutes of measuring; each step reads
    # them again.
    settings = load_model_settings("python -m bench")
    try:
        read_registry(settings.registry_path)
    except RegistryUnreadable as exc:
        raise SystemExit(f"python -m bench refuses to start: {exc}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request of the latency split
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.what in ("raw", "all", "e2e"):
        (out / "machine.json").write_text(json.dumps(report.machine(), indent=1) + "\n")
    if args.what in ("raw", "all"):
        run_raw(args, out)
    if args.what in ("e2e", "all"):
        run_e2e(args, out)
    run_report(out, args.report)


if __name__ == "__main__":
    main()
