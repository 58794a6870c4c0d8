"""A real browser through the portal: log in, upload a photo, see a prediction, send feedback.

Debian's headless Chromium driven by Selenium; a screenshot of each step is kept in
test-artifacts/browser/.
"""

from __future__ import annotations

import io
import itertools
import shutil
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver, WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import ARTIFACTS, PHOTOS, free_port, service
from ui.client import Api

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("chromedriver") is None,
    reason="Debian's chromium and chromium-driver are not installed (make browser)",
)
SHOTS = ARTIFACTS / "browser"


@pytest.fixture(scope="module")
def ui_url(portal: tuple[str, str, str]) -> Iterator[str]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    env = {"API_URL": portal[0], "UI_PORT": str(port), "UI_HOST": "127.0.0.1"}
    ui = service("browser-ui", [sys.executable, "-m", "ui"], env, ready=up)
    try:
        yield url
    finally:
        ui.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=DriverService(shutil.which("chromedriver")))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def shot(driver: WebDriver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def text_appears(driver: WebDriver, text: str, timeout: float = 60) -> None:
    """Waits for ``text`` on the page; a timeout says what the page showed instead."""
    try:
        WebDriverWait(driver, timeout).until(lambda d: text in d.find_element(By.TAG_NAME, "body").text)
    except TimeoutException:
        shown = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"{text!r} not shown within {timeout} s; the page showed:\n{shown[-3000:]}") from None


def scroll_to(driver: WebDriver, text: str) -> None:
    element = driver.find_element(By.XPATH, f"//*[contains(text(), '{text}')]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)


def click_button(driver: WebDriver, label: str, timeout: float = 30) -> None:
    xpath = f"//button[.//p[normalize-space()='{label}'] or normalize-space()='{label}']"
    WebDriverWait(driver, timeout).until(ec.element_to_be_clickable((By.XPATH, xpath))).click()


def tick(driver: WebDriver, label: str) -> None:
    """Ticks the check box labelled ``label``."""
    xpath = f"//*[@data-testid='stCheckbox']//label[contains(normalize-space(), '{label}')]"
    WebDriverWait(driver, 30).until(ec.element_to_be_clickable((By.XPATH, xpath))).click()


def answers(driver: WebDriver) -> list[str]:
    """The top answer of each result card (its large heading)."""
    headings = driver.find_elements(By.CSS_SELECTOR, "[data-testid='stMarkdownContainer'] h3")
    return [h.text for h in headings if h.text != "Results"]


def forget_session(browser: WebDriver) -> None:
    """Leaves the app (so that no page of it writes its cookie again) and clears the cookies."""
    browser.get("about:blank")
    browser.execute_cdp_cmd("Network.clearBrowserCookies", {})


def fill_login(browser: WebDriver, portal: tuple[str, str, str]) -> None:
    wait = WebDriverWait(browser, 30)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[aria-label='Email']"))).send_keys(portal[1])
    browser.find_element(By.CSS_SELECTOR, "input[aria-label='Password']").send_keys(portal[2])


def log_in(browser: WebDriver, ui_url: str, portal: tuple[str, str, str], screenshots: bool = False) -> None:
    forget_session(browser)  # a session kept from an earlier test would skip the login
    browser.get(ui_url)
    text_appears(browser, "Image classification portal")
    fill_login(browser, portal)
    if screenshots:
        shot(browser, "1-login")
    click_button(browser, "Log in")
    text_appears(browser, "Classify a photo")
    if screenshots:
        shot(browser, "2-signed-in")


def test_login_upload_predict_feedback(browser: WebDriver, ui_url: str, portal: tuple[str, str, str]) -> None:
    log_in(browser, ui_url, portal, screenshots=True)
    wait = WebDriverWait(browser, 30)
    sidebar = browser.find_element(By.CSS_SELECTOR, "[data-testid='stSidebar']")
    assert f"Signed in as {portal[1]}" in sidebar.text
    assert not sidebar.find_elements(By.CSS_SELECTOR, "a[href^='mailto:']")  # no link to write to oneself

    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type='file']")))
    # The API's limit, not Streamlit's 200MB: 10 MiB in the uploader's megabytes of 10^6 bytes,
    # rounded up (the page itself refuses the bytes past 10 MiB).
    text_appears(browser, "11MB per file")
    upload.send_keys(str(PHOTOS / "parrot.jpg"))
    text_appears(browser, "MobileNetV2")  # models by the names people read
    shot(browser, "3-uploaded")
    # People get the app without Streamlit's developer menu (shown on localhost unless told).
    assert browser.find_elements(By.CSS_SELECTOR, "[data-testid='stToolbar']")
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='stAppDeployButton']")
    click_button(browser, "Classify")
    text_appears(browser, "confident", timeout=90)
    assert "macaw" in answers(browser)
    shot(browser, "4-prediction")

    # Nothing is preselected: sending before choosing asks for a verdict.
    click_button(browser, "Send feedback")
    text_appears(browser, "Choose Correct or Wrong first.")
    browser.find_element(By.XPATH, "//label[.//p[text()='Correct']]").click()
    click_button(browser, "Send feedback")
    text_appears(browser, "feedback was recorded")
    scroll_to(browser, "feedback was recorded")
    shot(browser, "5-feedback")
    # Another photo: the parrot's results and feedback form go with the parrot.
    upload = browser.find_element(By.CSS_SELECTOR, "input[type='file']")
    upload.send_keys(str(PHOTOS / "cat.bmp"))
    WebDriverWait(browser, 30).until_not(lambda d: "confident" in d.find_element(By.TAG_NAME, "body").text)
    assert "feedback was recorded" not in browser.find_element(By.TAG_NAME, "body").text
    assert not answers(browser)
    # The models stay chosen for the next photo: it is classified as the first was.
    text_appears(browser, "cat.bmp")
    shot(browser, "6-second-photo")
    assert ticked(browser, "MobileNetV2")
    click_button(browser, "Classify")
    text_appears(browser, "confident", timeout=90)
    assert answers(browser)
    # Removed, then another one: still chosen.
    remove = browser.find_element(By.CSS_SELECTOR, "[data-testid='stFileChipDeleteBtn']")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", remove)
    remove.click()
    text_appears(browser, "Upload a photo, or try an example, to begin.")
    browser.find_element(By.CSS_SELECTOR, "input[type='file']").send_keys(str(PHOTOS / "parrot.jpg"))
    text_appears(browser, "parrot.jpg")
    shot(browser, "7-third-photo")
    assert ticked(browser, "MobileNetV2")


def ticked(driver: WebDriver, label: str) -> bool:
    """Whether the check box labelled ``label`` is ticked."""
    xpath = f"//*[@data-testid='stCheckbox'][.//label[contains(normalize-space(), '{label}')]]//input"
    return bool(WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.XPATH, xpath))).is_selected())


def sketch_canvas(browser: WebDriver) -> tuple[WebElement, WebElement]:
    """The drawing canvas of the sketch page, and the element holding it."""
    host = WebDriverWait(browser, 30).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stBidiComponentIsolated']"))
    )
    canvas = WebDriverWait(browser, 30).until(
        lambda d: host.shadow_root.find_elements(By.CSS_SELECTOR, "canvas.upper-canvas") or False
    )[0]
    return host, canvas


def draw(browser: WebDriver, canvas: WebElement, points: list[tuple[int, int]]) -> None:
    """One stroke through ``points`` (offsets from the canvas's centre), then the rerun it causes."""

    actions = ActionChains(browser).move_to_element_with_offset(canvas, *points[0]).click_and_hold()
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        for step in range(1, 11):
            actions.move_to_element_with_offset(canvas, x0 + (x1 - x0) * step // 10, y0 + (y1 - y0) * step // 10)
    actions.release().perform()
    # The canvas sends the drawing to the app, which reruns; a click during that rerun is dropped.
    time.sleep(1)
    WebDriverWait(browser, 30).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']"))


def ink(element: WebElement) -> int:
    """Dark pixels in a screenshot of ``element``."""
    import numpy as np
    from PIL import Image

    return int((np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("L")) < 100).sum())


def test_draw_a_sketch_and_classify_it(browser: WebDriver, ui_url: str, portal: tuple[str, str, str]) -> None:
    log_in(browser, ui_url, portal)
    nav = (By.CSS_SELECTOR, "[data-testid='stSidebar'] a[href$='sketch']")
    WebDriverWait(browser, 30).until(ec.element_to_be_clickable(nav)).click()
    text_appears(browser, "Draw a sketch")
    host, canvas = sketch_canvas(browser)
    # The whole canvas shows in its column at 1,400 px: a narrower column cut off its right edge.
    assert host.size["width"] >= canvas.size["width"], (host.size, canvas.size)
    # A diamond, drawn as one stroke around the centre of the 280x280 canvas.
    draw(browser, canvas, [(0, -100), (70, 0), (0, 100), (-70, 0), (0, -100)])
    shot(browser, "6-sketch-drawn")
    click_button(browser, "Predict")
    text_appears(browser, "confident", timeout=60)
    shot(browser, "7-sketch-prediction")
    found = answers(browser)
    assert found and all(m == "diamond" for m in found), found


def test_a_first_stroke_stays_on_a_sketch_page_loaded_afresh(
    browser: WebDriver, ui_url: str, portal: tuple[str, str, str]
) -> None:
    """Loaded afresh, a page takes the session back from the cookie and writes the renewed token
    into it on that first run only. That script once sat in the main area: the rerun a first
    stroke causes moved the canvas, which was mounted anew and lost the stroke."""
    log_in(browser, ui_url, portal)
    browser.get(f"{ui_url}/sketch")
    text_appears(browser, "Draw a sketch")
    draw(browser, sketch_canvas(browser)[1], [(-80, -60), (80, -60)])
    first = ink(sketch_canvas(browser)[0])
    draw(browser, sketch_canvas(browser)[1], [(-80, 40), (80, 40)])
    both = ink(sketch_canvas(browser)[0])
    shot(browser, "6b-two-strokes")
    assert first > 500 and both > 1.8 * first, (first, both)


def open_from_the_menu(browser: WebDriver, url_path: str, heading: str) -> None:
    """Opens a page by its link in the sidebar, as a person does (the session goes on)."""
    link = (By.CSS_SELECTOR, f"[data-testid='stSidebar'] a[href$='{url_path}']")
    WebDriverWait(browser, 30).until(ec.element_to_be_clickable(link)).click()
    text_appears(browser, heading)


def canvas_ink(browser: WebDriver) -> int:
    """Dark pixels on the sketch canvas, once it is laid out (mounted anew, it has no width for a
    moment, and a screenshot of it fails)."""
    host = WebDriverWait(browser, 30).until(lambda _: (found := sketch_canvas(browser)[0]).size["width"] and found)
    return ink(host)


def test_a_sketch_and_its_results_stay_when_the_page_is_left_and_opened_again(
    browser: WebDriver, ui_url: str, portal: tuple[str, str, str]
) -> None:
    """As a photo and its results stay on the Classify page. The canvas is mounted anew when the
    page is opened again: it came back blank, and the results went with the drawing."""
    log_in(browser, ui_url, portal)
    open_from_the_menu(browser, "sketch", "Draw a sketch")
    draw(browser, sketch_canvas(browser)[1], [(-70, -70), (70, -70), (70, 70), (-70, 70), (-70, -70)])
    drawn = canvas_ink(browser)
    click_button(browser, "Predict")
    text_appears(browser, "confident", timeout=60)
    found = answers(browser)
    assert found, found
    open_from_the_menu(browser, "history", "My uploads")
    open_from_the_menu(browser, "sketch", "Draw a sketch")
    text_appears(browser, "confident")
    assert answers(browser) == found
    WebDriverWait(browser, 30, ignored_exceptions=(WebDriverException,)).until(
        lambda _: canvas_ink(browser) > 0.9 * drawn
    )
    shot(browser, "6c-sketch-kept")
    # Drawn on further, the canvas keeps both (given its strokes back once, not on every run);
    # the results went with the drawing they answered.
    draw(browser, sketch_canvas(browser)[1], [(-40, 0), (40, 0)])
    more = canvas_ink(browser)
    assert more > drawn, (drawn, more)
    assert not answers(browser)
    time.sleep(2)  # a canvas given its strokes again on the next run would lose the new one
    assert canvas_ink(browser) >= 0.95 * more
    # Cleared, then left and opened again: blank, with nothing answered.
    click_button(browser, "Clear")
    WebDriverWait(browser, 30, ignored_exceptions=(WebDriverException,)).until(
        lambda _: canvas_ink(browser) < 0.1 * drawn
    )
    open_from_the_menu(browser, "history", "My uploads")
    open_from_the_menu(browser, "sketch", "Draw a sketch")
    text_appears(browser, "Draw, choose the models and press Predict")
    time.sleep(2)  # what a canvas is given to draw is drawn after it shows
    assert canvas_ink(browser) < 0.1 * drawn


def test_an_admin_watches_the_models_and_compares_two_versions(
    browser: WebDriver, ui_url: str, portal: tuple[str, str, str]
) -> None:
    log_in(browser, ui_url, portal)
    nav = (By.CSS_SELECTOR, "[data-testid='stSidebar'] a[href$='admin']")
    WebDriverWait(browser, 30).until(ec.element_to_be_clickable(nav)).click()
    text_appears(browser, "Administration")
    tab = (By.XPATH, "//*[@role='tab'][.//p[normalize-space()='Models']]")
    WebDriverWait(browser, 30).until(ec.element_to_be_clickable(tab)).click()
    text_appears(browser, "Traffic weights")
    shot(browser, "8-models")
    text_appears(browser, "Compare two versions")
    scroll_to(browser, "Compare two versions")
    text_appears(browser, "(margin 2%)")  # the verdict under the comparison
    shot(browser, "9-comparison")
    tab = (By.XPATH, "//*[@role='tab'][.//p[normalize-space()='Training']]")
    scroll_to(browser, "Training")
    WebDriverWait(browser, 30).until(ec.element_to_be_clickable(tab)).click()
    text_appears(browser, "Train a new version")
    shot(browser, "10-training")


def chosen(browser: WebDriver, label: str, form_button: str | None = None) -> str:
    """The value a select box labelled ``label`` shows (in the form with the button ``form_button``)."""
    scope = f"//div[@data-testid='stForm'][.//button[normalize-space()='{form_button}']]" if form_button else ""
    # The page draws its widgets one after another: the box may come a moment after the heading.
    field = WebDriverWait(browser, 30).until(
        ec.presence_of_element_located((By.XPATH, f"{scope}//input[@role='combobox'][@aria-label='{label}']"))
    )
    return str(field.get_attribute("value"))


def users_form(browser: WebDriver, ui_url: str, portal: tuple[str, str, str], heading: str) -> None:
    """Signed in as the admin, the admin page's Users tab scrolled to the form under ``heading``."""
    log_in(browser, ui_url, portal)
    browser.get(f"{ui_url}/admin")
    tab = (By.XPATH, "//*[@role='tab'][.//p[normalize-space()='Users']]")
    WebDriverWait(browser, 30).until(ec.element_to_be_clickable(tab)).click()
    text_appears(browser, heading)
    scroll_to(browser, heading)


def test_the_change_user_form_shows_the_real_role(
    browser: WebDriver, ui_url: str, portal: tuple[str, str, str]
) -> None:
    users_form(browser, ui_url, portal, "Change a user")
    # The first user listed is the admin who signed in: the form says so, not "user".
    assert chosen(browser, "User").startswith(portal[1]), chosen(browser, "User")
    assert chosen(browser, "Role", form_button="Save") == "admin"
    shot(browser, "11-change-user")


def test_a_user_created_on_the_admin_page_empties_the_form_in_the_browser(
    browser: WebDriver, ui_url: str, portal: tuple[str, str, str]
) -> None:
    """The fields are emptied where the person sees them: a browser keeps what a field holds unless
    the page sets it, and sends it back with the next submit."""
    users_form(browser, ui_url, portal, "Create a user")
    form = "//div[@data-testid='stForm'][.//button[normalize-space()='Create']]"
    email = f"carol-{int(time.time() * 1000)}@example.com"
    for label, value in (("Email", email), ("Name", "Carol"), ("Password", "a-long-password-1")):
        browser.find_element(By.XPATH, f"{form}//input[@aria-label='{label}']").send_keys(value)
    click_button(browser, "Create")
    text_appears(browser, f"Created {email}.")
    shot(browser, "11b-user-created")
    fields = {
        label: browser.find_element(By.XPATH, f"{form}//input[@aria-label='{label}']").get_attribute("value")
        for label in ("Email", "Name", "Password")
    }
    assert fields == {"Email": "", "Name": "", "Password": ""}, fields


def test_a_session_survives_a_reload_and_a_deep_link_waits_for_the_login(
    browser: WebDriver, ui_url: str, portal: tuple[str, str, str]
) -> None:
    forget_session(browser)
    browser.get(f"{ui_url}/history")
    text_appears(browser, "Image classification portal")  # the login, in the page's place
    assert "Page not found" not in browser.find_element(By.TAG_NAME, "body").text
    fill_login(browser, portal)
    click_button(browser, "Log in")
    text_appears(browser, "My uploads")  # the page the link named, right after the login
    assert browser.current_url.endswith("/history")
    cookie = browser.get_cookie("portal_session")
    assert cookie is not None and cookie["sameSite"] == "Strict" and cookie["value"].count(".") == 2

    browser.refresh()
    text_appears(browser, "My uploads")
    assert not browser.find_elements(By.CSS_SELECTOR, "input[aria-label='Password']")

    click_button(browser, "Log out")
    text_appears(browser, "Image classification portal")
    WebDriverWait(browser, 10).until(lambda d: d.get_cookie("portal_session") is None)
    browser.refresh()
    text_appears(browser, "Image classification portal")
    WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[aria-label='Password']")))


def test_a_link_to_the_classify_page_opens_it(browser: WebDriver, ui_url: str, portal: tuple[str, str, str]) -> None:
    """The first page is served at "/" and at its own address, as every other page is, and the
    menu lists it once."""
    log_in(browser, ui_url, portal)
    browser.get(f"{ui_url}/classify")
    text_appears(browser, "Classify a photo")
    assert "Page not found" not in browser.find_element(By.TAG_NAME, "body").text
    links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "[data-testid='stSidebar'] a")]
    assert links.count("Classify") == 1, links


PAGES = {
    "classify": "Classify a photo",
    "sketch": "Draw a sketch",
    "batch": "Classify a collection",
    "history": "My uploads",
    "api-keys": "API keys",
    "admin": "Administration",
}


@pytest.mark.parametrize("width", [1400, 390])
def test_every_page_at_desktop_and_phone_widths(
    browser: WebDriver, ui_url: str, portal: tuple[str, str, str], width: int
) -> None:
    """Screenshots of every page at 1400 px and 390 px wide; nothing wider than the screen."""
    browser.set_window_size(width, 1000)
    try:
        forget_session(browser)
        browser.get(ui_url)
        text_appears(browser, "Image classification portal")
        shot(browser, f"{width}px-login")
        fill_login(browser, portal)
        click_button(browser, "Log in")
        text_appears(browser, "Classify a photo")
        click_button(browser, "Honeycomb")
        tick(browser, "Bird species (iNaturalist)")  # two models: the comparison table shows
        click_button(browser, "Classify")
        text_appears(browser, "confident", timeout=90)
        assert "honeycomb" in answers(browser)
        text_appears(browser, "Agrees")
        # Every column of the comparison is on the screen, not scrolled out of sight inside it.
        headers = browser.find_elements(By.CSS_SELECTOR, "[data-testid='stTable'] th")
        edges = [browser.execute_script("return arguments[0].getBoundingClientRect().right", h) for h in headers]
        seen = browser.execute_script("return document.documentElement.clientWidth")
        assert [h.text for h in headers][-4:] == ["Model", "Answer", "Confidence", "Agrees"], [h.text for h in headers]
        assert max(edges) <= seen, (edges, seen)
        # And so with a name of no spaces: its cells break anywhere.
        wraps = browser.execute_script("return getComputedStyle(arguments[0]).overflowWrap", headers[-1])
        assert wraps == "anywhere", wraps
        for path, title in PAGES.items():
            if path != "classify":
                browser.get(f"{ui_url}/{path}")
                text_appears(browser, title)
            time.sleep(1)  # charts and tables lay themselves out after the text
            full = browser.execute_script("return document.documentElement.scrollWidth")
            assert full <= width, f"{path} is {full} px wide at {width} px"
            shot(browser, f"{width}px-{path}")
    finally:
        browser.set_window_size(1400, 1000)


def test_a_collection_as_a_zip(
    browser: WebDriver, ui_url: str, portal: tuple[str, str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.api.test_batches import noise_png, zipped

    archive = tmp_path_factory.mktemp("batch") / "collection.zip"
    archive.write_bytes(zipped({**{f"{i}.png": noise_png(700 + i) for i in range(6)}, "notes.txt": b"not an image"}))
    log_in(browser, ui_url, portal)
    browser.get(f"{ui_url}/batch")
    text_appears(browser, "Classify a collection")
    upload = WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type='file']")))
    upload.send_keys(str(archive))
    text_appears(browser, "collection.zip")
    click_button(browser, "Start the batch")
    url, email, password = portal
    token = httpx.post(f"{url}/v1/auth/login", data={"username": email, "password": password}).json()["access_token"]
    try:
        text_appears(browser, "6 of 6 images done", timeout=120)
    except AssertionError as shown:
        # What the API says of the batch tells a slow lane from a page that does not redraw.
        listed = httpx.get(f"{url}/v1/batches", headers={"Authorization": f"Bearer {token}"}).json()
        raise AssertionError(f"{shown}\nthe admin's batches, newest first: {listed}") from None
    text_appears(browser, "1 file skipped")
    text_appears(browser, "Download the results (CSV)")
    shot(browser, "12-batch")
    # A second click on the same dropped files shows their batch; it does not send a copy.
    listed = httpx.get(f"{url}/v1/batches", headers={"Authorization": f"Bearer {token}"}).json()
    click_button(browser, "Start the batch")
    text_appears(browser, "These files were sent already")
    text_appears(browser, "6 of 6 images done")
    again = httpx.get(f"{url}/v1/batches", headers={"Authorization": f"Bearer {token}"}).json()
    assert again["count"] == listed["count"] and again["data"][0]["id"] == listed["data"][0]["id"], (listed, again)


def test_a_double_click_on_make_key_shows_the_one_key_it_made(
    browser: WebDriver, ui_url: str, portal: tuple[str, str, str]
) -> None:
    """Both clicks reach the page before it has redrawn: one key is made, and its secret is shown."""
    log_in(browser, ui_url, portal)
    browser.get(f"{ui_url}/api-keys")
    text_appears(browser, "Make a key")
    name = f"double-{int(time.time() * 1000)}"
    # The form's heading is drawn before its fields: on a busy host the field comes a moment later.
    field = WebDriverWait(browser, 60).until(ec.element_to_be_clickable((By.CSS_SELECTOR, "input[aria-label='Name']")))
    field.send_keys(name, Keys.TAB)
    # The name is the page's once the field has let go of it and the page has redrawn with it: on
    # a busy host a redraw that came while it was typed drew the field anew, empty.
    WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "input[aria-label='Name']").get_attribute("value") == name
    )
    xpath = "//button[.//p[normalize-space()='Make key'] or normalize-space()='Make key']"
    button = WebDriverWait(browser, 30).until(ec.element_to_be_clickable((By.XPATH, xpath)))
    ActionChains(browser).double_click(button).perform()
    text_appears(browser, "Copy it now")
    # Drawn after the key's code block: the notice is whole (on a busy host the code came a moment
    # after the line above it).
    text_appears(browser, "Shown until you press")
    shot(browser, "api-key-double-click")
    codes = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "[data-testid='stCode'] code")]
    token = Api(portal[0]).login(portal[1], portal[2])["token"]
    made = [k for k in Api(portal[0], token).api_keys() if k["name"] == name]
    assert len(made) == 1 and len(codes) == 1 and codes[0].startswith(made[0]["prefix"]), (made, codes)
    assert "Give the key a name" not in browser.find_element(By.TAG_NAME, "body").text
