"""The Streamlit app's pages, driven by AppTest against the real API in a subprocess."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
import signal
import time
import uuid
import zipfile
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
from jose import jwt
from streamlit.proto.WidgetStates_pb2 import WidgetState
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.element_tree import Selectbox

from api.app.core.config import Settings
from contracts.api_keys import Scope
from tests.conftest import PASSWORD
from tests.images import encode, png_bomb, split_colour
from tests.support import PHOTOS, ROOT, Service, start_explainer
from ui.client import EXPLANATION_MESSAGES, STILL_QUEUED, Api, Batch, User
from ui.config import get_ui_settings
from ui.results import MODELS_WAIT_SECONDS, plain
from ui.session import CATALOG_RETRY_SECONDS, CATALOG_SECONDS
from ui.views.admin import VERSION_ACTIONS

APP = str(ROOT / "ui" / "app.py")


@pytest.fixture(scope="module")
def api_url(portal: tuple[str, str, str]) -> Iterator[str]:
    url = portal[0]
    previous = os.environ.get("API_URL")
    os.environ["API_URL"] = url
    get_ui_settings.cache_clear()
    yield url
    if previous is None:
        os.environ.pop("API_URL", None)
    else:
        os.environ["API_URL"] = previous
    get_ui_settings.cache_clear()


def signed_in(api_url: str, email: str, password: str) -> AppTest:
    token = httpx.post(f"{api_url}/v1/auth/login", data={"username": email, "password": password}).json()[
        "access_token"
    ]
    me = httpx.get(f"{api_url}/v1/users/me", headers={"Authorization": f"Bearer {token}"}).json()
    at = AppTest.from_file(APP, default_timeout=90)
    at.session_state["token"] = token
    at.session_state["user"] = me
    return at


def new_user(api_url: str, portal: tuple[str, str, str]) -> tuple[str, str]:
    import uuid

    _, email, password = portal
    admin = httpx.post(f"{api_url}/v1/auth/login", data={"username": email, "password": password}).json()[
        "access_token"
    ]
    user_email = f"ui-{uuid.uuid4().hex[:8]}@example.com"
    r = httpx.post(
        f"{api_url}/v1/users",
        json={"email": user_email, "password": "a-good-password"},
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert r.status_code == 201
    return user_email, "a-good-password"


def test_only_the_login_page_without_a_token(api_url: str) -> None:
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert at.title[0].value == "Image classification portal"
    assert "page_titles" not in at.session_state


def test_login_failure_and_success(api_url: str, portal: tuple[str, str, str]) -> None:
    at = AppTest.from_file(APP, default_timeout=30).run()
    at.button[0].click().run()  # nothing typed: said in words, not as the API's "Field required"
    assert [e.value for e in at.error] == ["Enter your email and password."]
    at.text_input(key="login_email").input(portal[1])
    at.text_input(key="login_password").input("wrong-password")
    at.button[0].click().run()
    assert [e.value for e in at.error] == ["Wrong email or password."]
    assert "token" not in at.session_state

    at.text_input(key="login_password").input(portal[2])
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert at.session_state["token"] and at.session_state["user"]["role"] == "admin"
    assert at.session_state["page_titles"] == ["Classify", "Sketch", "Batch", "History", "API keys", "Admin"]


def test_admin_page_only_for_admins(api_url: str, portal: tuple[str, str, str]) -> None:
    at = signed_in(api_url, *new_user(api_url, portal)).run()
    assert at.session_state["page_titles"] == ["Classify", "Sketch", "Batch", "History", "API keys"]


def test_classify_and_feedback(api_url: str, portal: tuple[str, str, str]) -> None:
    email, password = new_user(api_url, portal)
    at = signed_in(api_url, email, password)
    at.session_state["upload"] = ("parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())
    at.run()
    assert not at.exception
    models = {c.key: c for c in at.checkbox}
    assert models["classify_mobilenet_v2@1"].value is True
    assert models["classify_resnet50@1_unavailable"].disabled  # shown, but unavailable with its reason
    assert not [key for key in models if "sketch" in str(key)], "drawing models are offered on the Sketch page only"
    at.checkbox(key="classify_birds@1").check()
    at.button(key="classify_submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    job = at.session_state["classify_job"]
    assert job["status"] == "done" and [r["model"] for r in job["results"]] == ["mobilenet_v2", "birds"]
    # Each card names the model as people read it and its answer in words, all five with percentages.
    shown = [m.value for m in at.markdown]
    assert "**MobileNetV2**" in shown and "**Bird species (iNaturalist)**" in shown, shown
    assert "### macaw" in shown and "### Ara macao (Scarlet Macaw)" in shown, shown
    bars = [bar.proto.text for bar in at.get("progress")]
    assert len(bars) == 10 and re.fullmatch(r"macaw · \d+\.\d%", bars[0]), bars
    assert not [bar for bar in bars if "_" in bar], bars  # labels in words
    # A static table, which wraps on a phone; its cells are Markdown, so names are escaped.
    table = next(t.value for t in at.table if "Agrees" in t.value.columns)
    assert list(table["Model"]) == [plain("MobileNetV2"), plain("Bird species (iNaturalist)")]
    assert re.fullmatch(r"\d+\.\d %", table["Confidence"].iloc[0]), table
    # "Why?" is off until asked, and not offered for a model without a Keras graph (TFLite).
    birds = job["results"][1]["id"]
    assert f"why-{birds}" not in [t.key for t in at.toggle]
    # No explainer runs here: the API's 503 is said as what it means for a heatmap.
    mobilenet = job["results"][0]["id"]
    at.toggle(key=f"why-{mobilenet}").set_value(True).run()
    assert not at.exception and EXPLANATION_MESSAGES[503] in [c.value for c in at.caption], [
        c.value for c in at.caption
    ]
    at.toggle(key=f"why-{mobilenet}").set_value(False).run()

    prediction = job["results"][0]["id"]
    submit = next(b for b in at.button if b.proto.form_id == f"fb_{prediction}")
    # No verdict is preselected, and "wrong" needs a label other than the prediction.
    assert at.radio(key=f"fb_{prediction}_verdict").value is None
    assert "macaw" not in at.selectbox(key=f"fb_{prediction}_label").options
    submit.click().run()
    assert any("Choose Correct or Wrong" in e.value for e in at.error)
    at.radio(key=f"fb_{prediction}_verdict").set_value("Wrong")
    next(b for b in at.button if b.proto.form_id == f"fb_{prediction}").click().run()
    assert any("Choose the right label" in e.value for e in at.error)
    at.radio(key=f"fb_{prediction}_verdict").set_value("Wrong")
    at.selectbox(key=f"fb_{prediction}_label").set_value("lorikeet")
    at.text_area(key=f"fb_{prediction}_comment").input("it is a lorikeet")
    submit = next(b for b in at.button if b.proto.form_id == f"fb_{prediction}")
    submit.click().run()
    assert any("feedback was recorded" in s.value for s in at.success)
    token = at.session_state["token"]
    rows = httpx.get(f"{api_url}/v1/feedback", headers={"Authorization": f"Bearer {token}"}).json()["data"]
    assert rows[0]["prediction_id"] == prediction and rows[0]["correct_label"] == "lorikeet"


def verdict_kept_at_the_login_page(
    api_url: str, email: str, password: str, *, renewal: bool, page_call: bool = False
) -> tuple[AppTest, str]:
    """The app after a verdict was sent as the session ended (revoked elsewhere; found by the
    sending, with ``renewal`` by the renewal before the page, with ``page_call`` by the page's own
    first call, here the catalogue's refresh, before the form is drawn: History reads the
    pictures first), on the login page that says it is kept; and the prediction it is about."""
    at = signed_in(api_url, email, password)
    at.session_state["upload"] = ("parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())
    at.run()
    at.button(key="classify_submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    prediction = at.session_state["classify_job"]["results"][0]["id"]
    httpx.post(f"{api_url}/v1/auth/logout", headers={"Authorization": f"Bearer {at.session_state['token']}"})
    if renewal:
        at.session_state["token_renew_at"] = 0.0
    if page_call:
        at.session_state["models_at"] = 0.0
    at.radio(key=f"fb_{prediction}_verdict").set_value("Wrong")
    at.selectbox(key=f"fb_{prediction}_label").set_value("lorikeet")
    at.text_area(key=f"fb_{prediction}_comment").input("sent after the login")
    next(b for b in at.button if b.proto.form_id == f"fb_{prediction}").click().run()
    assert not at.exception and "token" not in at.session_state
    assert any("Your verdict is kept" in w.value for w in at.warning), [w.value for w in at.warning]
    return at, prediction


def logged_in_afresh(email: str, password: str) -> AppTest:
    """A page loaded afresh (a reload: a new connection, nothing of an earlier one's state), and
    the person logged in on it."""
    at = AppTest.from_file(APP, default_timeout=90).run()
    at.text_input(key="login_email").input(email)
    at.text_input(key="login_password").input(password)
    next(b for b in at.button if b.proto.form_id == "login").click().run()
    assert not at.exception and "token" in at.session_state
    return at


def test_a_kept_verdict_survives_a_reload_and_only_its_author_sends_it(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    """The login page that says a verdict is kept is reloaded: another person's login there
    neither sends it nor drops it, its author's login sends it, once."""
    email, password = new_user(api_url, portal)
    verdict_kept_at_the_login_page(api_url, email, password, renewal=False)
    other = logged_in_afresh(*new_user(api_url, portal))
    assert not other.sidebar.success and not other.sidebar.error, [s.value for s in other.sidebar.error]
    mine = logged_in_afresh(email, password)
    assert [s.value for s in mine.sidebar.success] == [
        "Your verdict on MobileNetV2 was sent: wrong (it is lorikeet), and wrote “sent after the login”."
    ]
    token = mine.session_state["token"]
    rows = httpx.get(f"{api_url}/v1/feedback", headers={"Authorization": f"Bearer {token}"}).json()["data"]
    assert [(r["correct_label"], r["comment"]) for r in rows] == [("lorikeet", "sent after the login")], rows
    again = logged_in_afresh(email, password)
    assert not again.sidebar.success and not again.sidebar.error


@pytest.mark.parametrize(
    "found_ended", ["by the sending", "by the renewal before the page", "by the page's first call"]
)
def test_a_verdict_sent_as_the_session_ends_is_sent_after_the_next_login(
    api_url: str, portal: tuple[str, str, str], found_ended: str
) -> None:
    """The session was revoked (or expired) while a verdict was being filled in: its sending lands
    on the login page, which says the verdict is kept; logging in again as the same person sends
    it and says so. Another person's login would drop it. The end is found by the sending itself,
    or (a token past half its lifetime, as an expired one always is) by the renewal that runs
    before the page is drawn."""
    email, password = new_user(api_url, portal)
    at, prediction = verdict_kept_at_the_login_page(
        api_url,
        email,
        password,
        renewal=found_ended == "by the renewal before the page",
        page_call=found_ended == "by the page's first call",
    )
    at.text_input(key="login_email").input(email)
    at.text_input(key="login_password").input(password)
    next(b for b in at.button if b.proto.form_id == "login").click().run()
    assert not at.exception and "token" in at.session_state
    sent = "Your verdict on MobileNetV2 was sent: wrong (it is lorikeet), and wrote “sent after the login”."
    assert any(s.value == sent for s in at.sidebar.success), [s.value for s in at.sidebar.success]
    token = at.session_state["token"]
    rows = httpx.get(f"{api_url}/v1/feedback", headers={"Authorization": f"Bearer {token}"}).json()["data"]
    assert [(r["prediction_id"], r["correct_label"], r["comment"]) for r in rows] == [
        (prediction, "lorikeet", "sent after the login")
    ], rows


def test_a_version_the_catalog_no_longer_lists_still_offers_its_labels(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    """A card of a version retired since (the catalog lists it no more) offers its labels as the
    API keeps them, so a verdict on it can still name the right one, and is named as people
    read it, not by its code."""
    api = Api(api_url)
    api.login(*new_user(api_url, portal))
    script = (
        "import time\nimport streamlit as st\nfrom ui.client import Api\nfrom ui.results import _labels_of\n"
        "from ui.session import display_name\n"
        "st.session_state['models'] = []\nst.session_state['models_at'] = time.monotonic()\n"
        f"api = Api({api_url!r}, {api.token!r})\n"
        "st.session_state['labels'] = _labels_of(api, 'mobilenet_v2@1')\n"
        "st.session_state['name'] = display_name(api, 'mobilenet_v2@1')\n"
        "st.session_state['unknown'] = display_name(api, 'mobilenet_v2@99')\n"
    )
    app = AppTest.from_string(script, default_timeout=60).run()
    assert not app.exception, app.exception
    labels = app.session_state["labels"]
    assert len(labels) == 1000 and "macaw" in labels
    assert app.session_state["name"] == "MobileNetV2" and app.session_state["unknown"] == "mobilenet_v2@99"


def test_a_classify_refused_then_tried_again_stores_the_picture_once(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    """The models refuse the job (no worker serves resnet50@1 here: 503); trying again asks with
    the picture already stored rather than storing it once more. Deleted meanwhile, it is stored
    again."""
    api = Api(api_url)
    api.login(*new_user(api_url, portal))
    script = (
        "from pathlib import Path\nfrom ui.client import Api\nfrom ui.results import run_job\n"
        f"run_job(Api({api_url!r}, {api.token!r}), 'job', 'owl.jpg', Path({str(PHOTOS / 'owl.jpg')!r}).read_bytes(), "
        "['resnet50@1'])\n"
    )
    app = AppTest.from_string(script, default_timeout=60)
    for _ in range(3):
        app.run()
        assert not app.exception and app.error, app.exception
    images = api.json("GET", "/v1/images", params={"total": True})
    assert images["count"] == 1, images
    api.json("DELETE", f"/v1/images/{images['data'][0]['id']}")
    app.run()
    assert not app.exception and app.error, app.exception
    assert api.json("GET", "/v1/images", params={"total": True})["count"] == 1


def test_revoked_token_goes_back_to_login(api_url: str, portal: tuple[str, str, str]) -> None:
    at = signed_in(api_url, *new_user(api_url, portal))
    httpx.post(f"{api_url}/v1/auth/logout", headers={"Authorization": f"Bearer {at.session_state['token']}"})
    at.session_state["upload"] = ("parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())
    at.run()
    assert not at.exception
    assert "token" not in at.session_state
    assert any("log in again" in w.value for w in at.warning)


def test_history_sketch_and_admin_pages_render(api_url: str, portal: tuple[str, str, str]) -> None:
    at = signed_in(api_url, portal[1], portal[2]).run()
    token = at.session_state["token"]
    for module in ("history", "admin", "sketch"):
        script = (
            f"from ui.client import Api\nfrom ui.views.{module} import {module}_page\n"
            f"{module}_page(Api({api_url!r}, {token!r}))\n"
        )
        app = AppTest.from_string(script, default_timeout=60).run()
        assert not app.exception, (module, app.exception)
        assert not app.error, (module, [e.value for e in app.error])
        if module == "admin":
            # Tables read as words: no snake_case headers, times without microseconds.
            headers = [str(c) for d in app.dataframe for c in d.value.columns]
            assert {"Model version", "Worker processes serving it", "Email", "Created"} <= set(headers), headers
            assert not [h for h in headers if h in ("live_workers", "is_active", "created_at", "p50_ms")], headers
            users = next(d.value for d in app.dataframe if "Email" in d.value.columns)
            assert all(value.endswith(" UTC") and "." not in value for value in users["Created"]), users["Created"]
        if module == "sketch":
            # Drawing models only, the stable one checked; it names its 20 categories in words.
            offered = {c.key: c.value for c in app.checkbox}
            assert offered == {"sketch_sketch@1": False, "sketch_sketch@2": False, "sketch_sketch@3": True}, offered
            assert any("smiley face" in c.value for c in app.caption)


def picked_export(app: AppTest) -> str:
    """The label of the export the admin page's picker shows."""
    picker = app.selectbox(key="export_pick")
    return picker.options[picker.index or 0]


def wait_for_export(api: Api, export_id: str) -> None:
    deadline = time.monotonic() + 60
    while api.export(export_id)["status"] != "done":
        assert time.monotonic() < deadline, api.export(export_id)
        time.sleep(0.2)


def test_admins_start_an_export_follow_it_and_download_it(api_url: str, portal: tuple[str, str, str]) -> None:
    api = Api(api_url)
    api.login(portal[1], portal[2])
    earlier = api.start_export(None)["id"]
    wait_for_export(api, earlier)
    app = admin_app(api_url, portal)
    assert earlier[:8] in picked_export(app)

    # The picker moves from the export it showed to the one just started.
    app.selectbox(key="export_model").set_value("sketch").run()
    app.button(key="export_start").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    export_id = app.session_state["export_chosen"]
    assert export_id != earlier and export_id[:8] in picked_export(app)
    assert api.export(export_id)["model"] == "sketch"
    wait_for_export(api, export_id)

    app.run()
    shown = next(d.value for d in app.dataframe if "Progress" in d.value.columns)
    assert shown["Status"].iloc[0] == "done" and shown["Model"].iloc[0] == "sketch", shown
    assert picked_export(app).endswith(f"(done) · {export_id[:8]}")
    app.button(key="export_prepare").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    shown_id, name, data = app.session_state["export_zip"]
    assert shown_id == export_id and name.startswith("feedback-sketch-") and name.endswith(".zip")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert "feedback.csv" in archive.namelist()


def test_history_shows_each_upload_with_its_answers_in_three_calls(api_url: str, portal: tuple[str, str, str]) -> None:
    email, password = new_user(api_url, portal)
    api = Api(api_url)
    api.login(email, password)
    parrot = api.upload("parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())
    job = api.wait(api.predict(parrot["id"], ["mobilenet_v2@1"]))
    api.feedback(job["results"][0]["id"], False, "lorikeet", None)
    api.upload("unclassified.png", encode(split_colour(), "PNG"))
    script = (
        "import streamlit as st\nfrom ui.client import Api\nfrom ui.views.history import history_page\n"
        "class Counted(Api):\n"
        "    def _request(self, method, path, **kwargs):\n"
        "        st.session_state.setdefault('calls', []).append(f'{method} {path}')\n"
        "        return super()._request(method, path, **kwargs)\n"
        f"history_page(Counted({api_url!r}, {api.token!r}))\n"
    )
    app = AppTest.from_string(script, default_timeout=60).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    # (and the model catalog, once a session, for the models' display names)
    assert app.session_state["calls"] == [
        "GET /v1/images",
        "GET /v1/batches",
        "GET /v1/predictions",
        "GET /v1/feedback",
        "GET /v1/models",
    ]
    assert len(app.get("image")) == 2
    lines = [m.value for m in app.markdown]
    # File names as typed, not as Markdown.
    assert any(line.startswith("**unclassified\\.png** ·") for line in lines), lines
    assert any(line.startswith("**parrot\\.jpg** ·") for line in lines)
    assert any(
        line.startswith("MobileNetV2: macaw (") and "you said it was wrong, it is lorikeet" in line for line in lines
    )


def test_why_shows_the_heatmap_beside_the_picture(api_url: str, portal: tuple[str, str, str], redis_url: str) -> None:
    explainer = start_explainer(f"ui-{uuid.uuid4().hex[:6]}", redis_url, EXPLAIN_MODELS="mobilenet_v2@1")
    try:
        at = signed_in(api_url, *new_user(api_url, portal))
        at.session_state["upload"] = ("parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())
        at.run()
        at.button(key="classify_submit").click().run()
        result = at.session_state["classify_job"]["results"][0]
        images = len(at.get("image"))
        at.toggle(key=f"why-{result['id']}").set_value(True).run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        # The picture and its heatmap, side by side, under a caption naming the answer.
        assert len(at.get("image")) == images + 2, at.get("image")
        assert any(f"What drove “{result['label']}”" in str(i.proto) for i in at.get("image")), at.get("image")
    finally:
        explainer.stop()


def admin_app(api_url: str, portal: tuple[str, str, str]) -> AppTest:
    at = signed_in(api_url, portal[1], portal[2]).run()
    script = (
        "from ui.client import Api\nfrom ui.views.admin import admin_page\n"
        f"admin_page(Api({api_url!r}, {at.session_state['token']!r}))\n"
    )
    return AppTest.from_string(script, default_timeout=60).run()


def models_table(app: AppTest) -> Any:
    return next(d.value for d in app.dataframe if "traffic share" in d.value.columns)


def test_the_models_tab_shows_versions_compares_and_changes_them(api_url: str, portal: tuple[str, str, str]) -> None:
    app = admin_app(api_url, portal)
    assert not app.exception and not app.error, [e.value for e in app.error]
    table = models_table(app)
    served = {
        (m["name"], m["version"]): m["workers"]
        for m in httpx.get(
            f"{api_url}/v1/models",
            headers={"Authorization": f"Bearer {Api(api_url).login(portal[1], portal[2])['token']}"},
        ).json()["data"]
    }
    rows = {(r["model"], r["version"]): r for r in table.to_dict("records")}
    assert served.items() <= {key: r["workers"] for key, r in rows.items()}.items()
    sketch = rows[("sketch", 3)]
    assert sketch["channel"] == "stable" and sketch["traffic share"] == "100.0%" and float(sketch["memory (MiB)"]) > 0
    assert sketch["held-out accuracy"].endswith("%")

    # sketch@2 against the stable sketch@3: the table, the chart of the accuracies both have, the verdict.
    app.selectbox(key="registry_model").set_value("sketch").run()
    app.selectbox(key="compare_candidate_sketch").set_value(2).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    comparison = next(d.value for d in app.dataframe if "" in d.value.columns)
    assert comparison[""].iloc[0] == "held-out accuracy" and list(comparison.columns)[1:] == [
        "@2 (canary)",
        "@3 (stable)",
    ]
    assert app.get("vega_lite_chart"), "no accuracy chart"
    assert any("held-out accuracy: " in c.value for c in app.caption)

    # A change through the forms is made, audited with its reason, and shown; an impossible one explains itself.
    app.selectbox(key="change_version_sketch").set_value(2)
    app.selectbox(key="change_action_sketch").set_value(
        next(a for a in VERSION_ACTIONS if a.startswith("Put in shadow"))
    )
    app.text_input(key="change_reason_sketch").input("mirror before a canary")
    next(b for b in app.button if b.proto.form_id == "version_sketch").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    rows = {(r["model"], r["version"]): r for r in models_table(app).to_dict("records")}
    assert rows[("sketch", 2)]["channel"] == "shadow"
    app.selectbox(key="change_version_sketch").set_value(2)
    app.selectbox(key="change_action_sketch").set_value(
        next(a for a in VERSION_ACTIONS if a.startswith("Make a canary"))
    )
    app.text_input(key="change_reason_sketch").input("back as it was")
    next(b for b in app.button if b.proto.form_id == "version_sketch").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]

    token = Api(api_url).login(portal[1], portal[2])["token"]
    changes = httpx.get(
        f"{api_url}/v1/admin/registry/changes",
        params={"model": "sketch"},
        headers={"Authorization": f"Bearer {token}"},
    ).json()["data"]
    assert [(c["action"], c["reason"]) for c in changes[:2]] == [
        ("channel_canary", "back as it was"),
        ("channel_shadow", "mirror before a canary"),
    ]
    app.text_input(key="promote_reason_sketch").input("undo")
    next(b for b in app.button if b.proto.form_id == "promote_sketch" and "Roll back" in b.label).click().run()
    assert any("no promotion" in e.value.lower() or "roll back" in e.value.lower() for e in app.error), [
        e.value for e in app.error
    ]


def emptied_in_the_browser(app: AppTest, key: str) -> bool:
    """Whether the text field ``key`` is empty and the page told the browser so (``set_value``):
    a browser keeps what it holds in a field unless told, and sends it back with the next submit."""
    field = app.text_input(key=key)
    return field.value == "" and bool(field.proto.set_value)


def test_a_registry_change_says_what_changed_and_empties_its_reason(api_url: str, portal: tuple[str, str, str]) -> None:
    """The next change is not audited with the last one's reason; a refused change keeps it."""
    admin = Api(api_url)
    admin.login(portal[1], portal[2])
    app = admin_app(api_url, portal)
    app.selectbox(key="registry_model").set_value("sketch").run()
    weights = {
        v["version"]: v["weight"]
        for v in admin.serving()
        if v["name"] == "sketch" and v["enabled"] and v["channel"] in ("stable", "canary")
    }
    assert 2 in weights, weights
    app.text_input(key="weights_reason_sketch").input("the same split")
    next(b for b in app.button if b.proto.form_id == "weights_sketch").click().run()
    assert app.error and not app.success  # refused: nothing would change
    assert app.text_input(key="weights_reason_sketch").value == "the same split"
    # sketch@2 knows 6 of the stable version's 20 classes: traffic to it is refused unless forced.
    app.number_input(key=f"weight_sketch_2_{weights[2]}").set_value(weights[2] + 5)
    app.text_input(key="weights_reason_sketch").input("try sketch@2")
    next(b for b in app.button if b.proto.form_id == "weights_sketch").click().run()
    assert [e.value for e in app.error] and "knows 6 classes" in app.error[0].value and not app.success
    for before, after in ((weights[2], weights[2] + 5), (weights[2] + 5, weights[2])):  # and back as it was
        app.number_input(key=f"weight_sketch_2_{before}").set_value(after)
        app.text_input(key="weights_reason_sketch").input(f"sketch@2 to {after}")
        app.checkbox(key="weights_force_sketch").check()
        next(b for b in app.button if b.proto.form_id == "weights_sketch").click().run()
        assert not app.exception and not app.error, [e.value for e in app.error]
        assert [s.value for s in app.success] == [f"Weights of sketch saved: @2 {before} → {after}."]
        assert emptied_in_the_browser(app, "weights_reason_sketch")

    for action, said in (
        ("Put in shadow", "moved to the shadow channel"),
        ("Make a canary", "moved to the canary channel"),
    ):
        app.selectbox(key="change_version_sketch").set_value(2)
        app.selectbox(key="change_action_sketch").set_value(next(a for a in VERSION_ACTIONS if a.startswith(action)))
        app.text_input(key="change_reason_sketch").input(f"{action.lower()} for a test")
        next(b for b in app.button if b.proto.form_id == "version_sketch").click().run()
        assert not app.exception and not app.error, [e.value for e in app.error]
        assert [s.value for s in app.success] == [f"sketch@2 {said}."]
        assert emptied_in_the_browser(app, "change_reason_sketch")

    app.text_input(key="promote_reason_sketch").input("undo")
    next(b for b in app.button if b.proto.form_id == "promote_sketch" and "Roll back" in b.label).click().run()
    assert app.error and not app.success, [e.value for e in app.error]
    assert app.text_input(key="promote_reason_sketch").value == "undo"


def test_a_version_the_portal_did_not_train_says_so_once(api_url: str, portal: tuple[str, str, str]) -> None:
    """mobilenet_v2@2 (quantized from @1, never trained here) has no training record, a 404 by
    design: the page gives the API's reason, not "no longer exists", and does not ask again on
    every rerun."""
    token = Api(api_url).login(portal[1], portal[2])["token"]
    path = "/v1/admin/registry/models/mobilenet_v2/versions/2/training"
    answer = httpx.get(f"{api_url}{path}", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 404
    script = (
        "import streamlit as st\nfrom ui.client import Api\nfrom ui.views.admin import admin_page\n"
        "class Counted(Api):\n"
        "    def _request(self, method, path, **kwargs):\n"
        "        st.session_state.setdefault('calls', []).append(f'{method} {path}')\n"
        "        return super()._request(method, path, **kwargs)\n"
        f"admin_page(Counted({api_url!r}, {token!r}))\n"
    )
    app = AppTest.from_string(script, default_timeout=60).run()
    app.selectbox(key="registry_model").set_value("mobilenet_v2").run()
    app.selectbox(key="record_version_mobilenet_v2").set_value(2).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    captions = [c.value for c in app.caption]
    assert answer.json()["detail"] in captions and "That item no longer exists." not in captions, captions
    assert answer.json()["detail"].startswith("No training record for mobilenet_v2@2: ")
    app.run()
    assert answer.json()["detail"] in [c.value for c in app.caption]
    assert app.session_state["calls"].count(f"GET {path}") == 1, app.session_state["calls"]


def test_the_training_tab_starts_follows_and_cancels_a_run(api_url: str, portal: tuple[str, str, str]) -> None:
    app = admin_app(api_url, portal)
    app.selectbox(key="train_model").set_value("sketch")
    app.number_input(key="train_epochs").set_value(3)
    app.number_input(key="train_per_category").set_value(200)
    app.text_input(key="train_reason").input("more drawings")
    next(b for b in app.button if b.proto.form_id == "start_training").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    table = next(d.value for d in app.dataframe if "epoch" in d.value.columns)
    latest = table.to_dict("records")[0]
    assert [s.value for s in app.success] == [f"Run queued: {latest['version']}."]
    assert app.text_input(key="train_reason").value == ""
    assert latest["status"] == "queued" and latest["epoch"] == "0 of 3" and latest["by"] == portal[1]
    admin = Api(api_url)
    admin.login(portal[1], portal[2])
    assert admin.training_runs()[0]["options"]["per_category"] == 200
    picker = app.selectbox(key="train_pick")
    held = picker.options[picker.index or 0]  # the label the browser holds
    assert held == f"{latest['version']} (queued)"
    cancel = next(b for b in app.button if (b.key or "").startswith("cancel_"))
    cancel.click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    table = next(d.value for d in app.dataframe if "epoch" in d.value.columns)
    assert table.to_dict("records")[0]["status"] == "cancelled"
    # The browser shows the new label only when the page sets the selection again.
    picker = app.selectbox(key="train_pick")
    assert (picker.proto.raw_value if picker.proto.set_value else held) == f"{latest['version']} (cancelled)"
    assert "Cancelled: before it started." in [c.value for c in app.caption]


def _running_run_page(cancel_requested_at: str | None, cancel_fails: bool = False) -> None:
    from ui.client import ApiError
    from ui.views.admin import show_run

    class Unreachable:
        def cancel_training(self, run_id: str) -> None:
            raise ApiError(503, "The portal is not answering.")

    run = {
        "id": "7b0c5c5e-0000-4000-8000-000000000001",
        "status": "running",
        "options": {"epochs": 4},
        "epoch": 1,
        "eta_seconds": 30.0,
        "history": [{"epoch": 1, "loss": 1.0, "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.4}],
        "promotion": None,
        "record": None,
        "cancel_requested_at": cancel_requested_at,
    }
    show_run(Unreachable() if cancel_fails else None, run)  # type: ignore[arg-type]  # used only on Cancel


@pytest.mark.parametrize("asked", [None, "2026-12-03T22:00:00Z"])
def test_a_running_run_offers_cancel_until_a_cancel_was_asked_for(asked: str | None) -> None:
    app = AppTest.from_function(_running_run_page, kwargs={"cancel_requested_at": asked}).run()
    assert not app.exception, app.exception
    offered = any((b.key or "").startswith("cancel_") for b in app.button)
    said = any("Cancel requested" in c.value for c in app.caption)
    assert (offered, said) == ((True, False) if asked is None else (False, True))


def test_a_run_of_one_epoch_says_its_numbers_where_a_chart_would_be_empty() -> None:
    app = AppTest.from_function(_running_run_page, kwargs={"cancel_requested_at": None}).run()
    assert not app.exception, app.exception
    assert not app.get("vega_lite_chart")
    assert "Epoch 1: loss 1.000, validation loss 1.100, accuracy 50.0%, validation accuracy 40.0%" in [
        c.value for c in app.caption
    ]


def test_a_failed_cancel_stays_said_while_the_run_redraws_and_cancel_is_still_offered() -> None:
    app = AppTest.from_function(_running_run_page, kwargs={"cancel_requested_at": None, "cancel_fails": True}).run()
    next(b for b in app.button if (b.key or "").startswith("cancel_")).click().run()
    assert [e.value for e in app.error] == ["The portal is not answering."]
    app.run()  # the list's next redraw, with nothing clicked
    assert not app.exception, app.exception
    assert [e.value for e in app.error] == ["The portal is not answering."]
    assert any((b.key or "").startswith("cancel_") for b in app.button)


def _training_page() -> None:
    import time

    import streamlit as st

    from ui.views.admin import _empty_fields, training_tab

    class Runs:
        """The runs the test keeps in ``runs``, newest first; a run started goes on top, queued."""

        def training_runs(self, model: str | None = None) -> list[dict[str, object]]:
            return [dict(r) for r in st.session_state["runs"]]

        def start_training(self, model: str, options: dict[str, object], reason: str) -> dict[str, object]:
            latest = st.session_state["runs"][0]
            version = int(latest["version"]) + 1
            run = {**latest, "id": f"run-{version}", "version": version, "status": "queued", "epoch": 0}
            st.session_state["runs"] = [run, *st.session_state["runs"]]
            return run

    st.session_state["models"] = []  # no catalog: the form offers "sketch"
    st.session_state["models_at"] = time.monotonic()
    _empty_fields()
    training_tab(Runs())  # type: ignore[arg-type]  # the calls the tab makes


def training_run(version: int, status: str) -> dict[str, object]:
    epoch = {"queued": 0, "running": 2}.get(status, 5)
    return {
        "id": f"run-{version}",
        "model_name": "sketch",
        "version": version,
        "base_version": 3,
        "status": status,
        "options": {"epochs": 5},
        "epoch": epoch,
        "eta_seconds": 20.0 if status == "running" else None,
        "history": [],
        "record": None,
        "error": None,
        "promotion": None,
        "requested_by": "admin@example.com",
        "created_at": f"2026-12-0{version % 9 + 1}T10:00:00Z",
        "cancel_requested_at": None,
    }


class _BrowserPicker(Selectbox):
    """The run picker as a browser sends it back with every rerun: the label it holds, which is
    the one the page last set (or it was first drawn with), or the one the person picked, whether
    or not it is still offered."""

    held = ""

    @property
    def _widget_state(self) -> WidgetState:
        state = WidgetState()
        state.id = self.id
        state.string_value = self.held
        return state


def run_as_a_browser(app: AppTest, held: str) -> str:
    """``app`` run again with the run picker sending ``held``; the label the browser holds then."""
    picker = app.selectbox(key="train_pick")
    picker.__class__ = _BrowserPicker
    cast(_BrowserPicker, picker).held = held
    app.run()
    assert not app.exception, app.exception
    picker = app.selectbox(key="train_pick")
    return picker.proto.raw_value if picker.proto.set_value else held


def run_shown(app: AppTest) -> str:
    """The version whose run the page shows (its status line names it through its buttons)."""
    cancel = [str(b.key).removeprefix("cancel_run-") for b in app.button if str(b.key).startswith("cancel_")]
    said = [c.value for c in app.caption if c.value.startswith(("Done:", "Cancelled:", "Failed:"))]
    return f"{cancel} {said} {app.session_state['train_chosen']}"


def test_a_run_started_stays_picked_as_its_status_changes_and_so_does_one_picked_by_hand() -> None:
    app = AppTest.from_function(_training_page, default_timeout=30)
    app.session_state["runs"] = [training_run(12, "done"), training_run(11, "done")]
    app.run()
    assert not app.exception, app.exception
    picker = app.selectbox(key="train_pick")
    held = picker.proto.raw_value if picker.proto.set_value else picker.options[picker.proto.default]
    assert held == "sketch@12 (done)"

    app.number_input(key="train_epochs").set_value(5)
    app.text_input(key="train_reason").input("more drawings")
    next(b for b in app.button if b.proto.form_id == "start_training").click()
    held = run_as_a_browser(app, held)
    assert [s.value for s in app.success] == ["Run queued: sketch@13."]
    assert run_shown(app) == "['13'] [] run-13"
    # The new run starts: the page redraws itself, and the browser sends back what it holds.
    app.session_state["runs"] = [training_run(13, "running"), *app.session_state["runs"][1:]]
    held = run_as_a_browser(app, held)
    assert run_shown(app) == "['13'] [] run-13" and held == "sketch@13 (running)"
    assert any(p.proto.text.startswith("Running: epoch 2 of 5") for p in app.get("progress"))
    held = run_as_a_browser(app, held)  # a redraw with nothing changed
    assert run_shown(app) == "['13'] [] run-13"

    # Another run picked by hand stays picked while the running one moves on.
    held = run_as_a_browser(app, "sketch@12 (done)")
    assert run_shown(app) == "[] ['Done: epoch 5 of 5.'] run-12"
    app.session_state["runs"] = [{**training_run(13, "running"), "epoch": 3}, *app.session_state["runs"][1:]]
    held = run_as_a_browser(app, held)
    assert held == "sketch@12 (done)" and run_shown(app) == "[] ['Done: epoch 5 of 5.'] run-12"
    # And a run picked by hand stays picked as its own status changes, under its new label.
    held = run_as_a_browser(app, "sketch@13 (running)")
    assert run_shown(app) == "['13'] [] run-13"
    app.session_state["runs"] = [training_run(13, "done"), *app.session_state["runs"][1:]]
    held = run_as_a_browser(app, held)
    assert held == "sketch@13 (done)" and run_shown(app) == "[] ['Done: epoch 5 of 5.'] run-13"


def _drift_page() -> None:
    from ui.views.admin import drift_section

    def bins(*labels: str) -> list[dict[str, object]]:
        return [{"label": label, "reference": 0.2, "window": 0.2} for label in labels]

    signals = [
        {
            "signal": "aspect_ratio",
            "psi": 0.01,
            "status": "stable",
            "bins": bins("< 0.079", "0.079 to 0.337", "> 0.712"),
        },
        {"signal": "file_size", "psi": 0.3, "status": "drift", "bins": bins("< 9", "9 to 10", "10 to 80", "> 80")},
    ]

    class Drifted:
        def drift(self) -> dict[str, object]:
            version = {"model": "sketch", "version": 3, "signals": signals}
            sizes = {"reference_size": 500, "window_size": 500, "watch_threshold": 0.1, "alert_threshold": 0.25}
            return {**sizes, "versions": [version]}

    drift_section(Drifted())  # type: ignore[arg-type]


def drawn_order(chart: Any) -> list[str]:
    """The x-axis categories of a Vega-Lite chart in the order drawn: its explicit sort, the data's
    order for a null sort, ascending (Vega-Lite's default) without one."""
    from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

    x = json.loads(chart.proto.spec)["encoding"]["x"]
    seen = list(dict.fromkeys(convert_arrow_bytes_to_pandas_df(chart.proto.datasets[0].data.data)[x["field"]]))
    if "sort" not in x:
        return sorted(seen)
    return seen if x["sort"] is None else list(x["sort"])


def test_drift_bins_are_drawn_lowest_first_under_plain_names() -> None:
    app = AppTest.from_function(_drift_page).run()
    assert not app.exception, app.exception
    (table,) = [d.value for d in app.dataframe]
    assert list(table.columns) == ["Model version", "Signal", "PSI", "Status"]
    assert list(table["Signal"]) == ["aspect ratio", "file size"]
    (chart,) = app.get("vega_lite_chart")
    assert drawn_order(chart) == ["< 0.079", "0.079 to 0.337", "> 0.712"]
    app.selectbox(key="drift-signal").set_value("file_size").run()
    assert app.selectbox(key="drift-signal").options == ["aspect ratio", "file size"]
    assert drawn_order(app.get("vega_lite_chart")[0]) == ["< 9", "9 to 10", "10 to 80", "> 80"]


def _status_page(
    warnings: list[str], served: list[dict[str, object]] | None = None, checks: dict[str, object] | None = None
) -> None:
    from ui.views.admin import status_tab

    class Warned:
        def readiness(self) -> dict[str, object]:
            failed = any(c["status"] != "ok" for c in (checks or {}).values())  # type: ignore[index]
            return {"status": "fail" if failed else "ok", "checks": checks or {}, "warnings": warnings}

        def models(self) -> list[object]:
            return list(served or [])

    status_tab(Warned(), None)  # type: ignore[arg-type]


def test_the_status_says_why_the_portal_is_not_ready() -> None:
    """It showed "not ready" alone; the failing check's detail is what an operator acts on."""
    checks = {
        "postgresql": {"status": "ok", "detail": "ok"},
        "workers": {"status": "fail", "detail": "no warm worker serves resnet50@2, mobilenet_v2@2"},
    }
    app = AppTest.from_function(_status_page, kwargs={"warnings": [], "checks": checks}).run()
    assert not app.exception, app.exception
    assert [m.value for m in app.metric] == ["not ready"]
    assert [e.value for e in app.error] == ["workers: no warm worker serves resnet50@2, mobilenet_v2@2"]


def test_the_status_names_each_version_as_people_read_it_and_by_its_reference() -> None:
    served = [
        {
            "ref": "sketch@3",
            "display_name": "Sketch CNN, 20 categories",
            "available": True,
            "workers": 1,
            "reason": None,
        }
    ]
    app = AppTest.from_function(_status_page, kwargs={"warnings": [], "served": served}).run()
    assert not app.exception, app.exception
    (table,) = [d.value for d in app.dataframe]
    assert list(table["Model version"]) == ["Sketch CNN, 20 categories (sketch@3)"]


def test_the_readiness_warnings_are_listed_under_the_status(api_url: str) -> None:
    # The client keeps them (the suite's PostgreSQL may have autovacuum off, or not).
    assert Api(api_url).readiness()["warnings"] == httpx.get(f"{api_url}/health/ready").json()["warnings"]
    said = ["autovacuum is off: dead rows and stale planner statistics will slow the portal down"]
    app = AppTest.from_function(_status_page, kwargs={"warnings": said}).run()
    assert not app.exception, app.exception
    assert [m.value for m in app.metric] == ["ready"] and [w.value for w in app.warning] == said


def _running_export_page() -> None:
    from ui.client import ApiError
    from ui.views.admin import show_export

    class Unreachable:
        def cancel_export(self, export_id: str) -> None:
            raise ApiError(503, "The portal is not answering.")

    export = {"id": "7b0c5c5e-0000-4000-8000-000000000002", "status": "running", "rows_done": 3, "rows_total": 10}
    show_export(Unreachable(), export)  # type: ignore[arg-type]


def test_a_failed_export_cancel_stays_said_while_the_list_redraws() -> None:
    app = AppTest.from_function(_running_export_page).run()
    next(b for b in app.button if (b.key or "").startswith("export_cancel_")).click().run()
    app.run()  # the list's next redraw, with nothing clicked
    assert not app.exception, app.exception
    assert [e.value for e in app.error] == ["The portal is not answering."]


def test_the_change_user_form_shows_the_chosen_users_own_role(api_url: str, portal: tuple[str, str, str]) -> None:
    admin = Api(api_url)
    admin.login(portal[1], portal[2])
    suffix = os.urandom(4).hex()
    other_admin = admin.create_user(f"second-admin-{suffix}@example.com", PASSWORD, "Second", "admin")
    person = admin.create_user(f"person-{suffix}@example.com", PASSWORD, "Person", "user")
    app = admin_app(api_url, portal)

    def pick(user: User) -> None:
        app.selectbox(key="change_pick").set_value(f"{user['email']} (#{user['id']})").run()
        assert not app.exception, app.exception

    pick(other_admin)
    assert app.selectbox(key=f"change_role_{other_admin['id']}").value == "admin"
    assert app.checkbox(key=f"change_active_{other_admin['id']}").value is True
    pick(person)
    assert app.selectbox(key=f"change_role_{person['id']}").value == "user"
    # Saving what is there changes nothing: no admin is demoted by one click.
    next(b for b in app.button if b.proto.form_id == f"change_user_{person['id']}").click().run()
    assert any("Nothing to change" in i.value for i in app.info)
    # An admin cannot demote themselves: the API's refusal is shown.
    me = next(u for u in admin.users() if u["email"] == portal[1])
    pick(me)
    app.selectbox(key=f"change_role_{me['id']}").set_value("user")
    next(b for b in app.button if b.proto.form_id == f"change_user_{me['id']}").click().run()
    assert app.error and not app.exception
    assert next(u for u in admin.users() if u["email"] == portal[1])["role"] == "admin"


def test_a_created_user_is_listed_at_once_and_the_form_is_emptied(api_url: str, portal: tuple[str, str, str]) -> None:
    app = admin_app(api_url, portal)
    email = f"created-{os.urandom(4).hex()}@example.com"
    app.text_input(key="new_email").input(email)
    app.text_input(key="new_name").input("Created Here")
    app.text_input(key="new_password").input(PASSWORD)
    next(b for b in app.button if b.proto.form_id == "create_user").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert [s.value for s in app.success] == [f"Created {email}."]
    users = next(d.value for d in app.dataframe if "Email" in d.value.columns)
    assert email in list(users["Email"])
    assert any(o.startswith(f"{email} (#") for o in app.selectbox(key="change_pick").options)
    assert all(emptied_in_the_browser(app, k) for k in ("new_email", "new_name", "new_password"))
    # Saving a change shows it in the table too.
    created = next(
        u for u in Api(api_url, Api(api_url).login(portal[1], portal[2])["token"]).users() if u["email"] == email
    )
    app.selectbox(key="change_pick").set_value(f"{email} (#{created['id']})").run()
    app.checkbox(key=f"change_active_{created['id']}").uncheck()
    next(b for b in app.button if b.proto.form_id == f"change_user_{created['id']}").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert [s.value for s in app.success] == [f"Saved {email}: user, inactive."]
    users = next(d.value for d in app.dataframe if "Email" in d.value.columns)
    assert users.loc[users["Email"] == email, "Active"].tolist() == ["no"]


def test_history_pages_reopens_results_and_deletes_after_confirming(api_url: str, portal: tuple[str, str, str]) -> None:
    email, password = new_user(api_url, portal)
    api = Api(api_url)
    api.login(email, password)
    uploaded = [api.upload(f"colour-{i}.png", encode(split_colour(32 + i), "PNG")) for i in range(13)]
    job = api.wait(api.predict(uploaded[-1]["id"], ["mobilenet_v2@1"]))
    token = api.token
    script = (
        "from ui.client import Api\nfrom ui.views.history import history_page\n"
        f"history_page(Api({api_url!r}, {token!r}))\n"
    )
    app = AppTest.from_string(script, default_timeout=60).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert any(c.value == "Page 1 of 2 · 13 uploads" for c in app.caption), [c.value for c in app.caption]
    times = [m.value.split(" · ")[-1] for m in app.markdown if m.value.startswith("**colour")]
    assert times and all(re.fullmatch(r"\d{1,2} [A-Z][a-z]{2} \d{4}, \d{2}:\d{2} UTC", t) for t in times), times
    # The newest upload's result opens with its feedback form.
    result_id = job["results"][0]["id"]
    app.button(key=f"open_{job['job_id']}").click().run()
    assert any(b.proto.form_id == f"fb_{result_id}" for b in app.button)
    # "Older" opens page 2, which holds the oldest upload and is the last; "Newer" goes back.
    assert app.button(key="history_newer").disabled
    app.button(key="history_older").click().run()
    assert any(c.value == "Page 2 of 2 · 13 uploads" for c in app.caption), [c.value for c in app.caption]
    shown = [m.value.split(" · ")[0].replace("\\", "") for m in app.markdown if m.value.startswith("**colour")]
    assert shown == ["**colour-0.png**"], shown
    assert app.button(key="history_older").disabled
    app.button(key="history_newer").click().run()
    assert any(c.value == "Page 1 of 2 · 13 uploads" for c in app.caption), [c.value for c in app.caption]
    # Delete asks first; "Keep" keeps it, the second "Delete" deletes it and says so.
    newest = uploaded[-1]["id"]
    app.button(key=f"delete_{newest}").click().run()
    assert any("Delete this upload" in w.value for w in app.warning)
    app.button(key=f"delete_no_{newest}").click().run()
    assert len(api.images(limit=20)["data"]) == 13
    app.button(key=f"delete_{newest}").click().run()
    app.button(key=f"delete_yes_{newest}").click().run()
    assert not app.exception, app.exception
    assert any("Deleted colour-12.png" in s.value for s in app.success), [s.value for s in app.success]
    assert len(api.images(limit=20)["data"]) == 12


def deleted_from_history(app: AppTest, image_id: str) -> list[str]:
    """Deletes an upload from the History page shown (Delete, then the confirmation); the page's
    captions after it."""
    app.button(key=f"delete_{image_id}").click().run()
    app.button(key=f"delete_yes_{image_id}").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    return [c.value for c in app.caption]


def test_a_delete_on_a_later_page_of_history_updates_the_total(api_url: str, portal: tuple[str, str, str]) -> None:
    api = Api(api_url)
    api.login(*new_user(api_url, portal))
    uploaded = [api.upload(f"colour-{i}.png", encode(split_colour(32 + i), "PNG")) for i in range(14)]
    script = (
        "from ui.client import Api\nfrom ui.views.history import history_page\n"
        f"history_page(Api({api_url!r}, {api.token!r}))\n"
    )
    app = AppTest.from_string(script, default_timeout=60).run()
    app.button(key="history_older").click().run()
    assert any(c.value == "Page 2 of 2 · 14 uploads" for c in app.caption), [c.value for c in app.caption]
    captions = deleted_from_history(app, uploaded[0]["id"])
    assert "Page 2 of 2 · 13 uploads" in captions, captions
    # The last upload of the page goes: the page before it is shown, with the new total.
    captions = deleted_from_history(app, uploaded[1]["id"])
    assert "Page 1 of 1 · 12 uploads" in captions, captions
    assert [s.value for s in app.success] == ["Deleted colour-1.png and its results."]


def pages_app(api_url: str, token: str) -> AppTest:
    """The classify and history pages in one session, the one shown named by ``page`` (the app's
    navigation has no page files to switch between)."""
    script = (
        "import streamlit as st\nfrom ui.client import Api\n"
        "from ui.views.classify import classify_page\nfrom ui.views.history import history_page\n"
        "page = {'classify': classify_page, 'history': history_page}[st.session_state.get('page', 'classify')]\n"
        f"page(Api({api_url!r}, {token!r}))\n"
    )
    return AppTest.from_string(script, default_timeout=90)


def parrot_page(api_url: str, portal: tuple[str, str, str]) -> tuple[Api, AppTest]:
    """A new user's Classify page with the parrot photo chosen, run once."""
    api = Api(api_url)
    api.login(*new_user(api_url, portal))
    app = pages_app(api_url, api.token or "")
    app.session_state["upload"] = ("parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())
    app.run()
    return api, app


def send_feedback(app: AppTest, prediction: str, verdict: str, label: str = "", comment: str = "") -> None:
    app.radio(key=f"fb_{prediction}_verdict").set_value(verdict)
    if label:
        app.selectbox(key=f"fb_{prediction}_label").set_value(label)
    app.text_area(key=f"fb_{prediction}_comment").input(comment)
    next(b for b in app.button if b.proto.form_id == f"fb_{prediction}").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]


def test_a_verdict_sent_earlier_is_shown_with_its_form_and_sending_again_replaces_it(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    api, app = parrot_page(api_url, portal)
    app.button(key="classify_submit").click().run()
    job = app.session_state["classify_job"]
    prediction = job["results"][0]["id"]
    send_feedback(app, prediction, "Wrong", "lorikeet", "the beak is too small")
    assert any("feedback was recorded" in s.value for s in app.success)
    said = "You said this was wrong (it is lorikeet), and wrote “the beak is too small”. Sending again replaces it."
    assert said in [c.value for c in app.caption]
    assert any(b.proto.form_id == f"fb_{prediction}" for b in app.button)  # it can still be changed

    # Reopened from History in the same session: what was said, and the form to say it again.
    app.session_state["page"] = "history"
    app.run()
    app.button(key=f"open_{job['job_id']}").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert said in [c.value for c in app.caption], [c.value for c in app.caption]
    assert any(b.proto.form_id == f"fb_{prediction}" for b in app.button)
    send_feedback(app, prediction, "Correct")
    assert "You said this was right. Sending again replaces it." in [c.value for c in app.caption]
    mine = api.my_feedback([prediction])
    assert [(f["is_correct"], f["correct_label"], f["comment"]) for f in mine] == [(True, "macaw", None)], mine


def test_changing_a_verdict_from_history_keeps_its_comment(api_url: str, portal: tuple[str, str, str]) -> None:
    """Reopened in another session, a result's comment box holds the comment said with it, so
    changing only the verdict keeps the comment."""
    api = Api(api_url)
    api.login(*new_user(api_url, portal))
    job = api.wait(
        api.predict(api.upload("parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())["id"], ["mobilenet_v2@1"])
    )
    prediction = job["results"][0]["id"]
    api.feedback(prediction, False, "lorikeet", "the beak is too small")
    app = pages_app(api_url, api.token or "")
    app.session_state["page"] = "history"
    app.run()
    app.button(key=f"open_{job['job_id']}").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert app.text_area(key=f"fb_{prediction}_comment").value == "the beak is too small"
    app.radio(key=f"fb_{prediction}_verdict").set_value("Correct")
    next(b for b in app.button if b.proto.form_id == f"fb_{prediction}").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    mine = api.my_feedback([prediction])
    assert [(f["is_correct"], f["comment"]) for f in mine] == [(True, "the beak is too small")], mine


def test_the_models_ticked_stay_ticked_for_the_next_photo(api_url: str, portal: tuple[str, str, str]) -> None:
    _api, app = parrot_page(api_url, portal)
    app.checkbox(key="classify_birds@1").check()
    app.checkbox(key="classify_mobilenet_v2@1").uncheck().run()

    def ticked() -> dict[str, bool]:
        return {str(c.key): c.value for c in app.checkbox if not c.disabled}

    choice = ticked()
    assert choice["classify_birds@1"] and not choice["classify_mobilenet_v2@1"], choice
    # The photo removed (no boxes drawn while there is none), then another one: the same choice.
    del app.session_state["upload"]
    app.run()
    assert not app.checkbox
    app.session_state["upload"] = ("cat.bmp", (PHOTOS / "cat.bmp").read_bytes())
    app.run()
    assert ticked() == choice
    # Another page and back, then an example: still the same choice.
    app.session_state["page"] = "history"
    app.run()
    app.session_state["page"] = "classify"
    app.run()
    app.button(key="example_Maze").click().run()
    assert ticked() == choice
    app.button(key="classify_submit").click().run()
    assert [r["model"] for r in app.session_state["classify_job"]["results"]] == ["birds"]


HINT = "Choose the models and press Classify: the answers appear here."


@pytest.mark.parametrize("page", ["classify", "sketch"])
def test_a_page_says_why_no_model_can_be_chosen(api_url: str, portal: tuple[str, str, str], page: str) -> None:
    """With no model worker alive every box is greyed out, and the page says why where it shows,
    in the API's words, instead of asking to choose the models."""
    api = Api(api_url)
    api.login(*new_user(api_url, portal))
    script = (
        "import streamlit as st\nfrom ui.client import Api\nfrom ui.views.classify import classify_page\n"
        "from ui.views.sketch import sketch_page\n"
        "class NoWorker(Api):\n"
        "    def models(self):\n"
        "        reasons = st.session_state.get('reasons', {})\n"
        "        return [\n"
        "            {**m, 'available': False, 'workers': 0, 'reason': reasons.get(m['ref'], 'no live model worker serves it')}\n"
        "            for m in super().models()\n"
        "        ]\n"
        f"page = {{'classify': classify_page, 'sketch': sketch_page}}[{page!r}]\n"
        f"page(NoWorker({api_url!r}, {api.token!r}))\n"
    )
    app = AppTest.from_string(script, default_timeout=60)
    app.session_state["upload"] = ("parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert all(box.disabled for box in app.checkbox)
    assert app.button(key=f"{page}_submit").disabled
    assert [w.value for w in app.warning] == [
        "No model can be chosen right now. The portal says of each: no live model worker serves it."
    ]
    assert not [c.value for c in app.caption if "press" in c.value], [c.value for c in app.caption]
    # Versions unavailable for different reasons: each reason with the versions it is about.
    first = next(m for m in api.models() if m["input"]["mode"] == ("RGB" if page == "classify" else "L"))
    app.session_state["reasons"] = {first["ref"]: "its model files are not installed on this server"}
    app.session_state["models_at"] = 0.0  # the catalog read again
    app.run()
    (warning,) = [w.value for w in app.warning]
    lines = warning.split("\n")
    assert lines[0] == "No model can be chosen right now. The portal says why:", warning
    assert f"- {plain(first['display_name'])}: its model files are not installed on this server" in lines, warning
    assert len(lines) > 2 and all(line.endswith(": no live model worker serves it") for line in lines[2:]), warning


@pytest.mark.parametrize("page", ["classify", "sketch"])
def test_a_page_with_no_model_to_choose_takes_them_back_once_a_worker_serves(
    api_url: str, portal: tuple[str, str, str], page: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every box greyed out, nothing on the page can be clicked to run it again, and the catalog
    was read again only when it ran: it stayed greyed out after the worker came back. A part of
    it asks for the catalog again while nothing can be chosen, and runs the page once a version
    serves."""
    api = Api(api_url)
    api.login(*new_user(api_url, portal))
    script = (
        "import streamlit as st\nfrom ui.client import Api\nfrom ui.views.classify import classify_page\n"
        "from ui.views.sketch import sketch_page\n"
        "class WorkerGone(Api):\n"
        "    def models(self):\n"
        "        if not st.session_state.get('worker_gone'):\n"
        "            return super().models()\n"
        "        return [\n"
        "            {**m, 'available': False, 'workers': 0, 'reason': 'no live model worker serves it'}\n"
        "            for m in super().models()\n"
        "        ]\n"
        f"page = {{'classify': classify_page, 'sketch': sketch_page}}[{page!r}]\n"
        f"page(WorkerGone({api_url!r}, {api.token!r}))\n"
    )
    app = AppTest.from_string(script, default_timeout=60)
    app.session_state["upload"] = ("parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())
    app.session_state["worker_gone"] = True
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert all(box.disabled for box in app.checkbox) and app.button(key=f"{page}_submit").disabled
    assert [w.value for w in app.warning] == [
        "No model can be chosen right now. The portal says of each: no live model worker serves it."
    ]
    # Still none serves: the part asks again and leaves the page as it is.
    app.session_state["models_at"] = time.monotonic() - MODELS_WAIT_SECONDS
    run_fragments(app, monkeypatch)
    assert not app.exception and not app.title, "the whole page ran, though nothing changed"
    # The worker back, within the catalog's CATALOG_SECONDS: the page comes back by itself.
    app.session_state["worker_gone"] = False
    app.session_state["models_at"] = time.monotonic() - MODELS_WAIT_SECONDS
    run_fragments(app, monkeypatch)
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert app.title, "the page did not run again"
    assert not app.warning, [w.value for w in app.warning]
    assert not app.button(key=f"{page}_submit").disabled
    assert [box.key for box in app.checkbox if box.value and not box.disabled], "no box is ticked"


def test_a_file_the_api_cannot_read_gets_its_refusal_where_the_answers_go(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    """Half a WebP (see the shared bad_uploads/README.md) has no preview; it is still sent, since
    the API judges what it reads, and its 422 stands in place of the answers, without the hint."""
    at = signed_in(api_url, *new_user(api_url, portal))
    half = PHOTOS.parent / "bad_uploads" / "truncated_half.webp"
    at.session_state["upload"] = (half.name, half.read_bytes())
    at.run()
    assert f"{plain('truncated_half.webp')} (no preview)" in [c.value for c in at.caption]
    assert HINT in [c.value for c in at.caption]
    at.button(key="classify_submit").click().run()
    assert not at.exception
    (error,) = [e.value for e in at.error]
    assert "truncated or corrupt" in error, error
    assert HINT not in [c.value for c in at.caption], [c.value for c in at.caption]
    # It stays said while the page redraws, and goes with the file.
    at.checkbox(key="classify_birds@1").check().run()
    assert [e.value for e in at.error] == [error] and HINT not in [c.value for c in at.caption]
    at.button(key="example_Maze").click().run()
    assert not at.error and HINT in [c.value for c in at.caption]


def test_an_api_out_of_reach_while_classifying_is_said_once_not_kept_under_the_photo(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    """An outage says nothing of the photo: said when Classify meets it, it is gone on the next
    run (the API's refusal of a file stays, as above)."""
    from tests.support import free_port

    token = Api(api_url).login(*new_user(api_url, portal))["token"]
    script = (
        "import streamlit as st\nfrom ui.client import Api\nfrom ui.views.classify import classify_page\n"
        f"classify_page(Api(st.session_state.get('url', {api_url!r}), {token!r}))\n"
    )
    app = AppTest.from_string(script, default_timeout=60)
    app.session_state["upload"] = ("parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())
    app.run()
    out_of_reach = f"http://127.0.0.1:{free_port()}"
    app.session_state["url"] = out_of_reach
    app.button(key="classify_submit").click().run()
    assert not app.exception
    assert [e.value for e in app.error] == [f"Cannot reach the portal API at {out_of_reach}. Is it running?"]
    app.session_state["url"] = api_url
    app.checkbox(key="classify_birds@1").check().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert HINT in [c.value for c in app.caption]
    app.button(key="classify_submit").click().run()
    assert not app.error and app.session_state["classify_job"]["status"] == "done"


def test_a_picture_of_too_many_pixels_is_refused_before_its_preview_is_decoded(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    """A PNG of a few KB can hold 900 megapixels: the page reads its size from the header and says
    the API's limit at once, without decoding it (which took 2 GB of the UI's memory) or offering
    to send it."""
    import resource

    at = signed_in(api_url, *new_user(api_url, portal))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    at.session_state["upload"] = ("[grey](http://evil.example) bomb.png", png_bomb())
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == ["The image is 30000x30000 pixels; at most 50,000,000 pixels are accepted."]
    assert f"{plain('[grey](http://evil.example) bomb.png')} (no preview)" in [c.value for c in at.caption]
    assert not [b for b in at.button if b.key == "classify_submit"]
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 300


def test_a_file_name_is_shown_as_typed_under_its_preview(api_url: str, portal: tuple[str, str, str]) -> None:
    at = signed_in(api_url, *new_user(api_url, portal))
    name = "[click](http://evil.example) **x** $E=mc^2$.png"
    at.session_state["upload"] = (name, (PHOTOS / "owl.jpg").read_bytes())
    at.run()
    assert not at.exception
    captions = [img.caption for image in at.get("image") for img in image.proto.imgs]
    assert captions == [plain(name)], captions


def test_the_sketch_page_lists_the_categories_of_the_versions_chosen(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    from model.prepare import DEFAULT_CATEGORIES

    api = Api(api_url)
    api.login(*new_user(api_url, portal))
    catalog = {m["ref"]: m for m in api.models()}
    six, twenty = catalog["sketch@1"], catalog["sketch@3"]
    assert six["labels"] == DEFAULT_CATEGORIES.split(",") and len(twenty["labels"] or []) == 20
    script = (
        "from ui.client import Api\nfrom ui.views.sketch import sketch_page\n"
        f"sketch_page(Api({api_url!r}, {api.token!r}))\n"
    )
    app = AppTest.from_string(script, default_timeout=60).run()
    assert not app.exception, app.exception

    def lists() -> list[str]:
        return [c.value for c in app.caption if re.match(r"(Draw one of|.+ knows?): ", c.value)]

    def examples() -> list[str]:
        return [str(b.key).removeprefix("sketch_example_") for b in app.button if "sketch_example_" in str(b.key)]

    assert lists() == [f"Draw one of: {', '.join(label.replace('_', ' ') for label in twenty['labels'] or [])}."]
    app.checkbox(key="sketch_sketch@1").check()
    app.checkbox(key="sketch_sketch@3").uncheck().run()
    assert lists() == [f"Draw one of: {', '.join(six['labels'] or [])}."], lists()
    assert examples() == ["Fish"], examples()
    # Two versions that know different categories: each set named with the versions that know it.
    app.checkbox(key="sketch_sketch@3").check().run()
    assert [line.split(": ")[0] for line in lists()] == [
        f"{six['display_name']} knows",
        f"{twenty['display_name']} knows",
    ], lists()
    assert examples() == ["Fish"], examples()


def test_a_used_session_is_renewed_and_an_expired_one_asks_to_log_in_again(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    at = signed_in(api_url, *new_user(api_url, portal)).run()
    first = at.session_state["token"]
    # Half its lifetime gone: the next run renews the token, in the same login session.
    at.session_state["token_renew_at"] = 0.0
    at.run()
    assert not at.exception
    renewed = at.session_state["token"]
    assert renewed != first and at.session_state["token_renew_at"] > 0
    assert httpx.get(f"{api_url}/v1/users/me", headers={"Authorization": f"Bearer {renewed}"}).status_code == 200
    # Logged out elsewhere (or expired): the next renewal fails and the login page says why.
    httpx.post(f"{api_url}/v1/auth/logout", headers={"Authorization": f"Bearer {first}"})
    at.session_state["token_renew_at"] = 0.0
    at.run()
    assert "token" not in at.session_state
    assert any("without activity" in w.value for w in at.warning)


def test_the_login_page_says_what_the_portal_does(api_url: str) -> None:
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert any("several models" in m.value for m in at.markdown)


def test_an_example_photo_is_classified_with_one_click(api_url: str, portal: tuple[str, str, str]) -> None:
    at = signed_in(api_url, *new_user(api_url, portal)).run()
    at.button(key="example_Honeycomb").click().run()
    assert at.session_state["upload"][0] == "honeycomb.png"
    at.button(key="classify_submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state["classify_job"]["results"][0]["label"] == "honeycomb"
    # Another example replaces the photo and its results.
    at.button(key="example_Maze").click().run()
    assert at.session_state["upload"][0] == "maze.png" and "classify_job" not in at.session_state


def test_every_example_is_recognised(api_url: str, portal: tuple[str, str, str]) -> None:
    """The pictures the portal draws for people to try are ones its models get right."""
    from model.prepare import DEFAULT_CATEGORIES
    from ui.examples import PHOTOS as PHOTO_EXAMPLES
    from ui.examples import SKETCHES, example_png, sketches_for

    api = Api(api_url)
    api.login(*new_user(api_url, portal))
    expected = {
        ("photo", "Maze"): "maze",
        ("photo", "Crossword"): "crossword_puzzle",
        ("photo", "Honeycomb"): "honeycomb",
        ("sketch", "House"): "house",
        ("sketch", "Star"): "star",
        ("sketch", "Smiley face"): "smiley_face",
        ("sketch", "Fish"): "fish",
    }
    assert set(expected) == {("photo", n) for n in PHOTO_EXAMPLES} | {("sketch", n) for n in SKETCHES}
    # A 6-category version standing in for sketch@3 offers only the drawings it knows: it knows those.
    six = sketches_for(DEFAULT_CATEGORIES.split(","))
    assert six == ["Fish"]
    for (kind, name), label in expected.items():
        image = api.upload(f"{name}.png", example_png(kind, name))
        models = ["mobilenet_v2@1"] if kind == "photo" else ["sketch@3"] + (["sketch@1"] if name in six else [])
        for model in models:
            job = api.wait(api.predict(image["id"], [model]))
            assert job["results"][0]["label"] == label, (name, model, job["results"][0]["top_k"])


def test_admins_read_the_comments_people_left(api_url: str, portal: tuple[str, str, str]) -> None:
    api = Api(api_url)
    api.login(*new_user(api_url, portal))
    image = api.upload("parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())
    job = api.wait(api.predict(image["id"], ["mobilenet_v2@1"]))
    api.feedback(job["results"][0]["id"], False, "lorikeet", "the beak is too small for a macaw")
    app = admin_app(api_url, portal)
    assert not app.exception and not app.error, [e.value for e in app.error]
    verdicts = next(d.value for d in app.dataframe if "Comment" in d.value.columns)
    assert list(verdicts.columns)[:3] == ["When", "Who", "Comment"]  # in sight without scrolling the table
    row = next(r for r in verdicts.to_dict("records") if r["Comment"] == "the beak is too small for a macaw")
    assert (row["Verdict"], row["Right label"]) == ("wrong", "lorikeet") and row["Who"].startswith("ui-")


def finished_batch_page(
    api_url: str, portal: tuple[str, str, str], entries: dict[str, bytes]
) -> tuple[Api, Batch, AppTest]:
    """A new user's batch of ``entries`` (one zip) by mobilenet_v2@1, once finished, and the batch
    page showing it."""
    from tests.api.test_batches import zipped

    api = Api(api_url)
    api.login(*new_user(api_url, portal))
    batch = api.create_batch([("set.zip", zipped(entries))], ["mobilenet_v2@1"])["batch"]
    deadline = time.monotonic() + 120
    while api.batch(batch["id"])["status"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    script = (
        "import streamlit as st\nfrom ui.client import Api\nfrom ui.views.batch import batch_page\n"
        f"st.session_state['batch_id'] = {batch['id']!r}\n"
        f"batch_page(Api({api_url!r}, {api.token!r}))\n"
    )
    app = AppTest.from_string(script, default_timeout=60).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    return api, batch, app


def test_the_batch_page_follows_a_batch_and_offers_its_results(api_url: str, portal: tuple[str, str, str]) -> None:
    from tests.api.test_batches import noise_png

    api, batch, app = finished_batch_page(api_url, portal, {f"{i}.png": noise_png(500 + i) for i in range(5)})
    bars = [bar.proto.text for bar in app.get("progress")]
    assert bars == ["5 of 5 images done · finished"], bars
    csv_text = app.session_state[f"batch_csv_{batch['id']}"][1].decode()
    assert csv_text.count("\n") == 6 and "mobilenet_v2" in csv_text
    # Listed among my batches, with the models it went to.
    assert any("5 files · MobileNetV2" in m.value and m.value.endswith("· finished") for m in app.markdown), [
        m.value for m in app.markdown
    ]
    # History lists my own uploads; the batch's five files only when asked for.
    script = (
        "from ui.client import Api\nfrom ui.views.history import history_page\n"
        f"history_page(Api({api_url!r}, {api.token!r}))\n"
    )
    history = AppTest.from_string(script, default_timeout=60).run()
    assert not history.exception and not history.error, [e.value for e in history.error]
    assert any("Nothing here yet" in i.value and "Include the files of my batches" in i.value for i in history.info), [
        i.value for i in history.info
    ]
    history.toggle(key="history_with_batches").set_value(True).run()
    assert any(c.value == "Page 1 of 1 · 5 images" for c in history.caption), [c.value for c in history.caption]


def csv_statuses(app: AppTest, batch_id: str) -> list[str]:
    """The status column of the batch's results CSV as the page keeps it to offer."""
    _, data = app.session_state[f"batch_csv_{batch_id}"]
    return sorted(row["status"] for row in csv.DictReader(io.StringIO(data.decode())))


def test_the_results_offered_are_read_again_once_an_image_of_the_batch_is_deleted(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    from tests.api.test_batches import noise_png

    api, batch, app = finished_batch_page(api_url, portal, {f"{i}.png": noise_png(670 + i) for i in range(2)})
    assert csv_statuses(app, batch["id"]) == ["done", "done"]
    api.delete_image(api.images(source="batch")["data"][0]["id"])
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert "1 file's image was deleted since the batch received them, with their answers." in [
        c.value for c in app.caption
    ]
    assert csv_statuses(app, batch["id"]) == ["deleted", "done"]
    assert app.get("download_button")
    # History offers the same results, read again as well.
    api.delete_image(api.images(source="batch")["data"][0]["id"])
    key = f"batch_csv_{batch['id']}"
    script = (
        "import streamlit as st\nfrom ui.client import Api\nfrom ui.views.history import batches_section\n"
        f"st.session_state.setdefault({key!r}, {app.session_state[key]!r})\n"
        f"batches_section(Api({api_url!r}, {api.token!r}))\n"
    )
    history = AppTest.from_string(script, default_timeout=60).run()
    assert not history.exception and not history.error, [e.value for e in history.error]
    assert csv_statuses(history, batch["id"]) == ["deleted", "deleted"] and history.get("download_button")


def test_results_that_could_not_be_read_are_read_again_on_the_next_run(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    from tests.api.test_batches import noise_png

    api, batch, _ = finished_batch_page(api_url, portal, {"0.png": noise_png(680)})
    script = (
        "import streamlit as st\nfrom ui.client import Api, ApiError\nfrom ui.views.batch import batch_page\n"
        "class Failing(Api):\n"
        "    def batch_csv(self, batch_id):\n"
        "        if st.session_state.get('fail'):\n"
        "            raise ApiError(503, 'The portal is busy or part of it is down. Please try again shortly.')\n"
        "        return super().batch_csv(batch_id)\n"
        f"st.session_state.setdefault('batch_id', {batch['id']!r})\n"
        f"batch_page(Failing({api_url!r}, {api.token!r}))\n"
    )
    app = AppTest.from_string(script, default_timeout=60)
    app.session_state["fail"] = True
    app.run()
    assert [e.value for e in app.error] == ["The portal is busy or part of it is down. Please try again shortly."]
    assert not app.get("download_button") and f"batch_csv_{batch['id']}" not in app.session_state
    app.session_state["fail"] = False
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert app.get("download_button") and csv_statuses(app, batch["id"]) == ["done"]


def test_the_batch_page_lists_the_skipped_files_and_why(api_url: str, portal: tuple[str, str, str]) -> None:
    from tests.api.test_batches import noise_png

    half = (PHOTOS.parent / "bad_uploads" / "truncated_half.webp").read_bytes()
    entries = {"0.png": noise_png(600), "notes.txt": b"no image", "half.webp": half, "1.png": noise_png(601)}
    api, batch, app = finished_batch_page(api_url, portal, entries)
    assert [w.value for w in app.warning] == ["2 files skipped (not images, or unreadable):"]
    shown = next(d.value for d in app.dataframe if "Why" in d.value.columns)
    said = [(r["file_name"], r["error"]) for r in api.batch_results(batch["id"])["data"] if r["status"] == "skipped"]
    assert [name for name, _ in said] == ["notes.txt", "half.webp"] and all(why for _, why in said), said
    assert list(zip(shown["File"], shown["Why"], strict=True)) == said, shown


def test_the_batch_page_lists_the_first_skipped_files_and_says_how_many(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    """Past a page of skipped files (two here, SKIPPED_SHOWN made small), the page lists the first
    and says how many there are; the CSV has them all."""
    from tests.api.test_batches import noise_png

    entries = {"0.png": noise_png(610), **{f"notes-{i}.txt": b"no image" for i in range(3)}}
    api, batch, _ = finished_batch_page(api_url, portal, entries)
    script = (
        "import streamlit as st\nimport ui.views.batch as view\nfrom ui.client import Api\n"
        "view.SKIPPED_SHOWN = 2\n"
        f"st.session_state['batch_id'] = {batch['id']!r}\n"
        f"view.batch_page(Api({api_url!r}, {api.token!r}))\n"
    )
    app = AppTest.from_string(script, default_timeout=60).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert [w.value for w in app.warning] == ["3 files skipped (not images, or unreadable):"]
    shown = next(d.value for d in app.dataframe if "Why" in d.value.columns)
    assert list(shown["File"]) == ["notes-0.txt", "notes-1.txt"]
    assert "The first 2 of 3 skipped files: the results' CSV lists them all." in [c.value for c in app.caption]
    assert app.session_state[f"batch_csv_{batch['id']}"][1].decode().count("notes-") == 3


def test_a_batch_waiting_for_an_unserved_version_says_so(api_url: str, portal: tuple[str, str, str]) -> None:
    """The page shows what the API's ``waiting_for`` says (tested in tests/api/test_batches.py):
    the version's name, why it waits, and that nothing is lost."""
    api = Api(api_url)
    api.login(*new_user(api_url, portal))
    counts = {
        "images": 3,
        "queued": 2,
        "running": 0,
        "done": 1,
        "failed": 0,
        "cancelled": 0,
        "skipped": 0,
        "deleted": 0,
        "partly_answered": 0,
    }
    batch = {
        "id": str(uuid.uuid4()),
        "status": "running",
        "models": ["mobilenet_v2@1"],
        "entries": 3,
        "created_at": "2026-01-01T00:00:00Z",
        "finished_at": None,
        "counts": {**counts, "eta_seconds": None},
        "waiting_for": ["mobilenet_v2@1"],
    }
    script = (
        "from ui.client import Api\nfrom ui.views.batch import show_progress\n"
        f"show_progress(Api({api_url!r}, {api.token!r}), {batch!r})\n"
    )
    app = AppTest.from_string(script, default_timeout=60).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    (info,) = [i.value for i in app.info]
    name = next(m["display_name"] for m in api.models() if m["ref"] == "mobilenet_v2@1")
    assert f"no model worker serves {name} now" in info and "nothing is lost" in info, info
    assert not app.warning
    script = script.replace("'waiting_for': ['mobilenet_v2@1']", "'waiting_for': []")
    assert not AppTest.from_string(script, default_timeout=60).run().info
    # An image one of whose models' answers is missing (expired, say) is said apart from done.
    partly = AppTest.from_string(script.replace("'partly_answered': 0", "'partly_answered': 1"), default_timeout=60)
    (warning,) = [w.value for w in partly.run().warning]
    assert warning.startswith("1 image lacks an answer of some model"), warning


def test_an_api_that_cannot_answer_a_renewal_ends_no_session(api_url: str, portal: tuple[str, str, str]) -> None:
    """Only a refused token (401) ends a session: an API restarting while a person works leaves
    them signed in, with a message, and the renewal is tried again on the next run."""
    from tests.support import free_port

    at = signed_in(api_url, *new_user(api_url, portal)).run()
    token = at.session_state["token"]
    os.environ["API_URL"] = f"http://127.0.0.1:{free_port()}"
    get_ui_settings.cache_clear()
    try:
        at.session_state["token_renew_at"] = 0.0
        at.run()
        assert at.session_state["token"] == token and at.session_state["user"]
        assert any("Cannot reach the portal API" in w.value for w in at.warning)
    finally:
        os.environ["API_URL"] = api_url
        get_ui_settings.cache_clear()
    at.run()
    assert at.session_state["token"] != token  # renewed once the API answers again


def keys_app(api_url: str, email: str, password: str) -> tuple[AppTest, str]:
    """The API keys page of a signed-in person, run once; and their login token."""
    token = Api(api_url).login(email, password)["token"]
    me = httpx.get(f"{api_url}/v1/users/me", headers={"Authorization": f"Bearer {token}"}).json()
    script = (
        "import streamlit as st\nfrom ui.client import Api\nfrom ui.views.api_keys import api_keys_page\n"
        f"st.session_state.setdefault('user', {me!r})\n"
        f"api_keys_page(Api({api_url!r}, {token!r}))\n"
    )
    app = AppTest.from_string(script, default_timeout=60).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    return app, token


CATALOG_SCRIPT = """
import streamlit as st
from ui.client import Api
from ui.session import models
st.session_state["refs"] = [m["ref"] for m in models(Api(st.session_state["url"], st.session_state["token"]))]
"""


def test_a_catalog_that_could_not_be_fetched_is_asked_again_seconds_later(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    """The API out of reach for one page: its error is shown, and the models are asked again
    CATALOG_RETRY_SECONDS later, not kept as an empty catalog (which hid every model, without a
    word, for CATALOG_SECONDS after the API was back)."""
    token = Api(api_url).login(*new_user(api_url, portal))["token"]
    app = AppTest.from_string(CATALOG_SCRIPT, default_timeout=30)
    app.session_state["url"], app.session_state["token"] = "http://127.0.0.1:9", token
    app.run()
    assert app.session_state["refs"] == [] and any("Cannot reach" in e.value for e in app.error)
    app.session_state["url"] = api_url
    app.run()  # at once: not asked again within one page's runs
    assert app.session_state["refs"] == []
    app.session_state["models_failed_at"] -= CATALOG_RETRY_SECONDS
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert app.session_state["refs"], "the catalog was not asked again"


def test_api_keys_are_made_shown_once_listed_and_revoked(api_url: str, portal: tuple[str, str, str]) -> None:
    app, token = keys_app(api_url, *new_user(api_url, portal))
    assert any("No keys yet" in i.value for i in app.info)
    # A user's keys cannot have the admin scope: it is not offered.
    assert list(app.multiselect(key="api_key_scopes").options) == [
        "read: see my uploads, predictions and feedback",
        "predict: upload, classify, give feedback",
    ]

    app.text_input(key="api_key_name").input("nightly import")
    app.multiselect(key="api_key_scopes").set_value([Scope.read])
    app.selectbox(key="api_key_expiry").set_value("30 days")
    next(b for b in app.button if b.proto.form_id == "api_key_create").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    [made] = app.session_state["submits"].sent["api_key_new"]
    key = made["key"]
    assert [c.value for c in app.code] == [key]
    # Held by this browser session only: the page says what loses it.
    assert any("until this page is reloaded or closed" in c.value for c in app.caption), [c.value for c in app.caption]
    # The key works, within its scope.
    assert httpx.get(f"{api_url}/v1/images", headers={"X-API-Key": key}).status_code == 200
    assert httpx.post(f"{api_url}/v1/predictions", json={}, headers={"X-API-Key": key}).status_code == 403
    listed = Api(api_url, token).api_keys()
    assert [(k["name"], k["scopes"]) for k in listed] == [("nightly import", [Scope.read])]
    assert listed[0]["expires_at"] is not None

    # Once dismissed, the key is nowhere on the page: the list shows its name, prefix and last use.
    app.button(key="api_key_dismiss").click().run()
    assert not app.code
    page_text = " ".join(m.value for m in [*app.markdown, *app.caption])
    assert key not in page_text and listed[0]["prefix"] in page_text and "nightly import" in page_text
    assert any("Scopes: read" in c.value and "last used never" not in c.value for c in app.caption), [
        c.value for c in app.caption
    ]

    # Revoking asks first; "Keep" keeps it, the second "Revoke" revokes it.
    key_id = listed[0]["id"]
    app.button(key=f"revoke_{key_id}").click().run()
    assert any("Scripts using it will be refused" in w.value for w in app.warning)
    app.button(key=f"revoke_no_{key_id}").click().run()
    assert httpx.get(f"{api_url}/v1/images", headers={"X-API-Key": key}).status_code == 200
    app.button(key=f"revoke_{key_id}").click().run()
    app.button(key=f"revoke_yes_{key_id}").click().run()
    assert not app.exception, app.exception
    assert any("Revoked nightly import" in s.value for s in app.success)
    assert httpx.get(f"{api_url}/v1/images", headers={"X-API-Key": key}).status_code == 401
    assert any("· revoked" in m.value for m in app.markdown)


def test_a_revoked_keys_secret_is_shown_no_longer(api_url: str, portal: tuple[str, str, str]) -> None:
    email, password = new_user(api_url, portal)
    app, token = keys_app(api_url, email, password)
    for name in ("nightly import", "weekly report", "monthly sums"):
        app.text_input(key="api_key_name").input(name)
        next(b for b in app.button if b.proto.form_id == "api_key_create").click().run()
    nightly, weekly, monthly = app.session_state["submits"].sent["api_key_new"]
    app.button(key=f"revoke_{nightly['id']}").click().run()
    app.button(key=f"revoke_yes_{nightly['id']}").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert [s.value for s in app.success] == [
        "Revoked nightly import: it no longer works.",
        "Your new key “weekly report”. Copy it now: it will not be shown again.",
        "Your new key “monthly sums”. Copy it now: it will not be shown again.",
    ]
    assert [c.value for c in app.code] == [weekly["key"], monthly["key"]]
    # Revoked elsewhere (another tab): its secret goes once the list shows it revoked.
    Api(api_url, token).revoke_api_key(weekly["id"])
    app.run()
    assert not app.exception and [c.value for c in app.code] == [monthly["key"]]
    Api(api_url, token).revoke_api_key(monthly["id"])
    app.run()
    assert not app.exception and not app.code and not app.success
    assert "api_key_dismiss" not in [b.key for b in app.button]


def test_a_double_click_on_make_key_makes_one_key_and_a_second_key_hides_no_secret(
    api_url: str, portal: tuple[str, str, str]
) -> None:
    app, token = keys_app(api_url, *new_user(api_url, portal))

    def submit(name: str) -> None:
        app.text_input(key="api_key_name").input(name)
        next(b for b in app.button if b.proto.form_id == "api_key_create").click().run()
        assert not app.exception and not app.error, [e.value for e in app.error]

    # A submit refused (no scope) keeps the name typed: the form is emptied once a key is made,
    # never by the submit itself, so a double click whose first run stopped early still has it.
    app.text_input(key="api_key_name").input("nightly import")
    app.multiselect(key="api_key_scopes").set_value([])
    next(b for b in app.button if b.proto.form_id == "api_key_create").click().run()
    assert [e.value for e in app.error] == ["Choose at least one scope."]
    assert app.text_input(key="api_key_name").value == "nightly import"
    app.multiselect(key="api_key_scopes").set_value([Scope.read])
    # A double click: the second submit carries the same form, or the form the first emptied.
    submit("nightly import")
    submit("nightly import")
    next(b for b in app.button if b.proto.form_id == "api_key_create").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert [k["name"] for k in Api(api_url, token).api_keys()] == ["nightly import"]
    assert app.text_input(key="api_key_name").value == ""  # emptied once its key was made
    # Another key made before the first was dismissed: both secrets stay on the page.
    submit("weekly report")
    made = app.session_state["submits"].sent["api_key_new"]
    assert [k["name"] for k in made] == ["nightly import", "weekly report"]
    assert [c.value for c in app.code] == [k["key"] for k in made]


def test_a_photo_not_answered_in_time_is_said_to_stay_queued_without_a_frozen_bar(
    api_url: str, portal: tuple[str, str, str], worker: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page stops waiting after ANSWER_WAIT_SECONDS: it says the picture stays queued (its
    answers come in History), and leaves no progress bar beside it."""
    monkeypatch.setenv("ANSWER_WAIT_SECONDS", "1")
    get_ui_settings.cache_clear()
    try:
        api, app = parrot_page(api_url, portal)
        group = os.getpgid(worker.proc.pid)
        os.killpg(group, signal.SIGSTOP)  # within the workers' heartbeat life: still taken as live
        try:
            app.button(key="classify_submit").click().run()
        finally:
            os.killpg(group, signal.SIGCONT)
    finally:
        get_ui_settings.cache_clear()
    assert [e.value for e in app.error] == [STILL_QUEUED.format(waited=1)]
    assert not app.get("progress")
    # The job went on: its answers come once the worker is back.
    [job] = httpx.get(f"{api_url}/v1/predictions", headers={"Authorization": f"Bearer {api.token}"}).json()["data"]
    assert api.wait(job["job_id"], timeout=30)["status"] == "done"


def test_a_double_click_on_classify_sends_the_photo_once(api_url: str, portal: tuple[str, str, str]) -> None:
    api, app = parrot_page(api_url, portal)
    app.button(key="classify_submit").click().run()
    first = app.session_state["classify_job"]["job_id"]
    app.button(key="classify_submit").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert app.session_state["classify_job"]["job_id"] == first
    headers = {"Authorization": f"Bearer {api.token}"}
    assert len(httpx.get(f"{api_url}/v1/images", headers=headers).json()["data"]) == 1


def test_a_key_name_is_shown_as_typed_never_as_markdown(api_url: str, portal: tuple[str, str, str]) -> None:
    """A name is the owner's text: a link or a heading typed into it stays text."""
    email, password = new_user(api_url, portal)
    name = "# big [click me](https://evil.example/phish) **x"
    Api(api_url, Api(api_url).login(email, password)["token"]).create_api_key(name, [Scope.read], None)
    app, _ = keys_app(api_url, email, password)
    (row,) = [m.value for m in app.markdown if "evil" in m.value]
    assert row.startswith(f"**{plain(name)}** · "), row
    assert "[click me](https" not in row, row


def test_admins_may_give_their_keys_the_admin_scope(api_url: str, portal: tuple[str, str, str]) -> None:
    app, _ = keys_app(api_url, portal[1], portal[2])
    assert "admin: the administration routes" in list(app.multiselect(key="api_key_scopes").options)


def test_a_session_reads_the_model_catalog_again_once_it_is_old(api_url: str, portal: tuple[str, str, str]) -> None:
    """A version trained, promoted or rolled back after a person logged in shows within
    CATALOG_SECONDS: the catalog is reused until then, not for the whole session."""
    email, password = new_user(api_url, portal)
    api = Api(api_url)
    api.login(email, password)
    script = (
        "import time\nimport streamlit as st\nfrom ui.client import Api\nfrom ui.session import models\n"
        "class Counted(Api):\n"
        "    def _request(self, method, path, **kwargs):\n"
        "        st.session_state.setdefault('calls', []).append(f'{method} {path}')\n"
        "        return super()._request(method, path, **kwargs)\n"
        f"api = Counted({api_url!r}, {api.token!r})\n"
        "if st.session_state.get('age'):\n"
        "    st.session_state['models_at'] = time.monotonic() - st.session_state['age']\n"
        "st.session_state['refs'] = [m['ref'] for m in models(api) + models(api)]\n"
    )
    app = AppTest.from_string(script, default_timeout=60).run()
    assert app.session_state["calls"] == ["GET /v1/models"] and "sketch@3" in app.session_state["refs"]
    app.session_state["age"] = CATALOG_SECONDS - 5
    app.run()
    assert app.session_state["calls"] == ["GET /v1/models"]
    app.session_state["age"] = CATALOG_SECONDS
    app.run()
    assert app.session_state["calls"] == ["GET /v1/models", "GET /v1/models"]


def test_dropped_images_pack_to_the_same_bytes_at_any_time() -> None:
    """A second click on "Start the batch" is the same request as the first (the portal answers
    it with the batch the first made): the packed zip does not carry the time it was packed."""
    from ui.views.batch import ENTRY_TIME, packed

    files = [(f"{i}.png", encode(split_colour(40 + i), "PNG")) for i in range(3)]
    [(name, data)] = packed(files)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert name == "images.zip" and {info.date_time for info in archive.infolist()} == {ENTRY_TIME}
    assert packed(files) == [(name, data)]


def short_lived_token(settings: Settings, user_id: int, seconds: int) -> str:
    """A login token of ``user_id`` that expires ``seconds`` from now, as the API signs them (a
    login's lasts ACCESS_TOKEN_EXPIRE_MINUTES, too long to outlive in a test)."""
    now = int(time.time())
    claims = {"sub": str(user_id), "iat": now, "exp": now + seconds, "jti": uuid.uuid4().hex, "auth_time": now}
    return jwt.encode(claims, settings.secret_key, algorithm="HS256")


def run_fragments(app: AppTest, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    """What the browser asks for every ``run_every``: a run of the page's parts that redraw
    themselves (``st.fragment``) alone, not of the whole script as ``AppTest.run`` runs it (AppTest
    has no way of its own to ask for one)."""
    from streamlit.testing.v1 import local_script_runner

    fragments = list(app._fragment_storage._fragments)
    assert fragments, "the page has no part that redraws itself"
    with monkeypatch.context() as patched:
        rerun = functools.partial(local_script_runner.RerunData, fragment_id_queue=fragments, is_auto_rerun=True)
        patched.setattr(local_script_runner, "RerunData", rerun)
        return app.run()


def test_watching_a_batch_keeps_the_session_past_the_tokens_lifetime(
    api_url: str, portal: tuple[str, str, str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's progress redraws itself every 2 s without the page running again; watched for
    longer than the token lasts, each redraw renews the token once half its lifetime is gone, as a
    run of the whole page does, and writes the new one to the cookie: the person stays signed in."""
    from tests.api.test_batches import noise_png

    api, batch, _ = finished_batch_page(api_url, portal, {"0.png": noise_png(660)})
    me = api.me()
    lifetime = 6
    token = short_lived_token(settings, me["id"], lifetime)
    # What ui/app.py does on each run, then the batch page; the batch is followed as if still running.
    script = (
        "import streamlit as st\nfrom ui import session\nfrom ui.client import Api\n"
        "from ui.views.batch import batch_page\n"
        "class StillRunning(Api):\n"
        "    def batch(self, batch_id):\n"
        "        return {**super().batch(batch_id), 'status': 'running'}\n"
        f"api = StillRunning({api_url!r}, st.session_state.get('token'))\n"
        "if api.token:\n"
        "    session.keep_alive(api)\n"
        "    st.sidebar.text('Signed in')\n"
        "    batch_page(api)\n"
        "else:\n"
        "    st.warning(st.session_state.get('login_message', 'the login page'))\n"
    )
    app = AppTest.from_string(script, default_timeout=60)
    app.session_state["token"] = token
    app.session_state["user"] = me
    app.session_state["token_renew_at"] = time.time() + lifetime / 2
    app.session_state["batch_id"] = batch["id"]
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    cookies: list[str] = []
    watched_until = time.time() + lifetime + 3
    while time.time() < watched_until:
        time.sleep(1)
        run_fragments(app, monkeypatch)
        assert not app.exception, app.exception
        assert "token" in app.session_state and not app.warning, [w.value for w in app.warning]
        assert not app.title, "the whole page ran, not only its progress"
        cookies += [h.proto.body for h in app.get("html") if "portal_session=" in h.proto.body]
    renewed = app.session_state["token"]
    assert renewed != token and any(renewed in c for c in cookies), cookies
    assert [b.proto.text for b in app.get("progress")] == ["1 of 1 images done"]


def _self_redrawing_part(part: str) -> None:
    import time

    import streamlit as st

    from ui.client import ApiError
    from ui.views.admin import retraining_data, training_tab
    from ui.views.batch import follow

    counts = {"images": 3, "queued": 2, "running": 0, "done": 1, "failed": 0, "cancelled": 0, "skipped": 0}
    batch = {
        "id": "b1",
        "status": "running",
        "models": ["m@1"],
        "entries": 3,
        "created_at": "2026-01-01T00:00:00Z",
        "finished_at": None,
        "counts": {**counts, "deleted": 0, "partly_answered": 0, "eta_seconds": 30},
        "waiting_for": [],
    }
    unfinished: dict[str, object] = {
        "id": "r1",
        "status": "running",
        "created_at": "2026-01-01T00:00:00Z",
        "requested_by": "a@x",
    }
    run: dict[str, object] = {
        **unfinished,
        **{"model_name": "sketch", "version": 4, "base_version": 3, "options": {"epochs": 4}, "epoch": 1},
        **{"eta_seconds": 30.0, "history": [], "promotion": None, "record": None, "error": None},
    }
    export: dict[str, object] = {
        **unfinished,
        **{"model": None, "since_last": False, "rows_done": 3, "rows_total": 10, "bytes_written": 0},
    }

    class Watched:
        """An API whose batch, training run and export are running; it counts the token's renewals."""

        token = "first"

        def refresh(self) -> dict[str, object]:
            st.session_state["renewals"] = st.session_state.get("renewals", 0) + 1
            return {"token": "renewed", "expires_in": 60}

        def me(self) -> dict[str, object]:
            return {"id": 1, "email": "a@x", "role": "admin"}

        def batch(self, batch_id: str) -> dict[str, object]:
            return batch

        def training_runs(self) -> list[dict[str, object]]:
            return [run]

        def exports(self) -> list[dict[str, object]]:
            return [export]

        def models(self) -> list[object]:
            return []

        def version_labels(self, ref: str) -> None:
            raise ApiError(404, "That item no longer exists.")

    # Signed in, and the page's full run renews nothing: the token is fresh.
    st.session_state.setdefault("token", "first")
    st.session_state.setdefault("token_renew_at", time.time() + 3600)
    api: Any = Watched()
    {"batch": lambda: follow(api, "b1"), "training": lambda: training_tab(api), "export": lambda: retraining_data(api)}[
        part
    ]()


@pytest.mark.parametrize("part", ["batch", "training", "export"])
def test_every_part_that_redraws_itself_renews_the_token(part: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's progress, the training runs and the exports redraw themselves while unfinished:
    each redraw renews the token once half its lifetime is gone, as a run of the whole page does."""
    app = AppTest.from_function(_self_redrawing_part, kwargs={"part": part}).run()
    assert not app.exception and "renewals" not in app.session_state, app.exception
    app.session_state["token_renew_at"] = 0.0  # half the token's lifetime gone
    run_fragments(app, monkeypatch)
    assert not app.exception, app.exception
    assert "renewals" in app.session_state, "the redraw did not renew the token"
    assert app.session_state["renewals"] == 1 and app.session_state["token"] == "renewed"
    run_fragments(app, monkeypatch)
    assert app.session_state["renewals"] == 1  # renewed once, not on every redraw


@pytest.mark.parametrize(
    ("seconds", "said"),
    [
        (45, "45 s"),
        (60, "1 min"),
        (200, "3 min 20 s"),
        (3599, "59 min 59 s"),
        (3600, "1 h"),
        (7311, "2 h 2 min"),
        (36_000, "10 h"),
    ],
)
def test_a_batchs_time_left_is_said_in_hours_once_it_is_long(seconds: int, said: str) -> None:
    from ui.views.batch import _progress_text, time_left

    assert time_left(seconds) == said
    counts = {"images": 700, "done": 3, "failed": 0, "cancelled": 0, "eta_seconds": seconds}
    batch = {"status": "running", "counts": counts}
    assert _progress_text(batch) == f"3 of 700 images done · about {said} left"  # type: ignore[arg-type]


def _after_login_notes(comment: str) -> None:
    import streamlit as st

    from ui.client import ApiError
    from ui.results import keep_verdict, send_unsent_verdict, show_after_login_note

    class Sending:
        def feedback(self, prediction_id: str, *args: object) -> dict[str, object]:
            if prediction_id == "gone":
                raise ApiError(404, "That item no longer exists.")
            return {}

    if "user" not in st.session_state:
        st.session_state["user"] = {"id": 424242}
        for prediction in ("p1", "gone"):
            unsent = {"user_id": 424242, "model": "MobileNetV2", "prediction_id": prediction, "is_correct": True}
            keep_verdict({**unsent, "correct_label": None, "comment": comment})
        send_unsent_verdict(Sending())  # type: ignore[arg-type]
    show_after_login_note()


def test_the_note_after_a_login_quotes_the_start_of_a_long_comment() -> None:
    comment = "The beak is too small for a macaw. " * 57
    app = AppTest.from_function(_after_login_notes, kwargs={"comment": comment}).run()
    assert not app.exception, app.exception
    start = plain(comment[:80].rstrip())
    assert [s.value for s in app.sidebar.success] == [
        f"Your verdict on MobileNetV2 was sent: right, and wrote “{start}…”."
    ]
    assert [e.value for e in app.sidebar.error] == [
        f"Your verdict on MobileNetV2, right, and wrote “{start}…”, was not sent: That item no longer exists."
    ]
    short = AppTest.from_function(_after_login_notes, kwargs={"comment": "too small"}).run()
    assert [s.value for s in short.sidebar.success] == [
        "Your verdict on MobileNetV2 was sent: right, and wrote “too small”."
    ]


def _quality_page() -> None:
    from ui.views.admin import quality_tab

    class Quality:
        def models(self) -> list[dict[str, object]]:
            return [
                {"ref": "mobilenet_v2@1", "name": "mobilenet_v2", "display_name": "MobileNetV2"},
                {"ref": "sketch@3", "name": "sketch", "display_name": "Sketch CNN, 20 categories"},
            ]

        def all_feedback(self) -> list[object]:
            return []

        def exports(self) -> list[object]:
            return []

    stats = {
        "accuracy": [
            {"model": "mobilenet_v2", "version": 1, "feedback": 3, "correct": 0, "accuracy": 0.0},
            {"model": "sketch", "version": 3, "feedback": 25, "correct": 20, "accuracy": 0.8},
        ],
        "most_corrected": [
            {
                "model": "mobilenet_v2",
                "version": 1,
                "predicted": "military_uniform",
                "corrected_to": "Boston_bull",
                "count": 2,
            },
            {"model": "mobilenet_v2", "version": 1, "predicted": "macaw", "corrected_to": None, "count": 1},
        ],
        "latency": [{"model": "sketch", "version": 3, "count": 25, "p50_ms": 9.0, "p95_ms": 12.0, "p99_ms": 15.0}],
    }
    quality_tab(Quality(), stats)  # type: ignore[arg-type]


def test_model_quality_reads_as_the_other_pages() -> None:
    """Labels in words and versions by their names, as everywhere else; an accuracy only from as
    many verdicts as the Models tab asks for."""
    from api.app.releases.service import MIN_FEEDBACK
    from ui.views.admin import MIN_VERDICTS

    assert MIN_VERDICTS == MIN_FEEDBACK
    app = AppTest.from_function(_quality_page).run()
    assert not app.exception, app.exception
    accuracy = next(d.value for d in app.dataframe if "Accuracy" in d.value.columns)
    assert list(accuracy["Accuracy"]) == ["", "80.0%"]
    assert list(accuracy["Model"]) == ["MobileNetV2", "Sketch CNN, 20 categories"]
    latency = next(d.value for d in app.dataframe if "p95 (ms)" in d.value.columns)
    assert list(latency["Model"]) == ["Sketch CNN, 20 categories"]
    corrected = next(d.value for d in app.dataframe if "People said" in d.value.columns)
    assert corrected.to_dict("records") == [
        {"Model": "MobileNetV2", "It said": "military uniform", "People said": "Boston bull", "Times": 2},
        {"Model": "MobileNetV2", "It said": "macaw", "People said": "(no label given)", "Times": 1},
    ]


def test_counts_say_one_in_the_singular() -> None:
    from ui.views.admin import _export_progress, counted

    assert (counted(1, "image"), counted(0, "image"), counted(1204, "verdict")) == (
        "1 image",
        "0 images",
        "1,204 verdicts",
    )
    export = {"status": "running", "rows_done": 1, "rows_total": 1}
    assert _export_progress(export) == "1 of 1 image"  # type: ignore[arg-type]
