"""My uploads, a page of 12 at a time, each with its thumbnail, answers and my verdicts."""

from __future__ import annotations

import functools

import streamlit as st

from contracts.messages import PredictionStatus
from ui.client import Api, Job
from ui.session import guarded

PAGE_SIZE = 12


def history_page(api: Api) -> None:
    st.title("My uploads")
    page = st.number_input("Page", min_value=1, value=1, step=1, key="history_page")
    # Three calls a page: the images with their thumbnails, their jobs, and my feedback.
    listing = guarded(api, lambda: api.images(skip=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE, thumbnails=True))
    if not listing:
        return
    if not listing["data"]:
        st.info("Nothing here yet: classify a photo or draw a sketch.")
        return
    feedback = {f["prediction_id"]: f for f in guarded(api, api.my_feedback) or []}
    jobs = guarded(api, lambda: api.jobs_of_images([image["id"] for image in listing["data"]]))
    if jobs is None:
        return
    jobs_of: dict[str, list[Job]] = {}
    for job in jobs:
        jobs_of.setdefault(job["image_id"], []).append(job)
    st.caption(f"{listing['count']} uploads")
    for image in listing["data"]:
        left, right = st.columns([1, 3])
        with left:
            if image["thumbnail"]:
                st.image(image["thumbnail"], width=140)
            else:
                st.caption("(no preview)")
            if st.button("Delete", key=f"delete_{image['id']}") and guarded(
                api, functools.partial(api.delete_image, image["id"])
            ):
                st.rerun()
        with right:
            st.markdown(
                f"**{image['filename'] or image['file_name']}** · {image['width']}x{image['height']} · {image['created_at'][:19]}"
            )
            for job in jobs_of.get(image["id"], []):
                for r in job["results"]:
                    verdict = feedback.get(r["id"])
                    note = ""
                    if verdict:
                        note = " · you said: " + (
                            "correct" if verdict["is_correct"] else f"wrong ({verdict['correct_label'] or '?'})"
                        )
                    answer = f"{r['label']} ({r['score']:.1%})" if r["status"] == PredictionStatus.done else r["status"]
                    st.write(f"{r['model']}@{r['version']}: {answer}{note}")
        st.divider()
