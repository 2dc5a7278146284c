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
from tests.helpers.service import AUTH, SMALL_SIM, simulate_and_train, transaction
from tests.serve.test_console import PASSWORD, served

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


REASONS = (
    "score 0.7312 >= review threshold 0.5",
    "customer__amount_ratio__30d = 5.2 raised the fraud log-odds by 1.234",
    "terminal__fraud_rate__28d = 0.12 raised the fraud log-odds by 0.801",
    "customer__count__1h = 4 raised the fraud log-odds by 0.412",
)


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
        # Opened first, with these reasons: a case the service would open has its own.
        console.open("tx-2", "tx-1", amount=250.0, reasons=REASONS)
        with console.client() as api:
            # Card c1's month: eight transactions, tx-4 (at tx-1's terminal) a known fraud.
            for i in range(1, 9):
                tx = transaction(
                    i, amount=[250.0, 250.0, 31.0, 18.5, 44.0, 27.0, 90.0, 12.0][i - 1]
                )
                assert api.post("/v1/decisions", json=tx, headers=AUTH).is_success
            label = {"transaction_id": "tx-4", "is_fraud": 1}
            assert api.post("/v1/labels", json=label, headers=AUTH).is_success
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(console.live.url + "/console/login")
                page.get_by_label("User name").fill("ann")
                page.get_by_label("Password").fill(PASSWORD)
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_url("**/console/queue")
                opened = int(page.locator("#count-open").inner_text())
                assert opened >= 2
                no_sideways_scroll = "document.documentElement.scrollWidth <= window.innerWidth"
                assert page.evaluate(no_sideways_scroll)
                page.screenshot(path=str(tmp_path / "queue.png"), full_page=True)

                page.locator("#take-next").click()
                page.wait_for_url("**/console/cases/*")
                main = page.inner_text("main")
                assert "amount 5.2x the card's 30-day mean (raises the risk)" in main
                assert "tx-1" in main  # the higher priority of the two
                assert page.locator("svg.chart circle").count() == 8
                assert "tx-4" in page.inner_text("#terminal-frauds")
                assert page.evaluate(no_sideways_scroll)
                page.screenshot(path=str(tmp_path / "case.png"), full_page=True)
                fits = "e => [e.scrollWidth, e.clientWidth]"  # the history's box too
                scroll_width, width = page.locator("div.scroll").evaluate(fits)
                assert scroll_width <= width

                page.get_by_label("Note (required)", exact=True).fill(
                    "cardholder confirmed it was stolen"
                )
                page.locator("#confirm-fraud").click()
                page.wait_for_url("**/console/queue*")
                assert int(page.locator("#count-open").inner_text()) == opened - 1
                assert "closed" in page.inner_text(".message")
            finally:
                browser.close()
        labels = read_labels(console.settings.audit_path)
        assert labels["transaction_id"].to_list() == ["tx-4", "tx-1"]  # the API's, the verdict's
        assert labels["is_fraud"].to_list() == [1, 1] and labels["applied"].to_list() == [True] * 2
    for shot in ("queue.png", "case.png"):
        assert (tmp_path / shot).stat().st_size > 0
