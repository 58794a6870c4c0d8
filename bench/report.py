"""Tables, plots and target checks from the files ``make bench`` writes."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil

from contracts.registry import Registry

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
RUNTIME_NAMES = {"keras": "tensorflow", "openvino": "openvino", "tflite": "tflite"}


# Vector and matrix units that change INT8 and FP32 speed several-fold between hosts that report
# the same model name.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def machine() -> dict[str, Any]:
    cpu, flags = "", set[str]()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name") and not cpu:
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_features": [f for f in CPU_FEATURES if f in flags],
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "packages": {p: version(p) for p in ("tensorflow-cpu", "keras", "openvino", "onnxruntime", "nncf", "locust")},
    }


def raw_source(key: str, registry: Registry) -> tuple[str, str, str]:
    """The raw benchmark row (model, runtime, precision) that an end-to-end model key runs."""
    entry = registry.get(key)
    if entry.quantized_from:
        return entry.quantized_from, "openvino", "int8"
    return key, RUNTIME_NAMES[entry.runtime.value], "fp32"


def best_raw(raw: list[dict], model: str, runtime: str, precision: str, threads: int | None = None) -> dict | None:
    """The fastest row over batch sizes (and over thread counts unless ``threads`` is given)."""
    rows = [
        r
        for r in raw
        if (r["model"], r["runtime"], r["precision"]) == (model, runtime, precision) and threads in (None, r["threads"])
    ]
    return max(rows, key=lambda r: r["throughput"], default=None)


def batch1(raw: list[dict], model: str, runtime: str, precision: str, threads: int) -> dict | None:
    key = (model, runtime, precision, 1, threads)
    return next(
        (r for r in raw if (r["model"], r["runtime"], r["precision"], r["batch_size"], r["threads"]) == key), None
    )


def _ratio(value: float, raw_row: dict | None) -> str:
    return f"{value / raw_row['throughput']:.0%}" if raw_row else "-"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


USERS_P99_LIMIT_MS = 50
"""``GET /user/`` p99 while the workers are saturated (the performance issue's target)."""
PORTAL_CPU_LIMIT_MS = 3.0
"""The portal's own CPU per prediction: API processes, PostgreSQL and Redis, under a predict-only
saturating load (the performance issue's target)."""


def _mix(run: dict) -> str:
    """What the users of ``run`` did, when not the default mix, for a label."""
    mix = run.get("mix", "portal")
    return "" if mix == "portal" else f", users do: {mix}"


def checks(raw: list[dict], e2e: list[dict], registry: Registry) -> list[list[Any]]:
    """One row per target and model: the figure, the limit, and whether it is met."""
    out: list[list[Any]] = []
    for key in sorted({r["model"] for r in e2e}):
        model, runtime, precision = raw_source(key, registry)
        fp32 = best_raw(raw, model, runtime, "fp32")
        runs = [r for r in e2e if r["model"] == key]
        saturated = [r for r in runs if r["users"] >= 10]
        if saturated and fp32:
            best = max(saturated, key=lambda r: r["throughput"])
            limit = 0.9 * fp32["throughput"]
            out.append(
                [
                    key,
                    f"sustained throughput >= 90 % of best raw {runtime} FP32 ({fp32['throughput']:.1f}/s)",
                    f"{best['throughput']:.1f}/s ({best['workers']} worker(s), {best['users']} users{_mix(best)})",
                    f"{limit:.1f}/s",
                    "met" if best["throughput"] >= limit else "NOT met",
                ]
            )
        for one in [r for r in runs if r["users"] == 1]:
            # Each worker's inference runs on its share of the cores: compare with that raw figure.
            b1 = batch1(raw, model, runtime, precision, one["threads_per_worker"])
            if b1 is None:
                continue
            limit = b1["latency_p50_ms"] + 25
            out.append(
                [
                    key,
                    f"p50 at 1 user <= raw batch-1 p50 + 25 ms ({one['workers']} worker(s), "
                    f"raw at {one['threads_per_worker']} thread(s): {b1['latency_p50_ms']:.1f} ms)",
                    f"{one['predict_p50_ms']:.0f} ms",
                    f"{limit:.0f} ms",
                    "met" if one["predict_p50_ms"] <= limit else "NOT met",
                ]
            )
        for hundred in [r for r in runs if r["users"] == 100]:
            ok = hundred["failures"] == 0 and hundred["overloaded_pct"] <= 5
            out.append(
                [
                    key,
                    f"100 users: 0 failed, <= 5 % 503 ({hundred['workers']} worker(s){_mix(hundred)})",
                    f"{hundred['failures']} failed, {hundred['overloaded_pct']:.1f} % 503",
                    "0, 5 %",
                    "met" if ok else "NOT met",
                ]
            )
        listing = [r for r in saturated if r.get("mix", "portal") == "portal"]
        if listing:
            worst = max(listing, key=lambda r: r["users_p99_ms"])
            out.append(
                [
                    key,
                    f"GET /user/ p99 <= {USERS_P99_LIMIT_MS} ms while saturated (worst run)",
                    f"{worst['users_p99_ms']:.0f} ms ({worst['workers']} worker(s), {worst['users']} users)",
                    f"{USERS_P99_LIMIT_MS} ms",
                    "met" if worst["users_p99_ms"] <= USERS_P99_LIMIT_MS else "NOT met",
                ]
            )
        costed = [r for r in saturated if r.get("mix") == "predict" and r.get("cpu_ms_per_prediction")]
        if costed:
            best = min(costed, key=lambda r: r["cpu_ms_per_prediction"]["portal"])
            ms = best["cpu_ms_per_prediction"]
            out.append(
                [
                    key,
                    "the portal's CPU per prediction (API + PostgreSQL + Redis) <= "
                    f"{PORTAL_CPU_LIMIT_MS:g} ms, predict-only, saturated (best run)",
                    f"{ms['portal']:.1f} ms ({best['workers']} worker(s), {best['users']} users; "
                    f"workers outside inference {ms.get('worker_outside_inference', 0):.1f} ms)",
                    f"{PORTAL_CPU_LIMIT_MS:g} ms",
                    "met" if ms["portal"] <= PORTAL_CPU_LIMIT_MS else "NOT met",
                ]
            )
    return out


def cost_rows(e2e: list[dict]) -> list[list[Any]]:
    """CPU milliseconds per prediction by part, for the runs that recorded them."""
    parts = ("api", "postgres", "redis", "workers", "worker_inference", "worker_outside_inference", "locust")
    return [
        [
            r["model"],
            r.get("mix", "portal"),
            r["workers"],
            r["users"],
            r["throughput"],
            r["cpu_ms_per_prediction"]["portal"],
            *(r["cpu_ms_per_prediction"].get(k, "-") for k in parts),
        ]
        for r in e2e
        if r.get("cpu_ms_per_prediction")
    ]


def tables(
    raw: list[dict],
    agreement: list[dict],
    e2e: list[dict],
    registry: Registry,
    info: dict,
    latency: list[dict] | None = None,
) -> str:
    parts = [
        f"Measured {info['date']} on {info['cpu']}"
        + (f" ({' '.join(info['cpu_features'])})" if info.get("cpu_features") else "")
        + f", {info['cores']} cores, {info['memory_gib']} GiB; "
        + ", ".join(f"{k} {v}" for k, v in info["packages"].items())
        + ".",
        "",
        "### Raw model speed (one process, preprocessed random inputs)",
        "",
        _table(
            ["model", "runtime", "precision", "threads", "batch", "img/s", "p50 ms/batch", "p90 ms/batch"],
            [
                [
                    r["model"],
                    r["runtime"],
                    r["precision"],
                    r["threads"],
                    r["batch_size"],
                    r["throughput"],
                    r["latency_p50_ms"],
                    r["latency_p90_ms"],
                ]
                for r in raw
            ],
        ),
        "",
        "### Top-1 agreement with TensorFlow FP32 on the shared photos",
        "",
    ]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for a in agreement:
        groups.setdefault((a["model"], a["runtime"], a["precision"]), []).append(a)
    parts.append(
        _table(
            ["model", "runtime", "precision", "same top-1", "photos that differ"],
            [
                [
                    *k,
                    f"{sum(a['agrees'] for a in v)} / {len(v)}",
                    ", ".join(f"{a['photo']} ({a['reference_top1']} -> {a['top1']})" for a in v if not a["agrees"])
                    or "-",
                ]
                for k, v in groups.items()
            ],
        )
    )
    parts += ["", "### End to end through the HTTP API (Locust users that never pause)", ""]
    rows = []
    for r in e2e:
        model, runtime, precision = raw_source(r["model"], registry)
        own, fp32 = best_raw(raw, model, runtime, precision), best_raw(raw, model, runtime, "fp32")
        cpu = r["cpu_cores"]
        rows.append(
            [
                r["model"],
                r.get("api_processes", 1),
                r["workers"],
                r["users"],
                r.get("mix", "portal"),
                r["throughput"],
                _ratio(r["throughput"], own),
                _ratio(r["throughput"], fp32),
                r["predict_p50_ms"],
                r["predict_p99_ms"],
                r["users_p99_ms"],
                r["failures"],
                r["overloaded"],
                r["worker_peak_rss_mib"],
                " / ".join(f"{cpu.get(k, 0):.2f}" for k in ("workers", "api", "locust", "postgres", "redis")),
                r.get("db_connections_opened", "-"),
            ]
        )
    parts.append(
        _table(
            [
                "model",
                "API processes",
                "workers",
                "users",
                "users do",
                "pred/s",
                "/ raw best (same precision)",
                "/ raw best FP32",
                "predict p50 ms",
                "predict p99 ms",
                "/user/ p99 ms",
                "failed",
                "503",
                "peak RSS per worker MiB",
                "cores: workers / api / locust / postgres / redis",
                "DB connections opened",
            ],
            rows,
        )
    )
    costs = cost_rows(e2e)
    if costs:
        parts += [
            "",
            "### CPU per prediction by part (ms; the load generator's is reported, not counted)",
            "",
            _table(
                [
                    "model",
                    "users do",
                    "workers",
                    "users",
                    "pred/s",
                    "portal: API + PostgreSQL + Redis",
                    "API",
                    "PostgreSQL",
                    "Redis",
                    "workers",
                    "of which inference",
                    "outside inference",
                    "Locust",
                ],
                costs,
            ),
        ]
    if latency:
        parts += [
            "",
            "### One user, one request at a time: where a prediction's time goes (medians, ms, 1 worker)",
            "",
            _table(
                [
                    "model",
                    "requests",
                    "client",
                    "API (Server-Timing)",
                    "worker: queued to answer",
                    "of which: queue",
                    "preprocess",
                    "inference",
                    "API outside the worker",
                    "client outside the API",
                ],
                [
                    [
                        r["model"],
                        r["requests"],
                        r["client_ms"],
                        r["api_ms"],
                        r["worker_ms"],
                        r["queue_ms"],
                        r["preprocess_ms"],
                        r["inference_ms"],
                        r["api_outside_worker_ms"],
                        r["client_outside_api_ms"],
                    ]
                    for r in latency
                ],
            ),
        ]
    parts += ["", "### Targets", "", _table(["model", "target", "measured", "limit", ""], checks(raw, e2e, registry))]
    return "\n".join(parts)


def _raw_plot(plt: Any, raw: list[dict], models: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        kinds = sorted({(r["runtime"], r["precision"], r["threads"]) for r in raw if r["model"] == model})
        for runtime, precision, threads in kinds:
            rows = [
                r
                for r in raw
                if (r["model"], r["runtime"], r["precision"], r["threads"]) == (model, runtime, precision, threads)
            ]
            ax.plot(
                [r["batch_size"] for r in rows],
                [r["throughput"] for r in rows],
                "o-" if threads > 1 else "x--",
                label=f"{runtime} {precision}, {threads} thread(s)",
            )
        ax.set(title=f"{model}: raw throughput", xlabel="batch size", ylabel="images/s", xscale="log")
        ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def e2e_series(e2e: list[dict], model: str) -> list[tuple[str, list[dict]]]:
    """``model``'s runs as the lines of a plot, by users: one per worker count and mix (runs of
    different mixes are different loads), with its legend's name."""
    series = []
    for workers, mix in sorted({(r["workers"], r.get("mix", "portal")) for r in e2e if r["model"] == model}):
        rows = [r for r in e2e if (r["model"], r["workers"], r.get("mix", "portal")) == (model, workers, mix)]
        series.append((f"{workers} worker(s){_mix(rows[0])}", sorted(rows, key=lambda r: r["users"])))
    return series


def plots(raw: list[dict], e2e: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    models = sorted({r["model"] for r in raw})
    if models:
        written.append(_raw_plot(plt, raw, models, out / "raw_throughput.png"))
    keys = sorted({r["model"] for r in e2e})
    if keys:
        fig, axes = plt.subplots(2, len(keys), figsize=(6 * len(keys), 8), squeeze=False)
        for col, key in enumerate(keys):
            for name, rows in e2e_series(e2e, key):
                users = [r["users"] for r in rows]
                axes[0][col].plot(users, [r["throughput"] for r in rows], "o-", label=name)
                axes[1][col].plot(users, [r["predict_p50_ms"] for r in rows], "o-", label=f"p50, {name}")
                axes[1][col].plot(users, [r["predict_p99_ms"] for r in rows], "x--", label=f"p99, {name}")
            axes[0][col].set(
                title=f"{key}: end-to-end throughput", xlabel="users", ylabel="predictions/s", ylim=(0, None)
            )
            axes[1][col].set(title=f"{key}: /model/predict latency", xlabel="users", ylabel="ms", yscale="log")
            for ax in (axes[0][col], axes[1][col]):
                ax.legend()
                ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(out / "e2e.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def update_report(path: Path, body: str) -> None:
    """Replaces the generated part of the report, keeping the prose around it."""
    text = path.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def load(out: Path, name: str) -> list[dict]:
    path = out / name
    return json.loads(path.read_text()) if path.exists() else []
