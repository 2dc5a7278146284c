"""The review console in a real browser: headless Chromium (Debian's ``chromium`` package,
installed by ``.ci/run``) driven by Playwright for Python, against the real app on loopback.

An analyst signs in, takes the next case, reads it, marks it fraud with a note and sees the
queue shrink; screenshots of the queue and the case page are kept in the test's tmp folder.
Playwright's own browser downloads are never used: the system Chromium is launched by path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fraudflow.serve.audit import read_labels
from tests.serve.test_api import AUTH, SMALL_SIM, simulate_and_train, transaction
from tests.serve.test_console import PASSWORD, served

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run = simulate_and_train(tmp_path_factory.mktemp("browser"), SMALL_SIM)
    return run


@pytest.fixture
def chromium() -> str:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: .ci/run installs Debian's chromium package")
    return CHROMIUM


def test_an_analyst_signs_in_takes_a_case_and_marks_it_fraud(
    run_dir: Path, tmp_path: Path, chromium: str
) -> None:
    for console in served(run_dir, tmp_path / "data"):
        with console.client() as api:
            for i in (1, 2):
                assert api.post("/v1/decisions", json=transaction(i), headers=AUTH).is_success
        console.open("tx-2", "tx-1", amount=250.0, reasons=("amount 5.2x the card's mean",))
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(console.live.url + "/console/login")
                page.get_by_label("User name").fill("ann")
                page.get_by_label("Password").fill(PASSWORD)
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_url("**/console/queue")
                assert page.locator("#count-open").inner_text() == "2"
                no_sideways_scroll = "document.documentElement.scrollWidth <= window.innerWidth"
                assert page.evaluate(no_sideways_scroll)
                page.screenshot(path=str(tmp_path / "queue.png"), full_page=True)

                page.locator("#take-next").click()
                page.wait_for_url("**/console/cases/*")
                assert "amount 5.2x the card's mean" in page.inner_text("main")
                assert "tx-1" in page.inner_text("main")  # the higher priority of the two
                assert page.evaluate(no_sideways_scroll)
                page.screenshot(path=str(tmp_path / "case.png"), full_page=True)

                page.get_by_label("Note (required)", exact=True).fill(
                    "cardholder confirmed it was stolen"
                )
                page.locator("#confirm-fraud").click()
                page.wait_for_url("**/console/queue*")
                assert page.locator("#count-open").inner_text() == "1"
                assert "closed" in page.inner_text(".message")
            finally:
                browser.close()
        labels = read_labels(console.settings.audit_path)
        assert labels["transaction_id"].to_list() == ["tx-1"]
        assert labels["is_fraud"].to_list() == [1] and labels["applied"].to_list() == [True]
    for shot in ("queue.png", "case.png"):
        assert (tmp_path / shot).stat().st_size > 0
