"""The page at `/` of `metalm serve` (`metalm/serve/static/`), in a real browser: headless
Chromium (the Debian package) driven by Selenium against a server in a subprocess. It
creates a task from a file, classifies texts, scores a labeled file and draws the
confusion matrix, deletes the task, and shows a wrong API key's refusal. Without the
key the page and its script are served, the API is not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from run_tools import write_csv

from .conftest import API_KEY, small_server

EXAMPLES = [
    ("set an alarm for six", "alarm"),
    ("wake me up at seven", "alarm"),
    ("what is the weather in paris", "weather"),
    ("will it rain tomorrow", "weather"),
]

CHROMEDRIVER = shutil.which("chromedriver")


def test_the_page_is_served_without_the_key(locked):
    page = locked.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/ui/app.js">' in page.text
    script = locked.get("/ui/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert locked.get("/tasks").status_code == 401


@pytest.fixture
def browser():
    if CHROMEDRIVER is None:
        pytest.fail("chromedriver is missing: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait_status(driver, kind: str, timeout: float = 60) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, timeout).until(lambda _: status.get_attribute("class") == kind)
    return status.text


@pytest.mark.slow
def test_the_page_in_a_real_browser(browser, model_dir, tmp_path):
    from selenium.webdriver.common.by import By

    server = small_server(model_dir, tmp_path / "tasks", extra=("--api-key", API_KEY))
    try:
        examples = write_csv(tmp_path / "examples.csv", EXAMPLES)
        labeled = write_csv(
            tmp_path / "labeled.csv", [("alarm at noon", "alarm"), ("is it sunny", "weather")]
        )
        browser.get(server.url + "/")
        assert "metalm" in browser.title
        assert "401" in _wait_status(browser, "error")  # no key yet: the task list is refused

        key = browser.find_element(By.ID, "api-key")
        key.send_keys("wrong-key")
        browser.find_element(By.ID, "examples-file").send_keys(str(examples))
        browser.find_element(By.ID, "create").click()
        assert "401" in _wait_status(browser, "error")

        key.clear()
        key.send_keys(API_KEY)
        browser.find_element(By.ID, "create").click()
        assert "2 classes, 4 examples" in _wait_status(browser, "ok")
        rows = browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")
        assert len(rows) == 1 and "alarm, weather" in rows[0].text

        # two of the task's own examples: the tiny random model puts each in its class
        browser.find_element(By.ID, "texts").send_keys(
            "set an alarm for six\nwill it rain tomorrow"
        )
        browser.find_element(By.ID, "classify").click()
        assert "2 texts classified" in _wait_status(browser, "ok")
        predictions = browser.find_elements(By.CSS_SELECTOR, "#predictions tr.prediction")
        assert [p.find_elements(By.TAG_NAME, "td")[1].text for p in predictions] == [
            "alarm",
            "weather",
        ]
        assert "%" in predictions[0].text

        browser.find_element(By.ID, "score-file").send_keys(str(labeled))
        browser.find_element(By.ID, "score").click()
        _wait_status(browser, "ok")
        assert "macro-F1" in browser.find_element(By.ID, "score-summary").text
        cells = browser.find_elements(By.CSS_SELECTOR, "#confusion svg rect.confusion-cell")
        assert len(cells) == 4  # 2 classes × 2

        browser.find_element(By.CSS_SELECTOR, "#tasks button.delete").click()
        assert "deleted" in _wait_status(browser, "ok")
        assert not browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")
        assert not list(Path(tmp_path / "tasks").iterdir())
    finally:
        server.stop()
