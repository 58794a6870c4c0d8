"""A real browser through the portal: log in, upload a photo, see a prediction, send feedback.

Debian's headless Chromium driven by Selenium; a screenshot of each step is kept in
test-artifacts/browser/.
"""

from __future__ import annotations

import itertools
import shutil
import sys
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import ARTIFACTS, PHOTOS, free_port, service

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
    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element(By.TAG_NAME, "body").text)


def scroll_to(driver: WebDriver, text: str) -> None:
    element = driver.find_element(By.XPATH, f"//*[contains(text(), '{text}')]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)


def click_button(driver: WebDriver, label: str, timeout: float = 30) -> None:
    xpath = f"//button[.//p[normalize-space()='{label}'] or normalize-space()='{label}']"
    WebDriverWait(driver, timeout).until(ec.element_to_be_clickable((By.XPATH, xpath))).click()


def log_in(browser: WebDriver, ui_url: str, portal: tuple[str, str, str], screenshots: bool = False) -> None:
    browser.get(ui_url)
    text_appears(browser, "Image classification portal")
    wait = WebDriverWait(browser, 30)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[aria-label='Email']"))).send_keys(portal[1])
    browser.find_element(By.CSS_SELECTOR, "input[aria-label='Password']").send_keys(portal[2])
    if screenshots:
        shot(browser, "1-login")
    click_button(browser, "Log in")
    text_appears(browser, "Classify a photo")
    if screenshots:
        shot(browser, "2-signed-in")


def test_login_upload_predict_feedback(browser: WebDriver, ui_url: str, portal: tuple[str, str, str]) -> None:
    log_in(browser, ui_url, portal, screenshots=True)
    wait = WebDriverWait(browser, 30)

    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type='file']")))
    text_appears(browser, "10MB per file")  # the API's limit, not Streamlit's 200MB
    upload.send_keys(str(PHOTOS / "parrot.jpg"))
    text_appears(browser, "mobilenet_v2@1")
    shot(browser, "3-uploaded")
    # People get the app without Streamlit's developer menu (shown on localhost unless told).
    assert browser.find_elements(By.CSS_SELECTOR, "[data-testid='stToolbar']")
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='stAppDeployButton']")
    click_button(browser, "Classify")
    text_appears(browser, "Top prediction", timeout=90)
    text_appears(browser, "macaw")
    scroll_to(browser, "Top prediction")
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
    WebDriverWait(browser, 30).until_not(lambda d: "Top prediction" in d.find_element(By.TAG_NAME, "body").text)
    assert "feedback was recorded" not in browser.find_element(By.TAG_NAME, "body").text


def test_draw_a_sketch_and_classify_it(browser: WebDriver, ui_url: str, portal: tuple[str, str, str]) -> None:
    import time

    from selenium.webdriver.common.action_chains import ActionChains

    log_in(browser, ui_url, portal)
    nav = (By.CSS_SELECTOR, "a[data-testid='stSidebarNavLink'][href$='/sketch']")
    WebDriverWait(browser, 30).until(ec.element_to_be_clickable(nav)).click()
    text_appears(browser, "Draw a sketch")
    host = WebDriverWait(browser, 30).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stBidiComponentIsolated']"))
    )
    canvas = WebDriverWait(browser, 30).until(
        lambda d: host.shadow_root.find_elements(By.CSS_SELECTOR, "canvas.upper-canvas") or False
    )[0]
    # A diamond, drawn as one stroke around the centre of the 280x280 canvas (offsets from its centre).
    corners = [(0, -100), (70, 0), (0, 100), (-70, 0), (0, -100)]
    actions = ActionChains(browser).move_to_element_with_offset(canvas, *corners[0]).click_and_hold()
    for (x0, y0), (x1, y1) in itertools.pairwise(corners):
        for step in range(1, 11):
            actions.move_to_element_with_offset(canvas, x0 + (x1 - x0) * step // 10, y0 + (y1 - y0) * step // 10)
    actions.release().perform()
    # The canvas sends the drawing to the app, which reruns; a click during that rerun is dropped.
    time.sleep(1)
    WebDriverWait(browser, 30).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']"))
    shot(browser, "6-sketch-drawn")
    click_button(browser, "Predict")
    text_appears(browser, "Top prediction", timeout=60)
    scroll_to(browser, "Top prediction")
    shot(browser, "7-sketch-prediction")
    metrics = [m.text for m in browser.find_elements(By.CSS_SELECTOR, "[data-testid='stMetricValue']")]
    assert metrics and all(m == "diamond" for m in metrics), metrics


def test_an_admin_watches_the_models_and_compares_two_versions(
    browser: WebDriver, ui_url: str, portal: tuple[str, str, str]
) -> None:
    log_in(browser, ui_url, portal)
    nav = (By.CSS_SELECTOR, "a[data-testid='stSidebarNavLink'][href$='/admin']")
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
