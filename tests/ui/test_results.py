"""The models people choose from, as a page offers them while a version is not served yet, and the
pictures shown beside the answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from contracts.messages import PredictionStatus
from ui.results import STATUS_WORDS, upright

BAD_UPLOADS = Path(__file__).resolve().parents[3] / "shared" / "data" / "bad_uploads"

SCRIPT = """
import time
import streamlit as st
from ui.client import Api
from ui.results import choose_models

def model(ref, channel, available, labels):
    name, version = ref.split("@")
    return {
        "name": name, "version": int(version), "ref": ref, "display_name": ref, "channel": channel,
        "description": "", "runtime": "tensorflow", "precision": "fp32",
        "input": {"height": 28, "width": 28, "mode": "L"}, "num_classes": len(labels or []),
        "labels": labels, "available": available, "reason": None if available else "not trained yet",
        "workers": int(available), "random_weights": False, "default": False,
    }

trained = st.session_state.get("trained", False)
st.session_state["models"] = [
    model("sketch@1", "canary", True, ["cat", "fish"]),
    model("sketch@2", "canary", not st.session_state.get("down", False), ["cat", "fish"]),
    model("sketch@3", "stable", trained, ["cat", "dog", "fish"] if trained else None),
]
st.session_state["models_at"] = time.monotonic()
st.session_state["chosen"] = choose_models(Api("http://127.0.0.1:9"), "sketch", mode="L")
"""


def test_a_drawing_can_be_sent_while_the_stable_version_is_not_trained_and_it_is_chosen_once_it_is() -> None:
    app = AppTest.from_string(SCRIPT, default_timeout=30).run()
    assert not app.exception, app.exception
    # The first version that serves stands in: Predict is not left disabled.
    assert app.session_state["chosen"] == ["sketch@1"]
    assert app.checkbox(key="sketch_sketch@3_unavailable").disabled
    app.session_state["trained"] = True
    app.run()
    # Once it serves, the stable version is checked in the same session, and the stand-in no more.
    assert app.session_state["chosen"] == ["sketch@3"]
    assert app.checkbox(key="sketch_sketch@3").value is True


def test_a_phone_photo_is_shown_upright_as_the_models_read_it() -> None:
    """A photo stored sideways with an EXIF orientation (6: rotate 90 degrees) is shown as the
    same photo stored upright: the preview and the result cards' thumbnails alike."""
    turned = upright((BAD_UPLOADS / "parrot_exif6_malformed_gps.jpg").read_bytes(), 128)
    straight = upright((BAD_UPLOADS / "parrot_upright.jpg").read_bytes(), 128)
    assert turned.size == straight.size and turned.height > turned.width
    difference = np.abs(np.asarray(turned, np.float32) - np.asarray(straight, np.float32)).mean()
    assert difference < 10, difference


CARD = """
import time
import streamlit as st
from ui.client import Api
from ui.results import result_card

st.session_state["models"] = []
st.session_state["models_at"] = time.monotonic()
for status in ("queued", "expired", "pending", "cancelled"):
    result_card(Api("http://127.0.0.1:9"), {
        "id": status, "model": "sketch", "version": 3, "status": status, "label": None, "score": None,
        "top_k": [], "error": None,
    }, None)
"""


def test_a_card_without_an_answer_yet_does_not_ask_to_send_the_picture_again() -> None:
    """A queued answer is on its way (sending again would queue the picture twice); an expired
    one is worth another try; a batch's picture waiting its turn, or cancelled with its batch, is
    said so, never as a failure."""
    app = AppTest.from_string(CARD, default_timeout=30).run()
    assert not app.exception, app.exception
    assert [i.value for i in app.info] == [
        "This model has not answered yet: its answer appears in History once a worker takes the picture.",
        "This picture is waiting its turn in its batch (batches go a few pictures at a time): "
        "its answer appears in History once the batch reaches it.",
        "This model did not answer: its batch was cancelled before this picture's turn came.",
    ]
    assert [w.value for w in app.warning] == ["This model took too long. Please try again."]


def test_every_status_but_done_has_words() -> None:
    """What History lists beside a model's name for an answer it has not given."""
    assert set(STATUS_WORDS) == set(PredictionStatus) - {PredictionStatus.done}
    assert STATUS_WORDS[PredictionStatus.pending] == "waiting its turn in its batch"
    assert STATUS_WORDS[PredictionStatus.cancelled] == "cancelled with its batch"


def test_a_sliver_of_a_picture_is_shown_on_a_band_not_stretched() -> None:
    """1×5000 and 20000×3 pictures are shown at most 4 times longer than wide, the picture centred
    on a plain band; an ordinary photo is shown as it is."""
    import io

    from PIL import Image

    def png(size: tuple[int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("L", size, 0).save(buf, "PNG")
        return buf.getvalue()

    assert upright(png((1, 5000)), 800).size == (200, 800)
    wide = upright(png((20000, 3)), 800)
    assert wide.size == (800, 200) and wide.getpixel((0, 0)) != (0, 0, 0)
    assert [y for y in range(200) if wide.getpixel((400, y)) == (0, 0, 0)] == [99]  # the picture, centred
    assert upright(png((300, 200)), 800).size == (300, 200)


def test_an_incomplete_verdict_met_by_an_ended_session_says_it_was_not_sent() -> None:
    """ "Wrong" without the right label, sent as the session ends, cannot be kept for the next
    login: the login page says it was not sent and why, instead of dropping it without a word."""
    script = (
        "import streamlit as st\nfrom ui.results import verdict_being_sent\n"
        "st.session_state['fb_abc_send'] = True\nst.session_state['fb_abc_verdict'] = 'Wrong'\n"
        "carried = verdict_being_sent()\nst.text(carried.note if carried else 'nothing')\n"
    )
    app = AppTest.from_string(script, default_timeout=30).run()
    assert not app.exception
    assert app.text[0].value == "Your verdict was not sent: choose the right label, or “None of these”."


CATALOG = """
import time
import streamlit as st
from ui.client import Api
from ui.results import choose_models

def model(ref, channel):
    name, version = ref.split("@")
    return {
        "name": name, "version": int(version), "ref": ref, "display_name": f"Sketch {version}", "channel": channel,
        "description": "", "runtime": "tensorflow", "precision": "fp32",
        "input": {"height": 28, "width": 28, "mode": "L"}, "num_classes": 2, "labels": ["cat", "fish"],
        "available": ref not in down, "reason": "no worker" if ref in down else None,
        "workers": 0 if ref in down else 1, "random_weights": False, "default": False,
    }

# The catalog as the registry lists it now (a catalog read again: past CATALOG_SECONDS).
down = st.session_state.get("down", ())
st.session_state["models"] = [model(ref, channel) for ref, channel in st.session_state["channels"].items()]
st.session_state["models_at"] = time.monotonic()
st.session_state["chosen"] = choose_models(Api("http://127.0.0.1:9"), "sketch", mode="L")
"""

BEFORE = {"sketch@1": "canary", "sketch@3": "stable", "sketch@4": "canary"}
PROMOTED = {"sketch@1": "canary", "sketch@3": "canary", "sketch@4": "stable"}


def catalog_page(channels: dict[str, str]) -> AppTest:
    app = AppTest.from_string(CATALOG, default_timeout=30)
    app.session_state["channels"] = channels
    return app.run()


def ticks(app: AppTest) -> dict[str, bool]:
    return {str(box.key).removeprefix("sketch_"): box.value for box in app.checkbox}


def test_the_ticks_follow_a_promotion_and_a_rollback_while_the_person_has_not_chosen() -> None:
    app = catalog_page(BEFORE)
    assert not app.exception, app.exception
    assert app.session_state["chosen"] == ["sketch@3"]
    app.session_state["channels"] = PROMOTED
    app.run()
    assert not app.exception, app.exception
    assert ticks(app) == {"sketch@1": False, "sketch@3": False, "sketch@4": True}
    assert app.session_state["chosen"] == ["sketch@4"]
    app.session_state["channels"] = BEFORE  # rolled back
    app.run()
    assert ticks(app) == {"sketch@1": False, "sketch@3": True, "sketch@4": False}
    assert app.session_state["chosen"] == ["sketch@3"] and not app.info


def test_a_choice_made_by_hand_stays_and_a_version_retired_gives_way_to_the_stable_one() -> None:
    app = catalog_page(BEFORE)
    app.checkbox(key="sketch_sketch@1").check()
    app.checkbox(key="sketch_sketch@3").uncheck().run()
    assert app.session_state["chosen"] == ["sketch@1"]
    app.run()  # rerun with nothing touched
    assert app.session_state["chosen"] == ["sketch@1"]
    # A promotion leaves a version chosen by hand chosen while it is still offered.
    app.session_state["channels"] = PROMOTED
    app.run()
    assert ticks(app) == {"sketch@1": True, "sketch@3": False, "sketch@4": False}
    assert not app.info
    # Retired: the catalog lists it no more. Its model's stable version takes its place, said once.
    app.session_state["channels"] = {"sketch@3": "canary", "sketch@4": "stable"}
    app.run()
    assert not app.exception, app.exception
    assert ticks(app) == {"sketch@3": False, "sketch@4": True}
    assert app.session_state["chosen"] == ["sketch@4"]
    assert [i.value for i in app.info] == ["sketch@1 is no longer offered: Sketch 4 is chosen in its place."]
    app.run()
    assert [i.value for i in app.info] == ["sketch@1 is no longer offered: Sketch 4 is chosen in its place."]
    # Offered again: the note is no longer true and goes; the choice stays the one made since.
    app.session_state["channels"] = PROMOTED
    app.run()
    assert not app.info
    assert ticks(app) == {"sketch@1": False, "sketch@3": False, "sketch@4": True}
    # The new choice is the person's: it stays as the registry changes again, and the note goes
    # once they change a box.
    app.session_state["channels"] = {"sketch@3": "stable", "sketch@4": "canary"}
    app.checkbox(key="sketch_sketch@3").check().run()
    assert ticks(app) == {"sketch@3": True, "sketch@4": True} and not app.info


def test_a_stable_version_taking_a_retired_ones_place_while_it_cannot_serve_is_said_so() -> None:
    app = catalog_page(BEFORE)
    app.checkbox(key="sketch_sketch@3").uncheck()
    app.checkbox(key="sketch_sketch@1").check().run()
    app.session_state["channels"] = {"sketch@3": "stable", "sketch@4": "canary"}
    app.session_state["down"] = {"sketch@3"}
    app.run()
    assert not app.exception, app.exception
    assert [i.value for i in app.info] == [
        "sketch@1 is no longer offered: Sketch 3 is chosen in its place (not available right now)."
    ]
    assert app.session_state["chosen"] == []


def test_why_a_version_cannot_be_chosen_is_said_under_the_boxes_not_only_behind_a_question_mark() -> None:
    app = AppTest.from_string(SCRIPT, default_timeout=30).run()
    assert not app.exception, app.exception
    assert [c.value for c in app.caption] == ["Not available right now:\n- sketch@3: not trained yet."]
    app.session_state["down"] = True
    app.run()
    assert [c.value for c in app.caption] == [
        "Not available right now:\n- sketch@2, sketch@3; the portal says of each: not trained yet."
    ]
    app.session_state["down"] = False
    app.session_state["trained"] = True
    app.run()
    assert not app.caption  # every version can be chosen: nothing to say
