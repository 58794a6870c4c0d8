"""Classify a whole collection: drop a zip or many images, choose the models, watch the batch's
progress and download its results."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from datetime import timedelta

import streamlit as st

from contracts.imaging import UPLOAD_EXTENSIONS
from ui.client import Api, BatchDetail
from ui.config import get_ui_settings
from ui.results import choose_models, readable_time
from ui.session import display_name, guarded, keeps_session

STATUS_WORDS = {
    "receiving": "being received",
    "running": "running",
    "done": "finished",
    "cancelled": "cancelled",
}


ENTRY_TIME = (1980, 1, 1, 0, 0, 0)
"""The time of every packed entry (the time of packing would make each click another request)."""


def batch_page(api: Api) -> None:
    st.title("Classify a collection")
    settings = get_ui_settings()
    st.caption(
        "Drop a zip of images, or many images at once. Every image is checked as a single photo is: "
        "files that are no image are listed with the reason, the rest go on."
    )
    files = st.file_uploader(
        f"Images or zips, up to {settings.max_batch_mb:,} MiB in all",
        type=[*UPLOAD_EXTENSIONS, "zip"],
        accept_multiple_files=True,
        key="batch_files",
        max_upload_size=settings.batch_uploader_mb,
    )
    chosen = choose_models(api, "batch", mode="RGB")
    if st.button("Start the batch", type="primary", disabled=not files or not chosen, key="batch_start"):
        sent = packed([(f.name, f.getvalue()) for f in files or []])
        key = sending_key([f.file_id for f in files or []], chosen)
        with st.spinner("Sending and checking the files…"):
            answer = guarded(api, lambda: api.create_batch(sent, chosen, idempotency_key=key))
        if answer is not None:
            st.session_state["batch_id"] = answer["batch"]["id"]
            if answer["replayed"]:
                st.info("These files were sent already: this is their batch. Drop them again to send a new one.")
    if batch_id := st.session_state.get("batch_id"):
        batch = guarded(api, lambda: api.batch(batch_id))
        if batch is not None and batch["status"] in ("receiving", "running"):
            follow(api, batch_id)
        elif batch is not None:
            show_progress(api, batch)
    listing = guarded(api, lambda: api.batches(limit=10))
    if listing and listing["data"]:
        st.subheader("Your latest batches")
        for b in listing["data"]:
            line = (
                f"{readable_time(b['created_at'])} · {b['entries']:,} files · "
                f"{', '.join(display_name(api, ref) for ref in b['models'])} · {STATUS_WORDS.get(b['status'], b['status'])}"
            )
            left, right = st.columns([3, 1])
            left.write(line)
            if b["id"] != batch_id and right.button("Open", key=f"batch_open_{b['id']}"):
                st.session_state["batch_id"] = b["id"]
                st.rerun()


def sending_key(file_ids: list[str], models: list[str]) -> str:
    """The ``Idempotency-Key`` of sending these dropped files (Streamlit gives each drop of a file
    its own id) to these models: a second click, or one after an answer that never came, gets the
    batch the first click made instead of a copy; the same files dropped again are a new batch."""
    return hashlib.sha256(json.dumps([file_ids, models]).encode("utf-8")).hexdigest()


def packed(files: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The dropped images in one zip (stored, not compressed: images are compressed already),
    beside the dropped zips: one part per archive, however many images (a form takes at most
    1,000 parts). The same images pack to the same bytes (every entry has ``ENTRY_TIME``), so a
    second click sends the same request as the first, which the portal answers with its batch."""
    zips = [(name, data) for name, data in files if name.lower().endswith(".zip")]
    images = [(name, data) for name, data in files if not name.lower().endswith(".zip")]
    if len(images) <= 1:
        return zips + images
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        seen: dict[str, int] = {}
        for name, data in images:
            # Two dropped files may share a name; each keeps its own entry.
            count = seen[name] = seen.get(name, 0) + 1
            entry = zipfile.ZipInfo(name if count == 1 else f"{count}-{name}", date_time=ENTRY_TIME)
            archive.writestr(entry, data)
    return [*zips, ("images.zip", buf.getvalue())]


@st.fragment(run_every=timedelta(seconds=2))
@keeps_session
def follow(api: Api, batch_id: str) -> None:
    """The running batch's progress, refreshed every 2 seconds; once it ends the whole page runs
    again and shows its results (without refreshing any more)."""
    batch = guarded(api, lambda: api.batch(batch_id))
    if batch is None:
        return
    if batch["status"] not in ("receiving", "running"):
        st.rerun()
    show_progress(api, batch)


def show_progress(api: Api, batch: BatchDetail) -> None:
    counts = batch["counts"]
    finished = counts["done"] + counts["failed"] + counts["cancelled"]
    models = ", ".join(display_name(api, ref) for ref in batch["models"])
    st.subheader(f"Batch of {readable_time(batch['created_at'])}")
    st.caption(f"Models: {models}")
    st.progress(finished / counts["images"] if counts["images"] else 1.0, text=_progress_text(batch))
    if counts["skipped"]:
        skipped = counts["skipped"]
        files = "file" if skipped == 1 else "files"
        if batch["status"] == "receiving":
            st.warning(f"{skipped:,} {files} skipped so far (not images, or unreadable): listed once all are received.")
        else:
            st.warning(f"{skipped:,} {files} skipped (not images, or unreadable):")
            skipped_files(api, batch["id"], skipped)
    if partly := counts["partly_answered"]:
        images = "image lacks" if partly == 1 else "images lack"
        st.warning(
            f"{partly:,} {images} an answer of some model (it failed, expired or was cancelled): "
            "the results' error column says why."
        )
    if deleted := counts["deleted"]:
        files = "file's image was" if deleted == 1 else "files' images were"
        st.caption(f"{deleted:,} {files} deleted since the batch received them, with their answers.")
    if waiting := batch["waiting_for"]:
        names = ", ".join(display_name(api, ref) for ref in waiting)
        st.info(
            f"Waiting: no model worker serves {names} now (disabled by an administrator, or its worker is down). "
            "Those images stay queued and go on once it is served again; nothing is lost."
        )
    if batch["status"] in ("receiving", "running"):
        failure = f"batch_cancel_error_{batch['id']}"
        if st.button("Cancel what has not run", key="batch_cancel"):
            guarded(api, lambda: api.cancel_batch(batch["id"]), keep=failure)
        elif message := st.session_state.get(failure):
            st.error(message)  # a failed cancel stays said while the progress redraws itself
        return
    download_results(api, batch)


SKIPPED_SHOWN = 200
"""The most skipped files the page lists (one page of the results); the CSV has them all."""


def skipped_files(api: Api, batch_id: str, count: int) -> None:
    """The skipped files and why, as the batch's results give them (the first SKIPPED_SHOWN,
    saying how many there are past them): read once per batch (they are all known once the
    batch is received), again only when their count changes."""
    key = f"batch_skipped_{batch_id}"
    kept = st.session_state.get(key)
    if kept is None or kept[0] != count:
        results = guarded(api, lambda: api.batch_results(batch_id, status="skipped", limit=SKIPPED_SHOWN))
        if results is None:
            return
        rows = [{"File": r["file_name"], "Why": r["error"] or ""} for r in results["data"]]
        st.session_state[key] = kept = (count, rows, results["count"])
    _, rows, total = kept
    st.dataframe(rows, hide_index=True)
    if total > len(rows):
        st.caption(f"The first {len(rows):,} of {total:,} skipped files: the results' CSV lists them all.")


def download_results(api: Api, batch: BatchDetail) -> None:
    """A button with the batch's CSV (``results_csv``), when it could be read."""
    if (data := results_csv(api, batch)) is not None:
        st.download_button(
            "Download the results (CSV)",
            data,
            file_name=f"batch-{batch['id']}.csv",
            mime="text/csv",
            type="primary",
            key=f"download_{batch['id']}",
        )


def results_csv(api: Api, batch: BatchDetail) -> bytes | None:
    """The batch's results as CSV, kept in ``st.session_state["batch_csv_<id>"]`` with the state
    of the batch it was read in (status and counts): read again once that state changes (an
    image of the batch deleted since turns its rows from ``done`` to ``deleted``). A failed read
    is said and not kept (the next run reads again); None then."""
    key = f"batch_csv_{batch['id']}"
    state = results_state(batch)
    kept: tuple[tuple[object, ...], bytes] | None = st.session_state.get(key)
    if kept is not None and kept[0] == state:
        return kept[1]
    data = guarded(api, lambda: api.batch_csv(batch["id"]))
    if data is None:
        st.session_state.pop(key, None)  # an older CSV is not offered in the place of this one
        return None
    st.session_state[key] = (state, data)
    return data


def results_state(batch: BatchDetail) -> tuple[object, ...]:
    """What the batch's results depend on: its status and counts (the time left aside)."""
    counts = {name: value for name, value in batch["counts"].items() if name != "eta_seconds"}
    return (batch["status"], *sorted(counts.items()))


def _progress_text(batch: BatchDetail) -> str:
    c = batch["counts"]
    text = f"{c['done']:,} of {c['images']:,} images done"
    if c["failed"]:
        text += f", {c['failed']:,} failed"
    if c["cancelled"]:
        text += f", {c['cancelled']:,} cancelled"
    if batch["status"] == "running" and c["eta_seconds"]:
        text += f" · about {time_left(c['eta_seconds'])} left"
    elif batch["status"] != "running":
        text += f" · {STATUS_WORDS.get(batch['status'], batch['status'])}"
    return text


def time_left(seconds: int) -> str:
    """A batch's time left in words: ``45 s``, ``3 min 20 s``, and from an hour on to the
    minute, ``2 h 2 min`` (seconds would be noise beside hours)."""
    if seconds < 3600:
        minutes, seconds = divmod(seconds, 60)
        if not minutes:
            return f"{seconds} s"
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"
