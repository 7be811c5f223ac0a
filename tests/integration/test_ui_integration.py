"""The browser UI against the real server (vLLM on the default model), in headless Chromium:
the key asked for and kept, two columns (`none` streamed token by token, `best_of_n` with its
candidates) whose scores equal the API's, a rating found in the store, the dashboard counting
the requests. Skipped, saying how to enable it, where Chromium or chromedriver is missing.

`ALIGNER_UI_SCREENSHOTS=docs` also writes the README's screenshots there.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from aligner.store import Store
from tests.conftest import MODEL, STORE_SERVER_KEY
from tests.unit.server.test_ui import (chromium_driver, console_errors, open_with_key, set_best_of_n, shown_candidates,
                                      wait_for)

KEY = STORE_SERVER_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGE = "Say hello to me with enthusiasm!"
REWARD = {"exclaim": 1.0, "length_penalty": 1.0}


@pytest.fixture(scope="module")
def ui_server(store_server):
    """The shared keyed server with a store (`tests.conftest.store_server`)."""
    return store_server


@pytest.fixture(scope="module")
def browser():
    driver = chromium_driver(1280, 800)  # or a skip, before the server's minute of start-up
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def run(browser, ui_server):
    """The playground's two starting columns, `none` and `best_of_n` (3 candidates shown),
    sent once from the page; the tests below read what it shows."""
    from selenium.webdriver.common.by import By

    open_with_key(browser, ui_server.base_url, KEY)
    plain, best = browser.find_elements(By.CSS_SELECTOR, ".column")
    set_best_of_n(browser, best, 3, "exclaim=1, length_penalty=1")
    browser.execute_script("arguments[0].querySelector('details.params-box').open = false;", best)
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("24")
    browser.find_element(By.ID, "message").send_keys(MESSAGE)
    browser.find_element(By.ID, "send").click()
    wait_for(browser, "document.querySelector('#send-status').textContent.startsWith('Done')", timeout=300)
    return plain, best


def stat(column, name: str):
    from selenium.webdriver.common.by import By

    return column.find_element(By.CSS_SELECTOR, f'[data-stat="{name}"]')


def test_without_the_key_the_page_asks_for_it_and_with_it_shows_the_model(browser, ui_server):
    from selenium.webdriver.common.by import By

    assert httpx.get(f"{ui_server.base_url}/ui/").status_code == 200  # the files need no key
    assert httpx.get(f"{ui_server.v1}/models").status_code == 401
    browser.get(f"{ui_server.base_url}/ui/")
    wait_for(browser, "!document.querySelector('#key-panel').hidden")
    assert not browser.find_element(By.ID, "app").is_displayed()
    browser.find_element(By.ID, "key-input").send_keys("not-the-key\n")
    wait_for(browser, "document.querySelector('#key-status').textContent.includes('invalid API key')")
    browser.find_element(By.ID, "key-input").send_keys(KEY + "\n")
    wait_for(browser, "document.body.dataset.ready === 'true'")
    assert browser.find_element(By.ID, "server-model").text == f"Model: {MODEL}"
    assert browser.execute_script("return sessionStorage.getItem('aligner.apiKey')") == KEY
    assert console_errors(browser) == []


def test_plain_streams_token_by_token_and_best_of_n_answers_whole(run):
    plain, best = run
    assert plain.find_element("css selector", ".answer").text.strip()
    assert int(stat(plain, "pieces").get_attribute("data-value")) > 1
    assert int(stat(best, "pieces").get_attribute("data-value")) == 1
    assert stat(plain, "relative").text == "baseline"
    assert re.fullmatch(r"×\d+\.\d tokens, ×\d+\.\d time", stat(best, "relative").text)
    for column in run:
        assert float(stat(column, "latency").get_attribute("data-value")) > 0
        assert float(stat(column, "ttft").get_attribute("data-value")) <= float(
            stat(column, "latency").get_attribute("data-value"))


def test_the_candidates_scores_on_the_page_are_the_apis(run, ui_server, browser):
    plain, best = run
    candidates = shown_candidates(best)
    assert len(candidates) == 3 and [c["index"] for c in candidates] == [0, 1, 2]
    assert all(set(c["scores"]) == set(REWARD) for c in candidates)
    api = httpx.post(f"{ui_server.v1}/alignment/score", headers=AUTH, timeout=60, json={
        "messages": [{"role": "user", "content": MESSAGE}], "responses": [c["text"] for c in candidates],
        "reward": REWARD}).json()
    for i, shown in enumerate(candidates):
        assert shown["score"] == pytest.approx(api["scores"][i], abs=1e-9)
        assert shown["scores"] == pytest.approx({name: values[i] for name, values in api["per_reward"].items()})
    # What the server stored for this answer is what the page shows (the response as sent).
    response_id = best.find_element("css selector", ".response-id code").text
    trace = httpx.get(f"{ui_server.v1}/alignment/traces/{response_id}", headers=AUTH, timeout=30).json()
    assert [c["score"] for c in trace["candidates"]] == pytest.approx([c["score"] for c in candidates])
    chosen = [c for c in candidates if c["selected"]]
    assert len(chosen) == 1 and chosen[0]["index"] == trace["selected"][0]
    assert chosen[0]["score"] == max(c["score"] for c in candidates)
    assert best.find_element("css selector", ".answer").get_attribute("textContent") == chosen[0]["text"]
    assert int(stat(best, "tokens").text) == trace["usage"]["completion_tokens"]
    assert console_errors(browser) == []


def test_a_rating_on_an_answer_is_found_in_the_store(run, ui_server, browser):
    plain, best = run
    plain.find_element("css selector", '[data-rating="5"]').click()
    best.find_element("css selector", 'li.candidate[data-index="1"] button.prefer').click()
    wait_for(browser, "[...document.querySelectorAll('.feedback-status')]"
                      ".filter((s) => s.dataset.recorded === 'true').length === 2", timeout=30)
    assert plain.find_element("css selector", ".rating .feedback-status").text.startswith("Recorded: 5 of 5")
    ids = [c.find_element("css selector", ".response-id code").text for c in run]
    store = Store.open(ui_server.store_url)
    try:
        rating, = store.feedback_for(ids[0])
        preference, = store.feedback_for(ids[1])
    finally:
        store.close()
    assert (rating["kind"], rating["rating"], rating["rating_scale"]) == ("rating", 5, "stars")
    assert (preference["kind"], preference["preferred_index"]) == ("preference", 1)


def save_screenshot(driver, name: str, tmp_path: Path) -> Path:
    """The whole page at 1280 wide, into tmp_path and, with ALIGNER_UI_SCREENSHOTS, there too."""
    chrome, height = driver.execute_script(
        "window.scrollTo(0, 0); return [window.outerHeight - window.innerHeight, document.documentElement.scrollHeight]")
    driver.set_window_size(1280, min(max(height, 800), 2000) + chrome)
    path = tmp_path / name
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 800)
    if os.environ.get("ALIGNER_UI_SCREENSHOTS"):
        target = Path(os.environ["ALIGNER_UI_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def test_the_dashboard_counts_the_requests(run, ui_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    assert save_screenshot(browser, "ui-playground.png", tmp_path).stat().st_size > 10_000
    browser.find_element(By.ID, "nav-dashboard").click()
    wait_for(browser, "document.querySelector('#strategy-table')")
    rows = browser.execute_script("""return Object.fromEntries([...document.querySelectorAll('#strategy-table tbody tr')]
        .map((tr) => [tr.dataset.strategy, [...tr.children].map((c) => c.textContent)]))""")
    metrics = httpx.get(f"{ui_server.base_url}/metrics", headers=AUTH).text
    for strategy in ("none", "best_of_n"):
        count = float(re.search(rf'aligner_request_seconds_count{{strategy="{strategy}"}} (\S+)', metrics).group(1))
        assert count >= 1 and rows[strategy][1] == str(int(count))
    assert browser.find_elements(By.CSS_SELECTOR, "#dash-body figure.chart svg[role=img]")
    assert "traces written" in browser.find_element(By.ID, "dash-body").text
    assert save_screenshot(browser, "ui-dashboard.png", tmp_path).stat().st_size > 10_000
    assert console_errors(browser) == []
