"""Choosing models, running a job with a progress bar, and showing its answers with a feedback form:
what the classify and sketch pages share."""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import re
import threading
import time
from collections import Counter, OrderedDict
from datetime import datetime, timedelta
from typing import Any, cast

import pandas as pd
import streamlit as st
from PIL import Image

from contracts import spreadsheets
from contracts.imaging import load_image
from contracts.messages import PredictionStatus
from ui.client import Api, ApiError, Feedback, Job, Model, Prediction
from ui.config import get_ui_settings
from ui.session import Carried, display_name, guarded, keeps_session, models, submits, unlisted_version


def readable_time(iso: str) -> str:
    """``2026-12-01T10:17:33.52+00:00`` as ``1 Dec 2026, 10:17 UTC`` (the API's times are UTC)."""
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return f"{moment.day} {moment:%b %Y, %H:%M} UTC"


def choose_models(api: Api, keys_prefix: str, mode: str) -> list[str]:
    """Under a "Models" heading, a checkbox per model version that reads ``mode`` input ("RGB":
    photos, "L": drawings), as the registry says. Until the person ticks or clears a box, the
    boxes follow the registry (``default_models``): a promotion or a rollback moves the tick to
    the new stable version. Once they have, their choice stays for the session, across photos
    and pages, while the versions they chose are offered; one the catalog no longer lists
    (retired, disabled) gives way to its model's stable version, and a note says so. Returns the
    checked references."""
    st.markdown("**Models**")
    shown = [m for m in models(api) if m["input"]["mode"] == mode]
    choice_key, note_key = f"{keys_prefix}_choice", f"{keys_prefix}_choice_note"
    choice: list[str] | None = st.session_state.get(choice_key)  # None: never changed by hand
    if choice is None:
        wanted = default_models(shown, mode)
    else:
        wanted, replaced = kept_choice(shown, choice)
        if replaced:
            serving = {m["ref"] for m in shown if m["available"]}
            text = " ".join(
                f"{plain(display_name(api, gone))} is no longer offered"
                + (
                    f": {plain(display_name(api, stable))} is chosen in its place"
                    + ("." if stable in serving else " (not available right now).")
                    if stable
                    else "."
                )
                for gone, stable in replaced
            )
            st.session_state[note_key] = (text, [gone for gone, _ in replaced])
            # Nothing of the choice left (a whole model gone): the registry's defaults again.
            st.session_state[choice_key] = wanted or None
            wanted = wanted or default_models(shown, mode)
    st.session_state[f"{keys_prefix}_wanted"] = wanted  # what a box changed by hand starts from
    if note := st.session_state.get(note_key):
        text, gone = note
        if any(m["ref"] in gone for m in shown):
            st.session_state.pop(note_key)  # offered again: no longer true
        else:
            st.info(text)
    chosen = []
    with st.container(horizontal=True, gap="medium"):  # wraps on a narrow screen
        for m in shown:
            label = m["display_name"] + (" · trial version" if m["channel"] == "canary" else "")
            # The API words the reason plainly for people and in full (paths, errors) for admins.
            help_text = m["description"] if m["available"] else f"Not available right now: {m['reason']}"
            key = f"{keys_prefix}_{m['ref']}" + ("" if m["available"] else "_unavailable")
            ticked = m["available"] and m["ref"] in wanted
            # Set rather than passed as ``value=``: Streamlit ignores that once the box has a state
            # of its own, so the tick would stay on the version that was stable when it was drawn.
            # Set on every run, even when unchanged: only a value set in this run reaches the
            # browser, and a box the browser draws anew (after a photo was removed, when the boxes
            # were not shown) otherwise shows its default, unticked, while the page counts it ticked.
            st.session_state[key] = ticked
            box = st.checkbox(
                label,
                disabled=not m["available"],
                help=help_text,
                key=key,
                on_change=_ticked_by_hand,
                args=(keys_prefix, m["ref"], key),
            )
            if box:
                chosen.append(m["ref"])
    if why := nothing_to_choose(api, mode):
        # Said where it shows: a greyed-out box keeps its reason behind its "?".
        st.warning(why)
        until_a_model_serves(api, mode)
    elif unavailable := not_offered_now(shown):
        # Also said in words under the boxes: a "?" to hover is out of reach on a touch screen.
        st.caption(unavailable)
    return chosen


def not_offered_now(shown: list[Model]) -> str | None:
    """The versions among ``shown`` that cannot be chosen now and why, in the API's words, as
    Markdown (those sharing a reason on one line); None when every one can be."""
    by_reason: dict[str, list[str]] = {}
    for m in shown:
        if not m["available"]:
            reason = (m["reason"] or "it is not available").rstrip(".")
            by_reason.setdefault(reason, []).append(m["display_name"])
    lines = [
        (
            f"- {plain(names[0])}: {plain(reason)}."
            if len(names) == 1
            else f"- {', '.join(plain(n) for n in names)}; the portal says of each: {plain(reason)}."
        )
        for reason, names in by_reason.items()
    ]
    return "Not available right now:\n" + "\n".join(lines) if lines else None


def default_models(shown: list[Model], mode: str) -> list[str]:
    """The references ticked while the person has not chosen: the default versions (photos) or
    the stable ones (drawings) that serve, else the first version that serves (a stable version
    not trained yet, say: a picture can still be sent); none while none serves."""
    serving = [m for m in shown if m["available"]]
    preferred = [m["ref"] for m in serving if (m["default"] if mode == "RGB" else m["channel"] == "stable")]
    return preferred or [m["ref"] for m in serving][:1]


def kept_choice(shown: list[Model], choice: list[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """The person's ``choice`` (references) as the catalog ``shown`` offers it now: a version it
    no longer lists (retired, disabled) is replaced by its model's stable version, or dropped
    when there is none; and those, as (reference gone, its replacement or None). A version still
    listed but not serving (no worker alive, say) stays chosen: its box is ticked once it serves."""
    listed = {m["ref"] for m in shown}
    kept = [ref for ref in choice if ref in listed]
    replaced: list[tuple[str, str | None]] = []
    for gone in (ref for ref in choice if ref not in listed):
        name = gone.split("@", 1)[0]
        stable = next((m["ref"] for m in shown if m["name"] == name and m["channel"] == "stable"), None)
        if stable is not None and stable not in kept:
            kept.append(stable)
        replaced.append((gone, stable))
    return kept, replaced


def nothing_to_choose(api: Api, mode: str) -> str | None:
    """Why none of the model versions that read ``mode`` input can be chosen now, in the API's
    words, as Markdown: one line when they share a reason (no worker alive, say), else a line
    per version; None when one can be chosen, or none is offered."""
    shown = [m for m in models(api) if m["input"]["mode"] == mode]
    if not shown or any(m["available"] for m in shown):
        return None
    reasons = [(m["display_name"], (m["reason"] or "it is not available").rstrip(".")) for m in shown]
    if len({reason for _, reason in reasons}) == 1:
        return f"No model can be chosen right now. The portal says of each: {plain(reasons[0][1])}."
    lines = "\n".join(f"- {plain(name)}: {plain(reason)}" for name, reason in reasons)
    return f"No model can be chosen right now. The portal says why:\n{lines}"


MODELS_WAIT_SECONDS = 5.0
"""While no model can be chosen, how often the catalog is asked again: the boxes come back within
this long of a model worker starting."""


@st.fragment(run_every=timedelta(seconds=MODELS_WAIT_SECONDS))
@keeps_session
def until_a_model_serves(api: Api, mode: str) -> None:
    """Placed under the boxes while none of the versions that read ``mode`` input can be chosen:
    asks for the catalog again every MODELS_WAIT_SECONDS, and runs the whole page again once one
    of them serves. Without it the page stayed greyed out after a worker came back, since the
    catalog is read again only when the page runs, and nothing on it could be clicked to run it.
    Draws nothing of its own; gone once the page runs with a version to choose."""
    if any(m["available"] for m in models(api, max_age=MODELS_WAIT_SECONDS) if m["input"]["mode"] == mode):
        st.rerun()


def _ticked_by_hand(keys_prefix: str, ref: str, key: str) -> None:
    """A box ticked or cleared by the person: from now on the page keeps their choice (the
    versions ticked with this change), not the registry's defaults."""
    # From the choice already made, which another box changed in the same run may have just set.
    before = st.session_state.get(f"{keys_prefix}_choice")
    if before is None:
        before = st.session_state.get(f"{keys_prefix}_wanted", [])
    choice = [chosen for chosen in before if chosen != ref]
    if st.session_state[key]:
        choice.append(ref)
    st.session_state[f"{keys_prefix}_choice"] = choice
    st.session_state.pop(f"{keys_prefix}_choice_note", None)  # said, and now answered


REPEAT_WINDOW_S = 5.0
"""A request the same as the last one within this many seconds is the second click of a double
click: what the first sent is followed, nothing is sent again."""


def run_job(
    api: Api, state_key: str, name: str, data: bytes, chosen: list[str], *, keep_error: str | None = None
) -> None:
    """Uploads, predicts, waits with a progress bar; keeps the finished job under ``state_key``,
    and with ``keep_error`` the API's refusal (``about_the_picture``) under that key until a job
    succeeds. The same image and models asked again within ``REPEAT_WINDOW_S`` (a double click)
    follow the job already sent instead of sending it again; a picture already stored by this page
    (a try the models refused, say while no worker served them) is asked again, not stored once
    more."""
    request = (hashlib.sha256(data).hexdigest(), tuple(sorted(chosen)))
    picture = (request[0], name)

    once = submits()

    def stored_id(*, again: bool = False) -> str:
        kept = once.sent.get(f"{state_key}_image")
        if kept is not None and kept[0] == picture and not again:
            return str(kept[1])
        image_id = api.upload(name, data)["id"]
        once.sent[f"{state_key}_image"] = (picture, image_id)
        return image_id

    def run() -> Job:
        with once.lock:
            sent = once.sent.get(state_key)
            if sent is not None and sent[0] == request and time.monotonic() - sent[2] < REPEAT_WINDOW_S:
                job_id = sent[1]
            else:
                try:
                    job_id = api.predict(stored_id(), chosen)
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    job_id = api.predict(stored_id(again=True), chosen)  # deleted meanwhile (History)
                # No Streamlit call until it is kept: a second click may stop this run at the next one.
                once.sent[state_key] = (request, job_id, time.monotonic())
        bar = st.progress(0.0, text="Sent to the models…")
        polls = {"n": 0}

        def tick(job: Job) -> None:
            polls["n"] += 1
            done = sum(r["status"].terminal for r in job["results"])
            total = len(job["results"])
            bar.progress(
                min(0.95, done / max(total, 1) + polls["n"] * 0.01),
                text=f"Waiting for the models: {done} of {total} answered",
            )

        try:
            return api.wait(job_id, timeout=get_ui_settings().answer_wait_seconds, on_poll=tick)
        finally:
            bar.empty()  # never a frozen bar beside what went wrong

    failure: dict[str, ApiError] = {}

    def run_noting_failure() -> Job:
        try:
            return run()
        except ApiError as exc:
            failure["error"] = exc
            raise

    job = guarded(api, run_noting_failure)
    if job is not None:
        st.session_state[state_key] = job
        st.session_state[f"{state_key}_file"] = name
    if keep_error is None:
        return
    if job is not None:
        st.session_state.pop(keep_error, None)
    elif (error := failure.get("error")) is not None and about_the_picture(error):
        st.session_state[keep_error] = error.message
    # Otherwise the API could not be reached, or failed, or asks to wait: said once (above), not
    # kept as if it were the API's answer about this picture.


def about_the_picture(error: ApiError) -> bool:
    """Whether a failed classification is the API's answer about this picture and these models
    (a refusal: 413, 415, 422...; or 504, the picture staying queued), which stays said while the
    picture is shown, rather than an API that cannot be reached (status 0), fails (5xx), or asks
    to wait a moment (429): those pass."""
    return (400 <= error.status < 500 and error.status != 429) or error.status == 504


MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def plain(text: str) -> str:
    """``text`` (a file name, say) shown as typed inside Markdown: its special characters escaped."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def words(label: str | None) -> str:
    """A label as people write it: ``Boston_bull`` as ``Boston bull``."""
    return (label or "").replace("_", " ")


def comparison(api: Api, job: Job) -> pd.DataFrame:
    """One row per model version: its name, top answer in words and confidence, and whether it
    agrees with the answer most models gave (a mark only where at least two agree)."""
    done = [r for r in job["results"] if r["status"] == PredictionStatus.done]
    counts = Counter(r["label"] for r in done)
    majority, votes = counts.most_common(1)[0] if counts else (None, 0)
    rows = []
    for r in job["results"]:
        answered = r["status"] == PredictionStatus.done
        rows.append(
            {
                "Model": display_name(api, f"{r['model']}@{r['version']}"),
                "Answer": words(r["label"]) if answered else STATUS_WORDS.get(r["status"], str(r["status"])),
                "Confidence": round(100 * (r["score"] or 0.0), 1) if answered else None,
                "Agrees": "✓" if answered and votes >= 2 and r["label"] == majority else "",
            }
        )
    return pd.DataFrame(rows)


def comparison_shown(table: pd.DataFrame) -> pd.DataFrame:
    """``comparison``'s table as a static table shows it: names and answers as typed (Markdown
    escaped), confidences as ``87.3 %`` and an empty cell where there is none."""
    shown = table.copy()
    for column in ("Model", "Answer"):
        shown[column] = shown[column].map(plain)
    shown["Confidence"] = ["" if value is None or pd.isna(value) else f"{value:.1f} %" for value in table["Confidence"]]
    return shown


def as_csv(api: Api, job: Job, file_name: str) -> bytes:
    """Every answer of a job, one row per model version and rank (1 to 5), labels in words."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", "model", "model_name", "version", "rank", "label", "score", "status"])
    name = spreadsheets.cell(file_name)  # a file name is what a person chose: never a formula
    for r in job["results"]:
        shown = display_name(api, f"{r['model']}@{r['version']}")
        if r["status"] != PredictionStatus.done:
            writer.writerow([name, r["model"], shown, r["version"], "", "", "", r["status"].value])
        for rank, answer in enumerate(r["top_k"], start=1):
            writer.writerow(
                [name, r["model"], shown, r["version"], rank, words(answer["label"]), answer["score"], "done"]
            )
    return buf.getvalue().encode("utf-8")


def as_json(api: Api, job: Job, file_name: str) -> bytes:
    """The job as the API answered it, with the file's name."""
    return json.dumps({"file": file_name, **job}, indent=2, default=str).encode("utf-8")


STATUS_WORDS = {
    PredictionStatus.pending: "waiting its turn in its batch",
    PredictionStatus.queued: "still waiting",
    PredictionStatus.running: "still working",
    PredictionStatus.failed: "could not answer",
    PredictionStatus.expired: "took too long",
    PredictionStatus.cancelled: "cancelled with its batch",
}
"""Every status but ``done``, as a person reads it beside a model's name."""


def _labels_of(api: Api, ref: str) -> list[str]:
    model = next((m for m in models(api) if m["ref"] == ref), None)
    if model is not None:
        return list(model["labels"] or [])
    # A version the catalog lists no more (retired, disabled); not known: "None of these" is
    # still a verdict.
    unlisted = unlisted_version(api, ref)
    return list(unlisted["labels"]) if unlisted else []


COMMENT_MAX = 2000
"""The longest comment the API keeps, in characters."""
NONE_OF_THESE = "None of these"
"""The answer to "what is right" when the model does not know the right label."""


def said(verdict: Feedback) -> str:
    """A verdict as the person gave it, as Markdown: ``right``, or ``wrong (it is lorikeet)``, with
    its comment shown as typed."""
    words_said = "right" if verdict["is_correct"] else "wrong"
    if verdict["correct_label"] and not verdict["is_correct"]:
        words_said += f" (it is {plain(words(verdict['correct_label']))})"
    if verdict["comment"]:
        words_said += f", and wrote “{plain(verdict['comment'])}”"
    return words_said


def _feedback_form(api: Api, result: Prediction, earlier: Feedback | None = None) -> None:
    ref = f"{result['model']}@{result['version']}"
    key = f"fb_{result['id']}"
    # The verdict sent from this card in this session stands in for the earlier one where the page
    # has none (the classify page): the form stays, so a verdict can be changed as often as wanted.
    earlier = earlier or st.session_state.get(f"{key}_sent")
    if st.session_state.pop(f"{key}_thanks", False):
        st.success("Thanks, your feedback was recorded.")
    if earlier is not None:
        st.caption(f"You said this was {said(earlier)}. Sending again replaces it.")
    st.session_state[f"{key}_model"] = display_name(api, ref)  # for a verdict kept past its session
    with st.form(key):
        # Nothing preselected: a verdict is what the person says, never a default.
        st.radio("Was this right?", ["Correct", "Wrong"], index=None, horizontal=True, key=f"{key}_verdict")
        # The predicted label is no answer to "wrong"; the list filters as one types.
        choices = ["", *(label for label in _labels_of(api, ref) if label != result["label"]), NONE_OF_THESE]
        st.selectbox(
            "If wrong, the right label",
            choices,
            format_func=lambda label: label.replace("_", " ") if label else "Type to search…",
            key=f"{key}_label",
        )
        # Three lines: a comment of up to COMMENT_MAX characters should be readable as it is typed.
        # It starts as the earlier verdict's comment, so that changing only the verdict keeps it
        # (the verdict itself is never preselected: sending again replaces the earlier one).
        if earlier is not None and f"{key}_comment" not in st.session_state:
            st.session_state[f"{key}_comment"] = earlier["comment"] or ""
        st.text_area("Comment (optional)", max_chars=COMMENT_MAX, key=f"{key}_comment")
        if st.form_submit_button("Send feedback", key=f"{key}_send"):
            unsent = _verdict(key)
            if isinstance(unsent, str):
                st.error(unsent)
                return
            is_correct, label, comment = unsent["is_correct"], unsent["correct_label"], unsent["comment"]
            carry = Carried(functools.partial(keep_verdict, unsent), VERDICT_KEPT)
            sent = guarded(api, lambda: api.feedback(result["id"], is_correct, label, comment), carry=carry)
            if sent is not None:
                st.session_state[f"{key}_sent"] = sent
                st.session_state[f"{key}_thanks"] = True
                st.rerun()  # drawn again above the form: what was just said, not what was said before


VERDICT_KEPT = "Your verdict is kept: it is sent once you log in again."


def _verdict(key: str) -> dict[str, Any] | str:
    """The verdict the feedback form ``key`` (``fb_<prediction id>``) holds, ready to send (with
    the person and the model, for ``send_unsent_verdict``), or what is missing from it."""
    verdict = st.session_state.get(f"{key}_verdict")
    right = st.session_state.get(f"{key}_label")
    if verdict is None:
        return "Choose Correct or Wrong first."
    is_correct = verdict == "Correct"
    if not is_correct and not right:
        return f"Choose the right label, or “{NONE_OF_THESE}”."
    user = st.session_state.get("user") or {}
    return {
        "user_id": user.get("id"),
        "model": st.session_state.get(f"{key}_model", ""),
        "prediction_id": key.removeprefix("fb_"),
        "is_correct": is_correct,
        "correct_label": None if is_correct or right == NONE_OF_THESE else right,
        "comment": st.session_state.get(f"{key}_comment") or None,
    }


def verdict_being_sent() -> Carried | None:
    """The verdict whose Send was pressed in this run, when the session is found ended before the
    page is drawn (``session.keep_alive``): kept for the next login like one refused while sent."""
    for name, pressed in list(st.session_state.items()):
        if str(name).startswith("fb_") and str(name).endswith("_send") and pressed is True:
            unsent = _verdict(str(name).removesuffix("_send"))
            if isinstance(unsent, str):
                # Not complete, so nothing to keep: the person is told, not left to find it missing.
                return Carried(_keep_nothing, f"Your verdict was not sent: {unsent[0].lower()}{unsent[1:]}")
            return Carried(functools.partial(keep_verdict, unsent), VERDICT_KEPT)
    return None


def _keep_nothing() -> None:
    """What a verdict too incomplete to send keeps: nothing."""


KEPT_VERDICT_SECONDS = 24 * 3600
"""How long the UI keeps a verdict whose sending met an ended session, waiting for its author's
next login."""
KEPT_VERDICTS_PER_PERSON = 20
"""The most verdicts kept for one person (the oldest goes first)."""
KEPT_VERDICTS_MAX = 2000
"""The most verdicts kept for everyone together (each at most a comment of COMMENT_MAX characters
and a few ids: a few MB at worst), the oldest going first."""

# Kept by this process rather than in st.session_state, which a reload of the page starts anew:
# by (user id, prediction id), oldest first; a later verdict on the same prediction replaces one.
_kept_verdicts: OrderedDict[tuple[int, str], tuple[float, dict[str, Any]]] = OrderedDict()
_kept_verdicts_lock = threading.Lock()


def _drop_old_verdicts(now: float) -> None:
    while _kept_verdicts and now - next(iter(_kept_verdicts.values()))[0] > KEPT_VERDICT_SECONDS:
        _kept_verdicts.popitem(last=False)


def keep_verdict(unsent: dict[str, Any]) -> None:
    """Keeps a verdict (as ``_verdict`` makes it) whose sending met an ended session, for its
    author's next login (``send_unsent_verdict``), within KEPT_VERDICT_SECONDS,
    KEPT_VERDICTS_PER_PERSON and KEPT_VERDICTS_MAX. A verdict of nobody known is not kept."""
    user_id = unsent.get("user_id")
    if user_id is None:
        return
    now = time.time()
    with _kept_verdicts_lock:
        _drop_old_verdicts(now)
        key = (int(user_id), str(unsent["prediction_id"]))
        _kept_verdicts.pop(key, None)
        mine = [k for k in _kept_verdicts if k[0] == key[0]]
        for old in mine[: max(0, len(mine) - KEPT_VERDICTS_PER_PERSON + 1)]:
            del _kept_verdicts[old]
        _kept_verdicts[key] = (now, unsent)
        while len(_kept_verdicts) > KEPT_VERDICTS_MAX:
            _kept_verdicts.popitem(last=False)


def _take_kept_verdicts(user_id: int) -> list[dict[str, Any]]:
    """The verdicts kept for this person, oldest first, no longer kept."""
    with _kept_verdicts_lock:
        _drop_old_verdicts(time.time())
        mine = [k for k in _kept_verdicts if k[0] == user_id]
        return [_kept_verdicts.pop(k)[1] for k in mine]


AFTER_LOGIN_NOTES = "after_login_notes"
"""What the first page after a login says of the verdicts it sent (``send_unsent_verdict``)."""


def send_unsent_verdict(api: Api) -> None:
    """Right after a login (or a session taken back from the cookie): sends the verdicts kept for
    this person when an earlier session of theirs ended while they were being sent, in any tab
    (another person's login leaves them be), and leaves notes saying how that went for the next
    page. A verdict the API refuses is not kept again: its note says why."""
    user = st.session_state.get("user") or {}
    if user.get("id") is None:
        return
    notes: list[tuple[str, str]] = []
    for unsent in _take_kept_verdicts(int(user["id"])):
        # What was said tells apart several verdicts on one model; the start of a long comment
        # is enough for that (the sidebar would otherwise hold up to COMMENT_MAX characters).
        verdict = said(cast(Feedback, {**unsent, "comment": shortened(unsent["comment"])}))
        try:
            api.feedback(unsent["prediction_id"], unsent["is_correct"], unsent["correct_label"], unsent["comment"])
        except ApiError as exc:
            notes.append(("error", f"Your verdict on {unsent['model']}, {verdict}, was not sent: {exc.message}"))
            continue
        notes.append(("success", f"Your verdict on {unsent['model']} was sent: {verdict}."))
    if notes:
        st.session_state[AFTER_LOGIN_NOTES] = notes


NOTE_COMMENT_CHARS = 80
"""The most characters of a comment the note after a login quotes."""


def shortened(comment: str | None) -> str | None:
    """``comment`` cut to NOTE_COMMENT_CHARS characters, with "…" when it was longer."""
    if comment is None or len(comment) <= NOTE_COMMENT_CHARS:
        return comment
    return comment[:NOTE_COMMENT_CHARS].rstrip() + "…"


def show_after_login_note() -> None:
    """The notes ``send_unsent_verdict`` left, once, in the sidebar."""
    notes: list[tuple[str, str]] = st.session_state.pop(AFTER_LOGIN_NOTES, [])
    for kind, text in notes:
        with st.sidebar:
            (st.success if kind == "success" else st.error)(text)


def scroll_to_results(job_id: str) -> None:
    """Brings new results into view once (on a narrow screen they are below the photo)."""
    if st.session_state.get("scrolled_to") == job_id:
        return
    st.session_state["scrolled_to"] = job_id
    # The portal's own constant script: scrolls to the "Results" heading rendered above.
    st.html(
        "<script>setTimeout(() => document.getElementById('results')?.scrollIntoView({behavior: 'smooth'}), 300);"
        "</script>",
        unsafe_allow_javascript=True,
    )


def show_results(
    api: Api,
    job: Job,
    image: bytes | None = None,
    file_name: str = "image",
    verdicts: dict[str | None, Feedback] | None = None,
) -> None:
    """The answers of every model version for one image: a comparison across models with
    downloads, then a card per model (thumbnail, all five answers with percentages, timings
    behind "Details", a feedback form). ``image``: the picture they answered, shown on each card;
    ``verdicts``: the person's earlier verdicts by prediction id, shown with their forms."""
    results = job["results"]
    st.subheader("Results", anchor="results")
    if len(results) > 1:
        # A static table wraps its cells, so all four columns fit a phone's width; an interactive
        # grid keeps each column as wide as its longest name and scrolls the rest out of sight.
        # A name without spaces (MobileNetV2_ImageNet_INT8, its underscores escaped) breaks
        # anywhere, or it would still push the other columns off a phone's screen.
        st.html("<style>[data-testid='stTable'] :is(td, th) { overflow-wrap: anywhere; }</style>")
        st.table(comparison_shown(comparison(api, job)), hide_index=True)
        st.caption("Agrees ✓: the answer most models gave.")
    stem = file_name.rsplit(".", 1)[0] or "results"
    downloads = {"CSV": (as_csv, "text/csv"), "JSON": (as_json, "application/json")}
    with st.container(horizontal=True):
        for kind, (render, mime) in downloads.items():
            st.download_button(
                f"Download {kind}",
                render(api, job, file_name),
                file_name=f"{stem}-results.{kind.lower()}",
                mime=mime,
                key=f"{kind.lower()}_{job['job_id']}",
            )
    per_row = min(len(results), 2)
    for start in range(0, len(results), per_row):
        columns = st.columns(per_row)
        for column, result in zip(columns, results[start : start + per_row], strict=False):
            with column, st.container(border=True):
                result_card(api, result, image, (verdicts or {}).get(result["id"]))


@st.cache_data(max_entries=32, show_spinner=False)
def upright(data: bytes, size: int) -> Image.Image:
    """The picture as people see it (EXIF orientation applied, as the models read it), at most
    ``size`` pixels a side. Raises ImageRejected for what is not a readable image, and (413)
    before decoding anything for a picture of more pixels than the API accepts
    (``MAX_IMAGE_PIXELS``): a few hundred KB of PNG can hold gigabytes of pixels, and this
    process serves every user of the UI."""
    image = load_image(data, draft_size=(size, size), max_pixels=get_ui_settings().max_image_pixels)
    image.thumbnail((size, size))
    return _banded(image)


MAX_SHOWN_ASPECT = 4
"""The longest side of a picture as shown is at most this many times its shortest: a sliver (a
1×5000 picture) is shown on a plain band rather than stretched to a page 200,000 pixels long."""


def _banded(image: Image.Image) -> Image.Image:
    width, height = image.size
    if max(width, height) <= MAX_SHOWN_ASPECT * min(width, height):
        return image
    long_side = max(width, height)
    short_side = -(-long_side // MAX_SHOWN_ASPECT)
    size = (width, short_side) if width >= height else (short_side, height)
    band = Image.new("RGB", size, (240, 240, 240))
    picture = image.convert("RGBA")
    band.paste(picture, ((size[0] - width) // 2, (size[1] - height) // 2), picture)
    return band


def why_heatmap(api: Api, result: Prediction, image: bytes | None) -> None:
    """The picture beside itself with the regions that drove the top-1 answer in warm colours, or
    in plain words why there is none (a model that cannot be explained, no explainer running)."""
    try:
        overlay = api.explanation_png(result["id"])
    except ApiError as exc:
        st.caption(exc.message)
        return
    left, right = st.columns(2)
    if image is not None:
        with contextlib.suppress(Exception):
            left.image(upright(image, 800), caption="Your picture", width="stretch")
    right.image(overlay, caption=f"What drove “{words(result['label'])}”", width="stretch")


def result_card(api: Api, result: Prediction, image: bytes | None, earlier: Feedback | None = None) -> None:
    """One model version's answer, readable at a glance."""
    ref = f"{result['model']}@{result['version']}"
    head, thumb = st.columns([3, 1])
    head.markdown(f"**{display_name(api, ref)}**")
    if image is not None:
        with contextlib.suppress(Exception):  # a picture the browser cannot show still has its answers
            thumb.image(upright(image, 128), width=64)
    if result["status"] in (PredictionStatus.queued, PredictionStatus.running):
        # Sending the picture again would only queue it twice.
        st.info("This model has not answered yet: its answer appears in History once a worker takes the picture.")
        return
    if result["status"] == PredictionStatus.pending:
        st.info(
            "This picture is waiting its turn in its batch (batches go a few pictures at a time): "
            "its answer appears in History once the batch reaches it."
        )
        return
    if result["status"] == PredictionStatus.cancelled:
        st.info("This model did not answer: its batch was cancelled before this picture's turn came.")
        return
    if result["status"] != PredictionStatus.done:
        st.warning(f"This model {STATUS_WORDS.get(result['status'], 'did not answer')}. Please try again.")
        return
    st.markdown(f"### {words(result['label'])}")
    st.caption(f"{(result['score'] or 0.0):.1%} confident")
    for answer in result["top_k"]:
        st.progress(min(max(answer["score"], 0.0), 1.0), text=f"{words(answer['label'])} · {answer['score']:.1%}")
    # Off by default: the heatmap is computed on demand (a second or two), the card stays fast.
    # Not offered for a version that can never be explained (a TFLite file has no graph to take
    # gradients of); one no longer listed (retired) is asked, and the answer says why.
    explainable = next((m["explainable"] for m in models(api) if m["ref"] == ref), True)
    if explainable and st.toggle(
        "Why?", key=f"why-{result['id']}", help="Show which regions drove this answer (Grad-CAM)"
    ):
        why_heatmap(api, result, image)
    with st.expander("Details"):
        t = result["timings"]
        st.caption(f"Model version: {ref}")
        if result["cached"]:
            st.caption("This image was answered before by this version: no new computation.")
        else:
            st.caption(
                f"Waiting {t['queue_ms'] or 0:.0f} ms · computing {t['inference_ms'] or 0:.0f} ms "
                f"· in all {t['total_ms'] or 0:.0f} ms"
            )
    _feedback_form(api, result, earlier)
