"""My uploads, a page of 12 at a time, each with its thumbnail, answers and my verdicts; a result
can be reopened with its feedback form, and an upload deleted after a confirmation."""

from __future__ import annotations

import functools

import streamlit as st

from contracts.messages import PredictionStatus
from ui.client import Api, Feedback, Job, ListedImage
from ui.results import STATUS_WORDS, plain, readable_time, show_results, words
from ui.session import display_name, guarded
from ui.views.batch import STATUS_WORDS as BATCH_WORDS
from ui.views.batch import download_results

PAGE_SIZE = 12


def verdict_note(verdict: Feedback | None) -> str:
    if not verdict:
        return ""
    if verdict["is_correct"]:
        return " · you said it was right"
    return (
        f" · you said it was wrong, it is {words(verdict['correct_label'])}"
        if verdict["correct_label"]
        else " · you said it was wrong"
    )


def history_page(api: Api) -> None:
    st.title("My uploads")
    deleted = st.session_state.pop("history_deleted", None)
    if deleted:
        st.success(f"Deleted {deleted} and its results.")
    # The files of batches, thousands at a time, would bury a person's own uploads: left out
    # unless asked for.
    with_batches = st.toggle("Include the files of my batches", key="history_with_batches")
    if st.session_state.get("history_listed_with_batches", False) != with_batches:
        st.session_state["history_listed_with_batches"] = with_batches
        st.session_state["history_cursors"] = [None]  # another listing: its pages start over
        st.session_state["history_at"] = 0
    # Paged by key: each page starts after the last upload of the one before (its cursor), so a
    # page deep in a long history costs what the first one does. The total is asked for with the
    # first page, and again with any page right after a delete.
    cursors: list[str | None] = st.session_state.setdefault("history_cursors", [None])
    at = min(int(st.session_state.get("history_at", 0)), len(cursors) - 1)
    first = at == 0
    count = first or deleted is not None
    # Three calls a page: the images with their thumbnails, their jobs, and my feedback.
    listing = guarded(
        api,
        lambda: api.images(
            cursor=cursors[at],
            limit=PAGE_SIZE,
            thumbnails=True,
            total=count,
            source=None if with_batches else "upload",
        ),
    )
    if not listing:
        return
    if count:
        st.session_state["history_total"] = listing["count"] or 0
    if first:
        batches_section(api)
    total = int(st.session_state.get("history_total", 0))
    if not listing["data"]:
        if first and with_batches:
            st.info("Nothing here yet: classify a photo or draw a sketch.")
        elif first:
            st.info(
                "Nothing here yet: classify a photo or draw a sketch "
                "(the files of your batches show with “Include the files of my batches”)."
            )
        else:
            if deleted is not None:
                # The last upload of this page went: the page before, with the new total.
                st.session_state["history_at"] = at - 1
                st.session_state["history_deleted"] = deleted
                st.rerun()
            st.info("No older uploads.")
        navigation(at, None)
        return
    jobs = guarded(api, lambda: api.jobs_of_images([image["id"] for image in listing["data"]]))
    if jobs is None:
        return
    # My verdicts on this page's answers, however old the page.
    answers = [r["id"] for job in jobs for r in job["results"]][:500]
    feedback = {
        f["prediction_id"]: f for f in (guarded(api, lambda: api.my_feedback(answers)) if answers else []) or []
    }
    jobs_of: dict[str, list[Job]] = {}
    for job in jobs:
        jobs_of.setdefault(job["image_id"], []).append(job)
    pages = max(1, -(-total // PAGE_SIZE), at + 1)
    st.caption(f"Page {at + 1} of {pages} · {total} {'images' if with_batches else 'uploads'}")
    for image in listing["data"]:
        upload_row(api, image, jobs_of.get(image["id"], []), feedback)
        st.divider()
    navigation(at, listing["next_cursor"])


def navigation(at: int, next_cursor: str | None) -> None:
    """Newer and Older buttons; Older remembers the cursor of the page it opens."""
    newer, older = st.columns(2)
    if newer.button("Newer", key="history_newer", disabled=at == 0, use_container_width=True):
        st.session_state["history_at"] = at - 1
        st.rerun()
    if older.button("Older", key="history_older", disabled=next_cursor is None, use_container_width=True):
        cursors: list[str | None] = st.session_state["history_cursors"]
        del cursors[at + 1 :]
        cursors.append(next_cursor)
        st.session_state["history_at"] = at + 1
        st.rerun()


def upload_row(api: Api, image: ListedImage, jobs: list[Job], feedback: dict[str | None, Feedback]) -> None:
    name = image["filename"] or image["file_name"]
    left, right = st.columns([1, 3])
    with left:
        if image["thumbnail"]:
            st.image(image["thumbnail"], width=140)
        else:
            st.caption("(no preview)")
        confirming = st.session_state.get("history_confirm") == image["id"]
        if not confirming and st.button("Delete", key=f"delete_{image['id']}"):
            st.session_state["history_confirm"] = image["id"]
            st.rerun()
        if confirming:
            st.warning("Delete this upload and its results?")
            yes, no = st.columns(2)
            if yes.button("Delete", type="primary", key=f"delete_yes_{image['id']}"):
                st.session_state.pop("history_confirm", None)
                if guarded(api, functools.partial(api.delete_image, image["id"])) is not None:
                    st.session_state["history_deleted"] = name
                    st.rerun()
            if no.button("Keep", key=f"delete_no_{image['id']}"):
                st.session_state.pop("history_confirm", None)
                st.rerun()
    with right:
        st.markdown(f"**{plain(name)}** · {image['width']}x{image['height']} · {readable_time(image['created_at'])}")
        for job in jobs:
            for r in job["results"]:
                done = r["status"] == PredictionStatus.done
                answer = f"{words(r['label'])} ({r['score'] or 0.0:.1%})" if done else STATUS_WORDS.get(r["status"], "")
                model = display_name(api, f"{r['model']}@{r['version']}")
                st.write(f"{model}: {answer}{verdict_note(feedback.get(r['id']))}")
            # Opened one at a time, on demand: a page of results stays three API calls.
            if st.session_state.get("history_open") == job["job_id"]:
                show_results(api, job, image=image["thumbnail"], file_name=name, verdicts=feedback)
            elif st.button("Open these results", key=f"open_{job['job_id']}"):
                st.session_state["history_open"] = job["job_id"]
                st.rerun()


def batches_section(api: Api) -> None:
    """My latest batches, each with its results to download once it is over."""
    listing = guarded(api, lambda: api.batches(limit=10))
    if not listing or not listing["data"]:
        return
    with st.expander(f"My batches ({listing['count']:,})", expanded=False):
        for b in listing["data"]:
            st.write(
                f"{readable_time(b['created_at'])} · {b['entries']:,} files · "
                f"{', '.join(display_name(api, ref) for ref in b['models'])} · "
                f"{BATCH_WORDS.get(b['status'], b['status'])}"
            )
            if b["status"] not in ("done", "cancelled"):
                continue
            # Read on demand (a batch's results may be thousands of rows), then offered with every
            # run, read again once the batch has changed (an image of it deleted, say).
            prepared = f"batch_prepared_{b['id']}"
            if f"batch_csv_{b['id']}" not in st.session_state and not st.session_state.get(prepared):
                if not st.button("Prepare the results", key=f"batch_prepare_{b['id']}"):
                    continue
                st.session_state[prepared] = True
            detail = guarded(api, functools.partial(api.batch, b["id"]))
            if detail is not None:
                download_results(api, detail)
