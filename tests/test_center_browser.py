"""The notification center in a real browser: Debian's chromium, headless, through its own
chromedriver (``make tools`` installs both). The page is opened with a token the way
``herald dev`` prints it; a live notification travels Kafka -> ingest -> NOTIFY -> stream.

Chromium that cannot start fails this test: it never skips (CI must show a missing browser).
A screenshot is left in test-artifacts/ (ignored by git).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.api_support import add_notifications, api_settings, bearer, running_api, token
from tests.helpers import ROOT, event, produce, start_ingest

if TYPE_CHECKING:
    from tests.conftest import Backend

pytestmark = pytest.mark.integration

ARTIFACTS = ROOT / "test-artifacts"
XSS = '<img src=x onerror="document.body.dataset.pwned=1">Quarterly report ready'


def _executable(name: str, *fallbacks: str) -> str:
    for candidate in (name, *fallbacks):
        found = shutil.which(candidate)
        if found:
            return found
    pytest.fail(
        f"{name} is not installed: run `make tools` (Debian: apt-get install chromium chromium-driver)"
    )


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = _executable("chromium", "chromium-browser")
    profile = tempfile.mkdtemp(prefix="herald-chromium-")
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1000,760",
        f"--user-data-dir={profile}",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    service = Service(executable_path=_executable("chromedriver"))
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as exc:
        pytest.fail(f"chromium could not start: {exc.msg}")
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: WebDriver, what: str, check: Any, timeout: float = 10) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: check(d), message=what)


def badge(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "badge").text)


def titles(driver: WebDriver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#list .title")]


def test_the_center_in_chromium(backend: Backend, db: psycopg.Connection[Any], browser: WebDriver) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"
    add_notifications(
        db,
        user,
        3,
        start=datetime.now(UTC) - timedelta(minutes=30),
        step=timedelta(minutes=10),
        title=["Invoice INV-7 was paid", "Deploy 41 failed", XSS],
        severity=["success", "critical", "info"],
        body=[None, None, None],
    )
    settings = api_settings(backend.bootstrap, backend.database_url)
    with running_api(settings) as base:
        runner = start_ingest(settings)
        try:
            browser.get(f"{base}/#token={token(user)}")
            # The badge shows the server's count; the token left the address bar.
            wait_for(browser, "the badge to read 3", lambda d: badge(d) == "3")
            wait_for(browser, "three items", lambda d: len(titles(d)) == 3)
            assert "#token" not in browser.current_url
            # Desktop alerts: offered, but permission is asked for only on a click.
            assert browser.find_element(By.ID, "alerts").is_displayed()
            assert browser.execute_script("return Notification.permission") == "default"

            # The hostile title is text: no <img> in the list, nothing ran.
            assert titles(browser)[0] == XSS
            assert browser.find_elements(By.CSS_SELECTOR, "#list img") == []
            assert browser.execute_script("return document.body.dataset.pwned") is None

            # "Mark read": the count drops at once (optimistic), and the row is read.
            browser.find_element(By.CSS_SELECTOR, "#list .item.unread .mark").click()
            wait_for(browser, "the badge to read 2", lambda d: badge(d) == "2")
            wait_for(browser, "read_at in PostgreSQL", lambda _: unread_in_db(db, user) == 2)

            # Another device reads one: this page follows (count and row) without a reload.
            other = browser.find_elements(By.CSS_SELECTOR, "#list .item.unread")[-1]
            nid = other.get_attribute("data-id")
            r = httpx.post(f"{base}/v1/notifications/{nid}/read", headers=bearer(user), timeout=10)
            assert r.status_code == 200
            wait_for(browser, "the badge to read 1", lambda d: badge(d) == "1")
            wait_for(browser, "the row to show read", lambda d: "unread" not in other.get_attribute("class"))

            # A live one: Kafka -> ingest -> NOTIFY -> stream -> the page, no reload.
            produce(
                settings,
                [
                    event(
                        user_id=user,
                        title="Build 7 passed",
                        summary="All 214 tests green on main.",
                        target_url="/builds/7",
                        severity="success",
                    )
                ],
            )
            wait_for(browser, "the live notification", lambda d: "Build 7 passed" in titles(d), timeout=30)
            wait_for(browser, "the badge to read 2", lambda d: badge(d) == "2")
            assert titles(browser)[0] == "Build 7 passed"  # newest first
            link = browser.find_element(By.CSS_SELECTOR, "#list .item a.title")
            assert link.get_attribute("href") == f"{base}/builds/7"

            ARTIFACTS.mkdir(exist_ok=True)
            time.sleep(1.8)  # let the arrival highlight fade before the picture
            assert browser.save_screenshot(str(ARTIFACTS / "notification-center.png"))

            # "Mark all read", by keyboard: zero at once, and PostgreSQL agrees.
            browser.find_element(By.ID, "read-all").send_keys(Keys.ENTER)
            wait_for(browser, "the badge to read 0", lambda d: badge(d) == "0")
            wait_for(browser, "all read in PostgreSQL", lambda _: unread_in_db(db, user) == 0)
            assert browser.find_elements(By.CSS_SELECTOR, "#list .item.unread") == []
        finally:
            runner.stop()


def unread_in_db(db: psycopg.Connection[Any], user: str) -> int:
    row = db.execute(
        "SELECT count(*) FROM notifications WHERE user_id = %s AND read_at IS NULL", (user,)
    ).fetchone()
    assert row is not None
    return int(row[0])
