"""Administration, for admins only: system status, users, and model quality with retraining data."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import altair as alt
import pandas as pd
import streamlit as st
from pandas.io.formats.style import Styler

from contracts.training import ARCHITECTURES
from ui.client import (
    Api,
    ApiError,
    Comparison,
    Export,
    Role,
    ServingVersion,
    Stats,
    TrainingRecord,
    TrainingRun,
)
from ui.results import readable_time, words
from ui.session import CATALOG_SECONDS, display_name, guarded, held_models, keeps_session, models

ROLES: list[Role] = ["user", "admin"]
MIN_VERDICTS = 20
"""The fewest verdicts on a version for an accuracy of them to be given: below it the API gives
none (a version's ``feedback_accuracy``, in the Models tab and the comparisons), and Model
quality leaves it blank too."""
VERSION_ACTIONS: dict[str, dict[str, str | bool]] = {
    "Put in shadow (a copy of the traffic, answers kept apart)": {"channel": "shadow"},
    "Make a canary (gets the traffic its weight gives)": {"channel": "canary"},
    "Retire (unloaded by the workers)": {"channel": "retired"},
    "Disable": {"enabled": False},
    "Enable": {"enabled": True},
}


def admins_only(api: Api) -> None:
    """What a signed-in person who is not an admin sees at the admin page's address."""
    st.title("Administration")
    st.warning("This page is for administrators. Choose another page in the menu.")


def admin_page(api: Api) -> None:
    _empty_fields()
    st.title("Administration")
    # Every tab runs on every rerun: the stats two of them show are fetched once.
    stats = guarded(api, api.stats)
    status, versions, runs, users, quality = st.tabs(["System status", "Models", "Training", "Users", "Model quality"])
    with status:
        status_tab(api, stats)
    with versions:
        models_tab(api)
    with runs:
        training_tab(api)
    with users:
        users_tab(api)
    with quality:
        quality_tab(api, stats)
        drift_section(api)


def drift_section(api: Api) -> None:
    """Per model version, each signal's drift index and its two distributions side by side."""
    st.subheader("Drift")
    report = guarded(api, api.drift)
    if not report:
        return
    needed = report.get("min_values")
    st.caption(
        f"Each version's latest {report['window_size']} predictions against its first "
        f"{report['reference_size']}: PSI below {report['watch_threshold']} is stable, above "
        f"{report['alert_threshold']} a real shift (see the README)."
        + (f" A signal needs {needed} values in each to be compared." if needed else "")
    )
    if not report["versions"]:
        st.info("No version has both windows of predictions yet.")
        return
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "Model version": f"{v['model']}@{v['version']}",
                    "Signal": _signal_name(s["signal"]),
                    # None for a signal not compared: an empty cell, its reason said below.
                    "PSI": None if s["psi"] is None else round(s["psi"], 3),
                    "Status": s["status"],
                }
                for v in report["versions"]
                for s in v["signals"]
            ]
        ),
        hide_index=True,
    )
    # Said, not left out: a signal with too few values (uploads from before pixel statistics were
    # kept) has no index, where a small reference would otherwise read as a lasting shift.
    for v in report["versions"]:
        for s in v["signals"]:
            if s.get("reason"):
                st.warning(f"{v['model']}@{v['version']}, {_signal_name(s['signal'])} not compared: {s['reason']}.")
    versions = {f"{v['model']}@{v['version']}": v for v in report["versions"]}
    chosen = versions[st.selectbox("Version", list(versions), key="drift-version")]
    signals = {s["signal"]: s for s in chosen["signals"]}
    signal = signals[st.selectbox("Signal", list(signals), format_func=_signal_name, key="drift-signal")]
    if "reference_count" in signal:
        st.caption(f"Values: {signal['reference_count']} in the reference, {signal['window_count']} in the window.")
    if not signal["bins"]:
        st.info(f"Not compared: {signal.get('reason') or 'no values'}.")
        return
    frame = pd.DataFrame(signal["bins"]).set_index("label")[["reference", "window"]]
    # The API gives the bins lowest first: drawn in that order, not in the alphabetical order of their labels.
    st.bar_chart(frame, stack=False, sort=False)


SIGNAL_NAMES = {"top1_score": "top-1 score"}
"""Drift signals whose name does not read well with its underscores made spaces."""


def _signal_name(signal: str) -> str:
    return SIGNAL_NAMES.get(signal, signal.replace("_", " "))


def status_tab(api: Api, stats: Stats | None) -> None:
    """Readiness, live workers, queue depths, and which model versions are served."""
    ready = api.readiness()
    st.metric("Portal", "ready" if ready["status"] == "ok" else "not ready")
    for check, result in ready["checks"].items():
        if result.get("status") != "ok":
            # Why it is not ready: "not ready" alone left the operator to read /health/ready.
            st.error(f"{check}: {result.get('detail') or result.get('status')}")
    for warning in ready["warnings"]:
        st.warning(warning)
    if stats:
        # One worker process serves several versions: the processes alive, then per version.
        st.metric("Worker processes alive", stats["live_workers"])
        st.dataframe(
            pd.DataFrame([{"Queue": k, "Jobs waiting": v} for k, v in stats["queue_depth"].items()]), hide_index=True
        )
    if ready["status"] != "ok" and not ready["checks"]:
        # The API cannot be reached (readiness has no checks then): the catalog held from before
        # is no news of now, and shown as current it said versions were served while none was.
        catalog, fetched_on = held_models()
        if not catalog:
            return
        st.warning(f"Last known model versions, {_when(fetched_on)}: the API cannot be reached now.")
    else:
        catalog = models(api)
    st.dataframe(
        pd.DataFrame(
            [
                {
                    # The name people read, and the reference the other admin pages and the API use.
                    "Model version": f"{m['display_name']} ({m['ref']})",
                    "Available": "yes" if m["available"] else "no",
                    "Worker processes serving it": m["workers"],
                    "Why not": m["reason"] or "",
                }
                for m in catalog
            ]
        ),
        hide_index=True,
    )


def _when(moment: float | None) -> str:
    """``as of 10:17:33 UTC (40 s ago)`` (or ``(5 min ago)``) for a time in seconds since the epoch."""
    if moment is None:
        return "from earlier"
    ago = max(0, round(time.time() - moment))
    since = f"{ago} s" if ago < 120 else f"{ago // 60} min"
    return f"as of {time.strftime('%H:%M:%S', time.gmtime(moment))} UTC ({since} ago)"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def models_tab(api: Api) -> None:
    """Every model version with its state, traffic, workers, memory and accuracy; forms to set
    weights, shadow, promote, roll back; a comparison of two versions as a table and a chart."""
    versions = guarded(api, api.serving)
    if versions is None:
        return
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "model": v["name"],
                    "version": v["version"],
                    "name": v["display_name"],
                    "channel": v["channel"],
                    "enabled": v["enabled"],
                    "weight": v["weight"],
                    "traffic share": _percent(v["weight_share"]),
                    "workers": v["workers"],
                    "memory (MiB)": "" if v["memory_mib"] is None else f"{v['memory_mib']:.0f}",
                    "held-out accuracy": _percent(v["heldout_accuracy"]),
                    "verdicts": v["feedback"],
                    "verdict accuracy": _percent(v["feedback_accuracy"]),
                    "not served because": v["unavailable_reason"] or "",
                }
                for v in versions
            ]
        ),
        hide_index=True,
    )
    names = list(dict.fromkeys(v["name"] for v in versions))
    if not names:
        return
    # First the models with more than one version: those are the ones an operator compares.
    several = [n for n in names if sum(v["name"] == n for v in versions) > 1]
    names = several + [n for n in names if n not in several]
    name = st.selectbox("Model", names, key="registry_model")
    mine = [v for v in versions if v["name"] == name]
    weights_form(api, name, mine)
    version_form(api, name, mine)
    promotion_form(api, name, mine)
    comparison_section(api, name, mine)
    training_record_section(api, name, mine)


def _rerun_saying(form: str, message: str, cleared: dict[str, object] | None = None) -> None:
    """After a change made from ``form``: the page again, which reads the new state, with the
    fields keyed in ``cleared`` set to their empty values (``_empty_fields``) and ``message``
    said at the form (st.rerun drops what this run showed)."""
    st.session_state[f"said_{form}"] = message
    st.session_state[EMPTIED] = {**st.session_state.get(EMPTIED, {}), **(cleared or {})}
    st.rerun()


EMPTIED = "admin_fields_to_empty"
"""Fields a change emptied, by key, with their empty values, set at the next run's start."""


def _empty_fields() -> None:
    """Sets the fields a change asked to empty, before any is drawn: the one moment Streamlit lets
    a widget's value be set, and sends it to the browser. Removing the key instead would leave the
    browser's copy, sent back with the next submit (a change audited with the last one's reason)."""
    for key, value in st.session_state.pop(EMPTIED, {}).items():
        st.session_state[key] = value


def _said(form: str) -> None:
    """The message of the change made from ``form`` on the run before, once."""
    if message := st.session_state.pop(f"said_{form}", None):
        st.success(message)


def _changed(form: str, message: str, reason: str) -> None:
    """After a registry change: the tables show the new state (the catalogue too), ``message`` is
    said at the form, and its ``reason`` field is empty, so that the next change is not audited
    with this one's reason."""
    st.session_state.pop("models", None)
    _rerun_saying(form, message, {reason: ""})


def weights_form(api: Api, name: str, versions: list[ServingVersion]) -> None:
    live = [v for v in versions if v["enabled"] and v["channel"] in ("stable", "canary")]
    with st.form(f"weights_{name}"):
        st.subheader("Traffic weights")
        st.caption("Requests that name the model without a version are split by these weights, sticky per user.")
        weights = {
            v["version"]: int(
                st.number_input(
                    f"{name}@{v['version']} ({v['channel']})",
                    min_value=0,
                    max_value=1_000_000,
                    value=v["weight"],
                    step=5,
                    # Keyed by the current weight too: another admin's change shows, not this form's old value.
                    key=f"weight_{name}_{v['version']}_{v['weight']}",
                )
            )
            for v in live
        }
        reason = st.text_input("Why", key=f"weights_reason_{name}")
        force = st.checkbox(
            "Force past fewer classes",
            key=f"weights_force_{name}",
            help="Traffic to a version that knows fewer classes than the stable one is refused: "
            "people's pictures of the others would get a wrong answer. Force it to go ahead anyway.",
        )
        if st.form_submit_button("Save weights"):
            if not reason.strip():
                st.error("Say why: the change is audited.")
            elif _done(api, lambda: api.set_weights(name, weights, reason, force)):
                moved = ", ".join(
                    f"@{v['version']} {v['weight']} → {weights[v['version']]}"
                    for v in live
                    if weights[v["version"]] != v["weight"]
                )
                _changed(f"weights_{name}", f"Weights of {name} saved: {moved}.", f"weights_reason_{name}")
        _said(f"weights_{name}")


def version_form(api: Api, name: str, versions: list[ServingVersion]) -> None:
    with st.form(f"version_{name}"):
        st.subheader("Change a version")
        version = st.selectbox("Version", [v["version"] for v in versions], key=f"change_version_{name}")
        action = st.selectbox("Change", list(VERSION_ACTIONS), key=f"change_action_{name}")
        reason = st.text_input("Why", key=f"change_reason_{name}")
        if st.form_submit_button("Apply"):
            if not reason.strip():
                st.error("Say why: the change is audited.")
            elif _done(
                api,
                lambda: api.set_channel(
                    name,
                    int(version),
                    reason,
                    channel=cast(str | None, VERSION_ACTIONS[action].get("channel")),
                    enabled=cast(bool | None, VERSION_ACTIONS[action].get("enabled")),
                ),
            ):
                _changed(f"version_{name}", _version_change(name, version, action), f"change_reason_{name}")
        _said(f"version_{name}")


def _version_change(name: str, version: int, action: str) -> str:
    change = VERSION_ACTIONS[action]
    if "enabled" in change:
        return f"{name}@{version} {'enabled' if change['enabled'] else 'disabled'}."
    return f"{name}@{version} moved to the {change['channel']} channel."


def promotion_form(api: Api, name: str, versions: list[ServingVersion]) -> None:
    candidates = [v["version"] for v in versions if v["channel"] != "stable" and v["channel"] != "retired"]
    # What this page shows as stable: a second click on the rollback, or one on a page older than
    # another admin's change, is refused instead of undoing an older promotion.
    stable = next((v["version"] for v in versions if v["channel"] == "stable"), None)
    with st.form(f"promote_{name}"):
        st.subheader("Promote or roll back")
        st.caption(
            "A promotion is refused when the version compares worse than the stable one; force it with a "
            "reason to go ahead. The previous stable version stays loaded for a rollback."
        )
        version = st.selectbox("Version to promote", candidates, key=f"promote_version_{name}")
        force = st.checkbox("Force past a worse comparison", key=f"promote_force_{name}")
        reason = st.text_input("Why", key=f"promote_reason_{name}")
        promote, rollback = st.columns(2)
        if promote.form_submit_button("Promote", disabled=not candidates):
            if not reason.strip():
                st.error("Say why: the change is audited.")
            elif _done(api, lambda: api.promote(name, int(version), reason, force)):
                _changed(
                    f"promote_{name}", f"{name}@{version} promoted: it is the stable version.", f"promote_reason_{name}"
                )
        if rollback.form_submit_button("Roll back the latest promotion"):
            if not reason.strip():
                st.error("Say why: the change is audited.")
            elif _done(api, lambda: api.rollback(name, reason, from_version=stable)):
                _changed(
                    f"promote_{name}",
                    f"Rolled back the latest promotion of {name}: the version stable before it is back.",
                    f"promote_reason_{name}",
                )
        _said(f"promote_{name}")


def _done(api: Api, action: Callable[[], None]) -> bool:
    """Runs an API change; True when it went through (its error is shown otherwise)."""

    def run() -> bool:
        action()
        return True

    return guarded(api, run) is True


def comparison_section(api: Api, name: str, versions: list[ServingVersion]) -> None:
    st.subheader("Compare two versions")
    numbers = [v["version"] for v in versions]
    if len(numbers) < 2:
        st.caption("The model has one version.")
        return
    stable = next((v["version"] for v in versions if v["channel"] == "stable" and v["enabled"]), numbers[0])
    others = [n for n in numbers if n != stable] or numbers
    left, right = st.columns(2)
    candidate = left.selectbox("Candidate", others, key=f"compare_candidate_{name}")
    baseline = right.selectbox("Against", numbers, index=numbers.index(stable), key=f"compare_baseline_{name}")
    if candidate == baseline:
        st.info("Pick two different versions.")
        return
    comparison = guarded(api, lambda: api.compare(name, int(candidate), int(baseline)))
    if comparison is not None:
        show_comparison(comparison)
    if st.button("Run both on the images users labelled", key=f"evaluate_{name}"):
        started = guarded(api, lambda: api.evaluate(name, int(candidate), int(baseline)))
        if started is not None:
            st.success(f"Evaluating on {started['images']} labelled images; this table fills in as they are answered.")
    evaluations = guarded(api, lambda: api.evaluations(name)) or []
    if evaluations:
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "started": e["created_at"][:16].replace("T", " "),
                        "by": e["requested_by"],
                        "status": e["status"],
                        "images": e["images"],
                        "candidate": f"@{e['candidate']['version']}: {_percent(e['candidate']['accuracy'])}",
                        "baseline": f"@{e['baseline']['version']}: {_percent(e['baseline']['accuracy'])}",
                        "still to answer": e["candidate"]["pending"] + e["baseline"]["pending"],
                    }
                    for e in evaluations
                ]
            ),
            hide_index=True,
        )


def training_record_section(api: Api, name: str, versions: list[ServingVersion]) -> None:
    """How a version was trained: its curves, per-class scores and confusion matrix."""
    st.subheader("How a version was trained")
    numbers = [v["version"] for v in versions]
    version = st.selectbox("Version", numbers, index=len(numbers) - 1, key=f"record_version_{name}")
    found = _training_record(api, name, int(version))
    if found is None:
        return
    if isinstance(found, str):
        st.caption(found)
        return
    if found["run"] is not None:
        st.caption(f"Trained by run {found['run']['id']} ({found['run']['reason']}).")
    else:
        st.caption("Trained before training runs existed; from the metrics.json beside the model file.")
    show_curves(record_history(found["record"]))
    show_record(found["record"], key=f"{name}_{version}")


def _training_record(api: Api, name: str, version: int) -> TrainingRecord | str | None:
    """A version's training record, or the API's reason why it has none (a 404 by design for a
    version the portal did not train); asked again once CATALOG_SECONDS old, not on every rerun.
    None after another error, which is shown."""
    known: dict[str, tuple[float, TrainingRecord | str]] = st.session_state.setdefault("training_records", {})
    ref = f"{name}@{version}"
    if ref in known and time.monotonic() - known[ref][0] < CATALOG_SECONDS:
        return known[ref][1]

    def fetch() -> TrainingRecord | str:
        try:
            return api.training_record(name, version)
        except ApiError as exc:
            if exc.status == 404:
                return exc.message
            raise

    found = guarded(api, fetch)
    if found is not None:
        known[ref] = (time.monotonic(), found)
    return found


def show_comparison(comparison: Comparison) -> None:
    """The two versions side by side as a table, their accuracies as a bar chart, the verdict."""
    ours, theirs = comparison["candidate"], comparison["baseline"]
    evaluation = comparison["evaluation"]
    rows = {
        "held-out accuracy": (ours["heldout_accuracy"], theirs["heldout_accuracy"]),
        "accuracy on the same labelled images": (
            (evaluation["candidate"]["accuracy"], evaluation["baseline"]["accuracy"]) if evaluation else (None, None)
        ),
        "accuracy on users' verdicts": (ours["feedback_accuracy"], theirs["feedback_accuracy"]),
    }
    table = pd.DataFrame(
        {
            "": [
                *rows,
                "verdicts",
                f"answers ({comparison['days']} days)",
                "latency p50 (ms)",
                "latency p95 (ms)",
                "mean top-1 score",
            ],
            f"@{ours['version']} ({ours['channel']})": [
                *(_percent(a) for a, _ in rows.values()),
                ours["feedback"],
                ours["answers"],
                ours["latency_p50_ms"],
                ours["latency_p95_ms"],
                ours["mean_score"],
            ],
            f"@{theirs['version']} ({theirs['channel']})": [
                *(_percent(b) for _, b in rows.values()),
                theirs["feedback"],
                theirs["answers"],
                theirs["latency_p50_ms"],
                theirs["latency_p95_ms"],
                theirs["mean_score"],
            ],
        }
    )
    st.dataframe(table.map(lambda value: "" if value is None else str(value)), hide_index=True)
    known = {label: pair for label, pair in rows.items() if None not in pair}
    if known:
        chart = pd.DataFrame(
            {
                f"@{ours['version']}": [a for a, _ in known.values()],
                f"@{theirs['version']}": [b for _, b in known.values()],
            },
            index=list(known),
        )
        st.bar_chart(chart, stack=False, horizontal=True, y_label="", x_label="accuracy")
    if comparison["shadow_agreement"] is not None:
        st.caption(
            f"As a shadow it agreed with the answers it mirrored {comparison['shadow_agreement']:.1%} of the time "
            f"({comparison['shadow_answers']} copies)."
        )
    verdict = {
        "worse": "Worse than the version it is compared with, by more than the margin",
        "not_worse": "Not worse",
        # Figures may show above and still not compare (other held-out drawings, other classes).
        "no_evidence": "Not compared: no accuracy of both was measured the same way",
    }[comparison["verdict"]]
    st.markdown(f"**{verdict}** (margin {comparison['margin']:.0%})")
    for reason in comparison["reasons"]:
        st.caption(reason)


def training_tab(api: Api) -> None:
    """Training runs: start one, follow its epochs, cancel it; a finished run's curves, per-class
    scores and confusion matrix."""
    runs = guarded(api, api.training_runs)
    if runs is None:
        return
    with st.form("start_training"):
        st.subheader("Train a new version")
        st.caption("Sketch models only: QuickDraw plus users' labelled train examples; the result goes into shadow.")
        sketch_models = sorted({m["name"] for m in models(api) if m["input"]["mode"] == "L"}) or ["sketch"]
        model = st.selectbox("Model", sketch_models, key="train_model")
        left, middle, right = st.columns(3)
        epochs = int(left.number_input("Epochs", min_value=1, max_value=200, value=12, key="train_epochs"))
        arch = middle.selectbox("Architecture", ARCHITECTURES, key="train_arch")
        rate = float(
            right.number_input(
                "Learning rate", min_value=1e-5, max_value=1.0, value=2e-3, format="%.4f", key="train_lr"
            )
        )
        per_category = int(
            st.number_input(
                "Drawings per category (QuickDraw)",
                min_value=10,
                max_value=100_000,
                value=3000,
                key="train_per_category",
            )
        )
        reason = st.text_input("Why", key="train_reason")
        if st.form_submit_button("Start training"):
            options = {"epochs": epochs, "arch": arch, "learning_rate": rate, "per_category": per_category}
            if not reason.strip():
                st.error("Say why: the run is audited.")
            elif (started := guarded(api, lambda: api.start_training(model, options, reason))) is not None:
                st.session_state["train_chosen"] = started["id"]  # shown next, and kept (``picked``)
                _rerun_saying(
                    "start_training", f"Run queued: {started['model_name']}@{started['version']}.", {"train_reason": ""}
                )
        _said("start_training")
    unfinished = any(r["status"] in UNFINISHED_RUN for r in runs)
    # Redrawn on its own every two seconds while a run is queued or running, and not at all otherwise.
    st.fragment(keeps_session(training_runs_section), run_every=2 if unfinished else None)(api, unfinished)


UNFINISHED_RUN = ("queued", "running")


def training_runs_section(api: Api, refreshing: bool) -> None:
    """The latest runs, and the chosen one's progress (with Cancel) or its record."""
    runs = guarded(api, api.training_runs)
    if runs is None:
        return
    if refreshing and not any(r["status"] in UNFINISHED_RUN for r in runs):
        st.rerun()  # all ended: the whole page again, which stops the redrawing
    if not runs:
        st.info("No training run yet.")
        return
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "started": r["created_at"][:16].replace("T", " "),
                    "version": f"{r['model_name']}@{r['version']}",
                    "from": f"@{r['base_version']}",
                    "status": r["status"],
                    "epoch": f"{r['epoch']} of {r['options'].get('epochs', '?')}",
                    "by": r["requested_by"],
                    "held-out accuracy": _percent((r["record"] or {}).get("test_accuracy")),
                    "error": r["error"] or "",
                    "promotion": r["promotion"] or "",
                }
                for r in runs
            ]
        ),
        hide_index=True,
    )
    run = picked("Run", {f"{r['model_name']}@{r['version']} ({r['status']})": r for r in runs}, key="train")
    show_run(api, run)


Picked = TypeVar("Picked", TrainingRun, Export)


def picked(title: str, labelled: dict[str, Picked], *, key: str) -> Picked:
    """A picker of ``labelled`` (label: item, each with an ``id``) whose choice is kept by id in
    ``<key>_chosen`` (set there to show an item, one just started, say; the first while none is
    chosen or the chosen one is gone): the options are the ids, so the choice stays on its item
    as its label changes (a status moving on), and a pick by hand moves it. The browser holds the
    label it was last sent and sends it back with every rerun, this part's own redraws included:
    whenever it holds another (the choice set by the page, or its label changed), the choice is
    sent to it again, or its stale label would move the picker to another item."""
    items = {item["id"]: item for item in labelled.values()}
    labels = {item["id"]: label for label, item in labelled.items()}
    chosen = st.session_state.get(f"{key}_chosen")
    if chosen not in items:
        chosen = next(iter(items))
        st.session_state[f"{key}_chosen"] = chosen
    pick, shown = f"{key}_pick", f"{key}_shown"
    if st.session_state.get(pick) != chosen or st.session_state.get(shown) != labels[chosen]:
        st.session_state[pick] = chosen  # set before it is drawn: Streamlit sends it to the browser
    st.selectbox(
        title,
        list(items),
        format_func=lambda item_id: labels.get(item_id, str(item_id)),
        key=pick,
        on_change=_picked_by_hand,
        args=(key,),
    )
    st.session_state[shown] = labels[chosen]
    return items[chosen]


def _picked_by_hand(key: str) -> None:
    st.session_state[f"{key}_chosen"] = st.session_state[f"{key}_pick"]


def run_progress(run: TrainingRun) -> tuple[float, str]:
    """The share of a queued or running run's training done, counting the epoch in progress by its
    steps, and what its progress bar says: "Running: epoch 3 of 12 (step 40 of 300), about 95 s
    left" once the trainer reported steps of the epoch after those finished, "Running: epoch 2 of
    12" (epochs finished) before that."""
    epochs = max(int(run["options"].get("epochs", 1)), 1)
    step, steps = run.get("step"), run.get("steps")
    eta = f", about {run['eta_seconds']:.0f} s left" if run.get("eta_seconds") is not None else ""
    status = run["status"].capitalize()
    if step is not None and steps:
        done = run["epoch"] + min(step / steps, 1.0)
        said = f"{status}: epoch {run['epoch'] + 1} of {epochs} (step {step} of {steps}){eta}"
    else:
        done, said = run["epoch"], f"{status}: epoch {run['epoch']} of {epochs}{eta}"
    return min(max(done / epochs, 0.0), 1.0), said


def show_run(api: Api, run: TrainingRun) -> None:
    epochs = int(run["options"].get("epochs", 1))
    if run["status"] in ("queued", "running"):
        share, said = run_progress(run)
        st.progress(share, text=said)
        failure = f"cancel_error_{run['id']}"
        if run.get("cancel_requested_at"):
            st.caption("Cancel requested: the run stops within seconds and keeps nothing.")
        elif st.button("Cancel this run", key=f"cancel_{run['id']}"):
            if guarded(api, lambda: api.cancel_training(run["id"]), keep=failure) is not None:
                st.rerun()
        elif message := st.session_state.get(failure):
            st.error(message)  # a failed cancel stays said while the list redraws itself
    else:
        if run["status"] == "cancelled" and run["error"]:
            st.caption(f"Cancelled: {run['error'].removeprefix('cancelled ')}.")  # it names the epoch itself
        else:
            why = f" ({run['error']})" if run["error"] else ""
            st.caption(f"{run['status'].capitalize()}: epoch {run['epoch']} of {epochs}{why}.")
    show_curves(run["history"])
    if run["promotion"]:
        st.caption(f"Auto-promote rule: {run['promotion']}")
    if run["record"]:
        show_record(run["record"], key=run["id"])


def record_history(record: dict[str, Any]) -> list[dict[str, float]]:
    history = record.get("history")
    return [h for h in history if isinstance(h, dict) and "epoch" in h] if isinstance(history, list) else []


def show_curves(history: Sequence[Mapping[str, float | None]]) -> None:
    """Loss and accuracy per epoch, on the training and the validation data. A number that is not
    finite (None in a run's history, NaN in an older record: the training diverged) is not drawn,
    and said so."""
    if len(history) < 2:
        # A line needs two points: one epoch's numbers are said, where a chart would be empty.
        for h in history:
            numbers = ", ".join(f"{said} {_curve_value(c, h[c])}" for c, said in CURVES.items() if c in h)
            st.caption(f"Epoch {_epoch(h)}: {numbers}")
        return
    missing = {said: [_epoch(h) for h in history if c in h and not _finite(h[c])] for c, said in CURVES.items()}
    if said := "; ".join(
        f"{name} at epoch{'s' if len(epochs) > 1 else ''} {', '.join(map(str, epochs))}"
        for name, epochs in missing.items()
        if epochs
    ):
        st.caption(f"Not a finite number (the training diverged), so not drawn: {said}.")
    frame = pd.DataFrame(history)
    left, right = st.columns(2)
    left.caption("Loss")
    left.altair_chart(curve_chart(frame, [c for c in ("loss", "val_loss") if c in frame]), use_container_width=True)
    right.caption("Accuracy")
    right.altair_chart(
        curve_chart(frame, [c for c in ("accuracy", "val_accuracy") if c in frame]), use_container_width=True
    )


def curve_chart(frame: pd.DataFrame, columns: list[str]) -> alt.Chart:
    """Lines of ``columns`` of ``frame`` (one row per epoch, column ``epoch``) against the epoch,
    whose axis is marked at whole epochs only (a quantitative axis otherwise marks 1.5, 2.5, ...)."""
    long = frame.melt(id_vars="epoch", value_vars=columns, var_name="curve", value_name="value")
    return (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1, format="d"), title="epoch"),
            y=alt.Y("value:Q", title=None),
            color=alt.Color("curve:N", title=None),
            tooltip=["epoch:Q", "curve:N", "value:Q"],
        )
    )


CURVES = {"loss": "loss", "val_loss": "validation loss", "accuracy": "accuracy", "val_accuracy": "validation accuracy"}


def _curve_value(curve: str, value: float | None) -> str:
    if not _finite(value):
        return "not a finite number"
    return _percent(value) if curve.endswith("accuracy") else f"{value:.3f}"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _epoch(numbers: Mapping[str, float | None]) -> int:
    return int(numbers["epoch"] or 0)


def show_record(record: dict[str, Any], *, key: str) -> None:
    """A training record (metrics.json): held-out scores, curves when not shown already, per-class
    scores and the confusion matrix."""
    st.markdown(
        f"Held-out top-1 **{_percent(record.get('test_accuracy'))}**, top-3 {_percent(record.get('test_top3_accuracy'))}, "
        f"macro-F1 {record.get('macro_f1', '')}; {record.get('seconds', '?')} s on "
        f"{(record.get('machine') or {}).get('cpus', '?')} CPUs, {record.get('arch', '?')} architecture"
    )
    if per_class := record.get("per_class"):
        st.dataframe(pd.DataFrame(per_class).T, key=f"per_class_{key}")
    if matrix := record.get("confusion_matrix"):
        names = matrix["labels"]
        st.caption("Confusion matrix (rows: true label, columns: predicted)")
        st.dataframe(confusion_table(matrix["rows_true_columns_predicted"], names), key=f"confusion_{key}")


def confusion_table(counts: list[list[int]], labels: list[str]) -> Styler:
    """The confusion matrix (rows: true label, columns: predicted) shaded on one scale for the
    whole table, so the darkest cells are the largest counts (shaded per column, a column of
    a few misreadings looked as dark as the diagonal)."""
    frame = pd.DataFrame(counts, index=labels, columns=labels)
    return frame.style.background_gradient(cmap="Blues", axis=None)


def users_tab(api: Api) -> None:
    """Every user, and forms to create one or change one's role and whether it is active."""
    users = guarded(api, api.users) or []
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "Email": u["email"],
                    "Name": u["name"],
                    "Role": u["role"],
                    "Active": "yes" if u["is_active"] else "no",
                    "Created": readable_time(u["created_at"]),
                }
                for u in users
            ]
        ),
        hide_index=True,
    )
    with st.form("create_user"):
        st.subheader("Create a user")
        email = st.text_input("Email", key="new_email")
        name = st.text_input("Name", key="new_name")
        password = st.text_input("Password", type="password", key="new_password")
        role = st.selectbox("Role", ROLES, key="new_role")
        submitted = st.form_submit_button("Create")
        if submitted and (created := guarded(api, lambda: api.create_user(email, password, name, role))) is not None:
            # Read again, the table and the list below show the new user; the form starts empty.
            _rerun_saying(
                "create_user",
                f"Created {created['email']}.",
                {"new_email": "", "new_name": "", "new_password": "", "new_role": ROLES[0]},
            )
        _said("create_user")
    st.subheader("Change a user")
    options = {f"{u['email']} (#{u['id']})": u for u in users}
    # Outside the form, so that the fields below show the chosen user's own role and state.
    picked = st.selectbox("User", list(options), key="change_pick")
    if not picked:
        return
    user = options[picked]
    with st.form(f"change_user_{user['id']}"):
        new_role = st.selectbox("Role", ROLES, index=ROLES.index(user["role"]), key=f"change_role_{user['id']}")
        active = st.checkbox("Active", value=user["is_active"], key=f"change_active_{user['id']}")
        if st.form_submit_button("Save"):
            if (new_role, active) == (user["role"], user["is_active"]):
                st.info("Nothing to change.")
            elif guarded(api, lambda: api.update_user(user["id"], role=new_role, is_active=active)) is not None:
                _rerun_saying(
                    "change_user", f"Saved {user['email']}: {new_role}, {'active' if active else 'inactive'}."
                )
        _said("change_user")


def quality_tab(api: Api, stats: Stats | None) -> None:
    """Accuracy from feedback, the most corrected labels, latency, and the retraining download."""
    if stats:
        st.subheader("Accuracy from feedback")
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "Model": display_name(api, f"{a['model']}@{a['version']}"),
                        "Verdicts": a["feedback"],
                        "Right": a["correct"],
                        # Blank below MIN_VERDICTS, as in the Models tab: 0 of 3 is no accuracy.
                        "Accuracy": _percent(a["accuracy"] if a["feedback"] >= MIN_VERDICTS else None),
                    }
                    for a in stats["accuracy"]
                ]
            ),
            hide_index=True,
        )
        st.caption(f"Accuracy is given from {MIN_VERDICTS} verdicts on, as in the Models tab.")
        st.subheader("Most corrected labels")
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "Model": display_name(api, f"{c['model']}@{c['version']}"),
                        "It said": words(c["predicted"]),
                        "People said": words(c["corrected_to"]) or "(no label given)",
                        "Times": c["count"],
                    }
                    for c in stats["most_corrected"]
                ]
            ),
            hide_index=True,
        )
        st.subheader("Latency")
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "Model": display_name(api, f"{row['model']}@{row['version']}"),
                        "Answers": row["count"],
                        "p50 (ms)": _ms(row["p50_ms"]),
                        "p95 (ms)": _ms(row["p95_ms"]),
                        "p99 (ms)": _ms(row["p99_ms"]),
                    }
                    for row in stats["latency"]
                ]
            ),
            hide_index=True,
        )
    verdicts_with_comments(api)
    retraining_data(api)


UNFINISHED_EXPORT = ("queued", "running")


def counted(n: int, noun: str) -> str:
    """``n`` and its noun, singular for one: ``1 image``, ``1,204 images``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _export_progress(export: Export) -> str:
    if export["status"] == "queued":
        return "waiting"
    if export["rows_total"] == 0 and export["status"] != "done":
        return "counting"
    return f"{export['rows_done']:,} of {counted(export['rows_total'], 'image')}"


def retraining_data(api: Api) -> None:
    """Export jobs of what users labelled: start one (of a model, or only what is new since the
    last), follow it while an API process writes it, and download the zip once it is done."""
    st.subheader("Retraining data")
    st.caption(
        "The images users labelled, a folder per model and label, with feedback.csv (comments included). "
        "The zip is written in the background; it waits here until you download it."
    )
    every = "every model"
    model = st.selectbox("Model", [every, *sorted({m["name"] for m in models(api)})], key="export_model")
    since_last = st.checkbox(
        "Only verdicts given since the last export of this model", key="export_since_last", value=False
    )
    if st.button("Start the export", key="export_start"):
        chosen = None if model == every else model
        started = guarded(api, lambda: api.start_export(chosen, since_last=since_last))
        if started is not None:
            st.session_state["export_chosen"] = started["id"]  # shown next, and kept (``picked``)
    unfinished = any(e["status"] in UNFINISHED_EXPORT for e in guarded(api, api.exports) or [])
    # Redrawn on its own every two seconds while an export is unfinished, and not at all otherwise.
    st.fragment(keeps_session(exports_section), run_every=2 if unfinished else None)(api, unfinished)


def exports_section(api: Api, refreshing: bool) -> None:
    """The latest exports, and the chosen one's progress or download."""
    exports = guarded(api, api.exports) or []
    if refreshing and not any(e["status"] in UNFINISHED_EXPORT for e in exports):
        st.rerun()  # all finished: the whole page again, which stops the redrawing
    if not exports:
        st.caption("No export yet.")
        return
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "When": readable_time(e["created_at"]),
                    "Model": (e["model"] or "every model") + (" (new verdicts only)" if e["since_last"] else ""),
                    "Status": e["status"],
                    "Progress": _export_progress(e),
                    "Size": f"{e['bytes_written'] / 1e6:.1f} MB",
                    "By": e["requested_by"],
                }
                for e in exports
            ]
        ),
        hide_index=True,
    )
    # The id's start keeps two exports of the same minute, model and status apart.
    labels = {
        f"{readable_time(e['created_at'])}: {e['model'] or 'every model'} ({e['status']}) · {e['id'][:8]}": e
        for e in exports
    }
    show_export(api, picked("Export", labels, key="export"))


def show_export(api: Api, export: Export) -> None:
    """One export: its progress while unfinished (and a cancel button), why it failed, or its download."""
    if export["status"] in UNFINISHED_EXPORT:
        share = export["rows_done"] / export["rows_total"] if export["rows_total"] else 0.0
        st.progress(min(share, 1.0), text=f"{export['status'].capitalize()}: {_export_progress(export)}")
        failure = f"export_cancel_error_{export['id']}"
        if st.button("Cancel this export", key=f"export_cancel_{export['id']}"):
            if guarded(api, lambda: api.cancel_export(export["id"]), keep=failure) is not None:
                st.rerun()
        elif message := st.session_state.get(failure):
            st.error(message)  # a failed cancel stays said while the list redraws itself
        return
    if export["status"] == "failed":
        st.error(f"The export failed: {export['error']}")
        return
    if export["status"] == "cancelled":
        st.caption("Cancelled.")
        return
    if export["download"] is None:
        st.caption(export["error"] or "Its zip was deleted; start a new export.")
        return
    summary = export["summary"] or {}
    st.caption(
        f"{counted(summary.get('examples', 0), 'image')}; "
        f"{counted(summary.get('superseded', 0), 'verdict')} replaced by later ones, "
        f"{summary.get('unlabelled', 0):,} without a label, "
        f"{counted(summary.get('missing', 0), 'image')} missing from the store."
    )
    if st.button("Prepare the download", key="export_prepare"):
        downloaded = guarded(api, lambda: api.download_export(export["id"]))
        if downloaded is not None:
            st.session_state["export_zip"] = (export["id"], *downloaded)
    prepared = st.session_state.get("export_zip")
    if prepared is not None and prepared[0] == export["id"]:
        _, name, data = prepared
        st.download_button(f"Download {name}", data, file_name=name, mime="application/zip", key="export_download")


def verdicts_with_comments(api: Api) -> None:
    """Everyone's latest verdicts, those with a comment first to read."""
    st.subheader("Latest verdicts")
    verdicts = guarded(api, api.all_feedback) or []
    only_comments = st.toggle("Only those with a comment", value=True, key="verdicts_with_comments")
    shown = [v for v in verdicts if v["comment"]] if only_comments else verdicts
    if not shown:
        st.caption("No comments yet." if only_comments else "No verdicts yet.")
        return
    emails = {u["id"]: u["email"] for u in guarded(api, api.users) or []}
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "When": readable_time(v["created_at"]),
                    "Who": emails.get(v["owner_id"], f"user {v['owner_id']}"),
                    # Third, so that a page of usual width shows what people wrote.
                    "Comment": v["comment"] or "",
                    "Model": display_name(api, judged) if (judged := v.get("model")) else "",
                    "It said": (v["predicted_class"] or "").replace("_", " "),
                    "Verdict": {True: "right", False: "wrong", None: ""}[v["is_correct"]],
                    "Right label": (v["correct_label"] or "").replace("_", " "),
                }
                for v in shown
            ]
        ),
        hide_index=True,
        column_config={"Comment": st.column_config.TextColumn("Comment", width="large")},
    )
