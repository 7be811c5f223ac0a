"""The browser UI at /ui: how it is served (no key for its files, its headers, nothing from
elsewhere, shipped as package data), and, in headless Chromium over a fake engine, the
playground, the dashboard and the metrics arithmetic the page does itself.

Browser tests need Chromium and chromedriver (`apt-get install chromium chromium-driver`) and
selenium (the `dev` extra); without them they are skipped, saying so.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import threading
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from aligner.alignment import check_profile_alignment
from aligner.profiles import ProfileStore
from aligner.store import Store
from aligner.strategies import describe_strategies
from server.app import build_app
from server.config import ServerConfig, StoreConfig
from server.ui import UI_DIR, UI_HEADERS
from tests.fakes import FakeEngine

KEY = "ui-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPO = Path(__file__).resolve().parents[3]
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
CHROMIUM_HINT = ("browser tests skipped: they need Chromium and chromedriver (Debian/Ubuntu: `apt-get install "
                 "chromium chromium-driver`; CI's .ci/run installs them) and selenium (`pip install -e .[dev]`)")


def make_app(api_key: str | None = KEY, store=None, profiles=None):
    config = ServerConfig(served_model_name="fake-model", api_key=api_key,
                          store=StoreConfig(traces=store is not None))
    return build_app(FakeEngine(max_model_len=1024), config, start_engine=False, store=store, profiles=profiles)


# -- serving the files ----------------------------------------------------------------------


def test_the_page_and_its_files_need_no_key_but_the_api_still_does():
    client = TestClient(make_app())
    r = client.get("/ui", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].endswith("/ui/")
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="key-panel"' in page.text
    script = client.get("/ui/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert client.get("/v1/models").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/v1/models", headers=AUTH).status_code == 200


def test_a_path_that_only_starts_like_the_ui_is_not_let_through():
    client = TestClient(make_app())
    for path in ("/uix", "/ui-admin", "/v1/ui/x"):
        assert client.get(path).status_code == 401, path


def test_dot_segments_under_ui_never_reach_the_api():
    """The key check exempts `/ui/...` by prefix; an ASGI path with dot segments is routed to
    the static files (which refuse to leave their folder), not to the API."""
    import asyncio

    app = make_app()
    sent = []

    async def call(path):
        scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [], "root_path": "", "scheme": "http", "server": ("x", 80), "http_version": "1.1"}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)

    for path in ("/ui/../v1/models", "/ui/../metrics", "/ui/%2e%2e/metrics", "/ui/../../etc/passwd"):
        sent.clear()
        asyncio.run(call(path))
        assert sent[0]["status"] == 404, path
        assert b"not_found" in b"".join(m.get("body", b"") for m in sent[1:])


def test_the_ui_headers_forbid_anything_from_elsewhere():
    r = TestClient(make_app(api_key=None)).get("/ui/")
    for name, value in UI_HEADERS.items():
        assert r.headers[name] == value
    assert "default-src 'self'" in r.headers["content-security-policy"]


def ui_files() -> list[Path]:
    return sorted(p for p in UI_DIR.rglob("*") if p.is_file())


def test_every_file_the_page_loads_is_shipped_and_nothing_comes_from_elsewhere():
    names = {p.name for p in ui_files()}
    assert {"index.html", "app.js", "style.css"} <= names
    html = (UI_DIR / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert (UI_DIR / ref).is_file(), ref
    for path in ui_files():
        text = path.read_text().replace(SVG_NAMESPACE, "")  # a name, never fetched
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), f"{path.name} names another site"
        for module in re.findall(r'from "\./([^"]+)"', text):
            assert (UI_DIR / module).is_file(), f"{path.name} imports missing {module}"
        assert len(text.splitlines()) < 400, f"{path.name} is too long to read"
    assert "<script>" not in html and " style=" not in html  # the CSP allows no inline code or style


def test_the_files_are_package_data():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["server"]
    shipped = {p.relative_to(UI_DIR.parent).as_posix() for p in ui_files()}
    matched = {s for s in shipped if any(Path(s).match(p) for p in patterns)}
    assert matched == shipped


# -- in a browser -----------------------------------------------------------------------------


def chromium_driver(width: int = 1280, height: int = 800):
    """A headless Chromium (the system's), or a skip that says how to get one."""
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip(CHROMIUM_HINT)
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip(CHROMIUM_HINT)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}"):
        options.add_argument(argument)
    if os.geteuid() == 0:  # CI runs as root, where Chromium's sandbox cannot start
        options.add_argument("--no-sandbox")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """An app served by uvicorn on a thread, for a browser to load."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served():
    with ThreadedServer(make_app()) as running:
        yield running


@pytest.fixture(scope="module")
def driver():
    browser = chromium_driver()
    yield browser
    browser.quit()


def wait_for(driver, script: str, timeout: float = 60):
    """Poll a JS expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        if time.monotonic() > deadline:
            shown = driver.execute_script("return document.body.innerText.slice(0, 1500)")
            raise AssertionError(f"timed out waiting for: {script}\nthe page shows:\n{shown}")
        time.sleep(0.1)


def console_errors(driver) -> list[str]:
    """Script errors the page logged; HTTP errors it was given (a 401, a refused column) are
    logged by the browser too and are not the page's fault."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and "Failed to load resource" not in e["message"]]


def open_with_key(driver, base: str, key: str = KEY):
    driver.get(f"{base}/ui/")
    wait_for(driver, "document.body.dataset.ready === 'true' || !document.querySelector('#key-panel').hidden")
    driver.execute_script("sessionStorage.setItem('aligner.apiKey', arguments[0]);", key)
    driver.refresh()
    wait_for(driver, "document.body.dataset.ready === 'true'")


def test_the_page_asks_for_the_key_refuses_a_wrong_one_and_keeps_the_right_one(served, driver):
    from selenium.webdriver.common.by import By

    driver.get(f"{served.url}/ui/")
    driver.execute_script("sessionStorage.clear();")
    driver.get(f"{served.url}/ui/")
    wait_for(driver, "!document.querySelector('#key-panel').hidden")
    assert not driver.find_element(By.ID, "app").is_displayed()
    box = driver.find_element(By.ID, "key-input")
    assert driver.switch_to.active_element == box
    box.send_keys("wrong-key\n")
    wait_for(driver, "document.querySelector('#key-status').textContent.includes('invalid API key')")
    assert driver.execute_script("return sessionStorage.getItem('aligner.apiKey')") is None
    driver.find_element(By.ID, "key-input").send_keys(KEY + "\n")
    wait_for(driver, "document.body.dataset.ready === 'true'")
    assert driver.find_element(By.ID, "server-model").text == "Model: fake-model"
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert loaded and all(url.startswith(served.url + "/") for url in loaded), loaded
    driver.refresh()  # the key outlives a reload of the tab, in session storage
    wait_for(driver, "document.body.dataset.ready === 'true'")
    assert driver.find_element(By.ID, "key-panel").is_displayed() is False
    assert console_errors(driver) == []


def test_each_strategy_form_has_one_labelled_field_per_parameter(served, driver):
    from selenium.webdriver.support.select import Select

    open_with_key(driver, served.url)
    column = driver.find_element("css selector", ".column")
    choice = Select(column.find_element("css selector", "select"))
    for strategy in describe_strategies():
        choice.select_by_value(f"strategy:{strategy['name']}")
        shown = [f.get_attribute("data-param") for f in column.find_elements("css selector", ".params .field")]
        assert shown == list(strategy["parameters"]["properties"]), strategy["name"]
    unlabelled = driver.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button')]
          .filter((n) => n.offsetParent !== null || n.type === 'checkbox')
          .filter((n) => !(n.labels && n.labels.length) && !n.getAttribute('aria-label') && !n.textContent.trim())
          .map((n) => n.outerHTML.slice(0, 80));""")
    assert unlabelled == []


def test_the_keyboard_reaches_every_control_in_reading_order(served, driver):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_with_key(driver, served.url)
    driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);")
    reached = []
    for _ in range(40):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        reached.append(driver.execute_script(
            "const a = document.activeElement; return a.id || a.textContent.trim().slice(0, 20);"))
    expected = ["Skip to content", "nav-playground", "nav-dashboard", "forget-key", "system", "message", "model",
                "max-tokens", "temperature", "seed", "trace", "send", "add-column", "Remove", "col1-choice", "Parameters"]
    assert reached[:len(expected)] == expected
    assert "col2-choice" in reached
    ActionChains(driver).send_keys(Keys.SHIFT, Keys.TAB).perform()  # a keyboard user sees where focus is
    ring = driver.execute_script("const a = document.activeElement; "
                                 "return [a.matches(':focus-visible'), getComputedStyle(a).outlineStyle]")
    assert ring == [True, "solid"]


def set_best_of_n(driver, column, n: int, reward: str):
    driver.execute_script("arguments[0].querySelector('details.params-box').open = true;", column)
    field = column.find_element("css selector", '[data-param="n"] input')
    field.clear()
    field.send_keys(str(n))
    field = column.find_element("css selector", '[data-param="reward"] input')
    field.clear()
    field.send_keys(reward)
    box = column.find_element("css selector", '[data-param="return_candidates"] input')
    if not box.is_selected():
        box.click()


def shown_candidates(column) -> list[dict]:
    return column.parent.execute_script("""
        return [...arguments[0].querySelectorAll('li.candidate')].map((li) => ({
          index: Number(li.dataset.index), selected: li.classList.contains('selected'),
          text: li.querySelector('.candidate-text').textContent,
          score: Number(li.querySelector('.score').dataset.value),
          scores: Object.fromEntries([...li.querySelectorAll('.reward-score')]
                    .map((s) => [s.dataset.reward, Number(s.dataset.value)]))}));""", column)


def test_two_columns_run_together_and_show_the_candidates_scores_the_api_gives(served, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_with_key(driver, served.url)
    columns = driver.find_elements(By.CSS_SELECTOR, ".column")
    assert [c.find_element(By.TAG_NAME, "select").get_attribute("value") for c in columns] == \
        ["strategy:none", "strategy:best_of_n"]
    set_best_of_n(driver, columns[1], 3, "length_penalty=1, keyword:w0_1=0.5")
    message = driver.find_element(By.ID, "message")
    message.send_keys("hello there")
    message.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard shortcut sends every column
    wait_for(driver, "document.querySelector('#send-status').textContent.startsWith('Done')")
    assert driver.find_element(By.ID, "send-status").text == "Done."
    plain, best = columns
    assert plain.find_element(By.CSS_SELECTOR, ".answer").text.startswith("w0_0")
    assert plain.find_element(By.CSS_SELECTOR, '[data-stat="relative"]').text == "baseline"
    assert best.find_element(By.CSS_SELECTOR, '[data-stat="tokens"]').text != "—"
    assert "× " not in best.find_element(By.CSS_SELECTOR, '[data-stat="relative"]').text
    assert best.find_element(By.CSS_SELECTOR, '[data-stat="relative"]').text.startswith("×")
    candidates = shown_candidates(best)
    assert len(candidates) == 3 and sum(c["selected"] for c in candidates) == 1
    api = httpx.post(f"{served.url}/v1/alignment/score", headers=AUTH, json={
        "messages": [{"role": "user", "content": "hello there"}], "responses": [c["text"] for c in candidates],
        "reward": {"length_penalty": 1, "keyword:w0_1": 0.5}}).json()
    for i, shown in enumerate(candidates):
        assert shown["score"] == pytest.approx(api["scores"][i])
        assert shown["scores"] == pytest.approx({name: values[i] for name, values in api["per_reward"].items()})
    best_score = max(c["score"] for c in candidates)
    assert next(c for c in candidates if c["selected"])["score"] == best_score
    answer = best.find_element(By.CSS_SELECTOR, ".answer").get_attribute("textContent")
    assert answer == next(c["text"] for c in candidates if c["selected"])
    assert console_errors(driver) == []


def test_a_refused_column_shows_the_servers_error_and_the_others_still_answer(served, driver):
    from selenium.webdriver.common.by import By

    open_with_key(driver, served.url)
    columns = driver.find_elements(By.CSS_SELECTOR, ".column")
    set_best_of_n(driver, columns[1], 99, "length_penalty")
    driver.find_element(By.ID, "message").send_keys("hello")
    driver.find_element(By.ID, "send").click()
    wait_for(driver, "document.querySelector('#send-status').textContent.startsWith('Done')")
    assert driver.find_element(By.ID, "send-status").text == "Done: 1 of 2 columns failed."
    error = columns[1].find_element(By.CSS_SELECTOR, "[role=alert]").text
    assert "n must be at most" in error and "alignment.n" in error
    assert columns[0].find_element(By.CSS_SELECTOR, ".answer").text


def test_columns_are_one_to_four(served, driver):
    from selenium.webdriver.common.by import By

    open_with_key(driver, served.url)
    add = driver.find_element(By.ID, "add-column")
    add.click()
    add.click()
    assert len(driver.find_elements(By.CSS_SELECTOR, ".column")) == 4 and not add.is_enabled()
    for button in driver.find_elements(By.CSS_SELECTOR, ".column .remove")[:3]:
        button.click()
    assert len(driver.find_elements(By.CSS_SELECTOR, ".column")) == 1
    assert not driver.find_element(By.CSS_SELECTOR, ".column .remove").is_enabled() and add.is_enabled()


def send_and_wait(driver, message: str = "hello"):
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "message").send_keys(message)
    driver.find_element(By.ID, "send").click()
    wait_for(driver, "document.querySelector('#send-status').textContent.startsWith('Done')")


def test_a_rating_the_server_refuses_shows_its_reason(served, driver):
    from selenium.webdriver.common.by import By

    open_with_key(driver, served.url)
    send_and_wait(driver)
    driver.find_element(By.CSS_SELECTOR, '.column [data-rating="4"]').click()
    wait_for(driver, "document.querySelector('.column .rating .feedback-status').dataset.recorded")
    status = driver.find_element(By.CSS_SELECTOR, ".column .rating .feedback-status")
    assert status.get_attribute("data-recorded") == "false"
    assert status.text.startswith("Not recorded (404)") and "--store-traces" in status.text  # no store here


PROFILES = """\
profiles:
  tone:
    - version: 1
      alignment: {strategy: none}
    - version: 2
      alignment: {strategy: best_of_n, n: 2, reward: length_penalty}
experiments:
  tone-test:
    arms: [{profile: tone@1, weight: 1}, {profile: tone@2, weight: 1}]
  x-routed:
    unit: router
    router: x-router
    arms: [{profile: tone@1}, {profile: tone@2}]
"""


@pytest.fixture(scope="module")
def served_with_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-store")
    (root / "profiles.yaml").write_text(PROFILES)
    profiles = ProfileStore.load(root / "profiles.yaml", check_profile_alignment)
    store = Store.open(f"sqlite:///{root / 'store.db'}")
    with ThreadedServer(make_app(store=store, profiles=profiles)) as running:
        yield running
    store.close()


def test_ratings_and_a_preferred_candidate_are_recorded_in_the_store(served_with_store, driver):
    from selenium.webdriver.common.by import By

    base = served_with_store.url
    open_with_key(driver, base)
    plain, best = driver.find_elements(By.CSS_SELECTOR, ".column")
    set_best_of_n(driver, best, 3, "length_penalty")
    send_and_wait(driver)
    assert "Stored on the server" in plain.text
    plain.find_element(By.CSS_SELECTOR, '[data-rating="4"]').click()
    best.find_element(By.CSS_SELECTOR, '[data-thumbs="down"]').click()
    best.find_element(By.CSS_SELECTOR, 'li.candidate[data-index="2"] button.prefer').click()
    wait_for(driver, "[...document.querySelectorAll('.feedback-status')].filter((s) => s.dataset.recorded === 'true')"
                     ".length === 3")
    assert plain.find_element(By.CSS_SELECTOR, ".rating .feedback-status").text.startswith("Recorded: 4 of 5")
    assert best.find_element(By.CSS_SELECTOR, ".candidates > .feedback-status").text.startswith(
        "Recorded: candidate 2 preferred")
    ids = [c.find_element(By.CSS_SELECTOR, ".response-id code").text for c in (plain, best)]
    stored = [httpx.get(f"{base}/v1/alignment/traces/{i}", headers=AUTH).json()["feedback"] for i in ids]
    assert [(f["kind"], f["rating"], f["rating_scale"]) for f in stored[0]] == [("rating", 4, "stars")]
    assert sorted((f["kind"], f["rating"], f["preferred_candidate"]) for f in stored[1]) == \
        [("preference", None, 2), ("rating", -1, None)]
    # The same click again is the same feedback (the page's client key), not a second row.
    plain.find_element(By.CSS_SELECTOR, '[data-rating="4"]').click()
    wait_for(driver, "document.querySelector('.column .rating .feedback-status').dataset.recorded === 'true'")
    assert len(httpx.get(f"{base}/v1/alignment/traces/{ids[0]}", headers=AUTH).json()["feedback"]) == 1


def test_the_dashboard_counts_requests_per_strategy(served, driver):
    from selenium.webdriver.common.by import By

    open_with_key(driver, served.url)
    set_best_of_n(driver, driver.find_elements(By.CSS_SELECTOR, ".column")[1], 2, "length_penalty")
    send_and_wait(driver)
    assert driver.find_element(By.ID, "send-status").text == "Done."
    driver.find_element(By.ID, "nav-dashboard").send_keys("\n")  # keyboard, not a click
    wait_for(driver, "document.querySelector('#strategy-table')")
    assert driver.switch_to.active_element.get_attribute("id") == "dashboard-title"
    rows = driver.execute_script("""return Object.fromEntries([...document.querySelectorAll('#strategy-table tbody tr')]
        .map((tr) => [tr.dataset.strategy, [...tr.children].map((c) => c.textContent)]))""")
    metrics = httpx.get(f"{served.url}/metrics", headers=AUTH).text
    for strategy in ("none", "best_of_n"):
        count = re.search(rf'aligner_request_seconds_count{{strategy="{strategy}"}} (\S+)', metrics).group(1)
        assert rows[strategy][1] == str(int(float(count))) and int(float(count)) >= 1
    assert driver.find_elements(By.CSS_SELECTOR, "#dash-body figure.chart svg[role=img]")
    assert console_errors(driver) == []


def test_the_page_fits_a_phone_width(served):
    phone = chromium_driver(width=390, height=844)
    try:
        open_with_key(phone, served.url)
        overflow = phone.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
        columns = phone.execute_script("return [...document.querySelectorAll('.column')].map((c) => c.getBoundingClientRect().left)")
        assert len(set(columns)) == 1  # stacked, not side by side
    finally:
        phone.quit()


def test_the_dashboard_shows_an_experiments_arms_as_the_server_reports_them(served_with_store, driver):
    from selenium.webdriver.common.by import By

    base = served_with_store.url
    for i in range(12):  # users hash onto both arms (3 of them onto tone@1); each answer is rated
        answer = httpx.post(f"{base}/v1/chat/completions", headers=AUTH, json={
            "model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3 + i,
            "user": f"user-{i}", "alignment": {"experiment": "tone-test"}}).json()
        feedback = httpx.post(f"{base}/v1/alignment/feedback", headers=AUTH,
                              json={"id": answer["id"], "rating": 1 + i % 5})
        assert feedback.status_code == 200, feedback.text
    report = httpx.get(f"{base}/v1/alignment/experiments/tone-test", headers=AUTH).json()
    assert all(arm["requests"] >= 2 for arm in report["arms"])
    open_with_key(driver, base)
    driver.find_element(By.ID, "nav-dashboard").click()
    wait_for(driver, "document.querySelector('table.experiment-arms')")
    rows = driver.execute_script("""return [...document.querySelectorAll('table.experiment-arms tbody tr')]
        .map((tr) => [...tr.children].map((c) => c.textContent))""")
    assert [r[0] for r in rows] == ["tone@1", "tone@2"]
    for row, arm in zip(rows, report["arms"], strict=True):
        assert row[1] == str(arm["requests"])
        low, high = arm["rating"]["ci95"]
        assert row[3] == str(arm["rating"]["n"])
        assert row[4] == f"{arm['rating']['mean']:.3f} [{low:.3f}, {high:.3f}]"
        assert row[7].startswith(f"{arm['completion_tokens']['mean']:.1f} [")
    charts = driver.find_elements(By.CSS_SELECTOR, "#experiment-body figure.chart")
    assert [c.find_element(By.TAG_NAME, "figcaption").text for c in charts] == \
        ["Rating (0-1)", "Win rate", "Tokens per answer", "Latency p50"]
    assert charts[0].find_elements(By.CSS_SELECTOR, "line.chart-interval")  # the intervals are drawn
    assert "Against tone@1" in driver.find_element(By.ID, "experiment-body").text
    srm = driver.find_element(By.CSS_SELECTOR, "#experiment-body p.sample-ratio").text
    units = report["sample_ratio"]["units"]
    assert srm.startswith(f"Sample ratio: tone@1 {units['tone@1']}, tone@2 {units['tone@2']} units;")
    assert ("MISMATCH" in srm) == report["sample_ratio"]["mismatch"]
    assert console_errors(driver) == []


def test_a_routed_experiment_says_its_arms_are_not_a_randomized_comparison(served_with_store, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    base = served_with_store.url
    for i in range(4):
        answer = httpx.post(f"{base}/v1/chat/completions", headers=AUTH, json={
            "model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "alignment": {"experiment": "x-routed"}}).json()
        assert answer["alignment"]["experiment"]["unit"] == "router"
    open_with_key(driver, base)
    driver.find_element(By.ID, "nav-dashboard").click()
    wait_for(driver, "document.querySelector('table.experiment-arms')")
    Select(driver.find_element(By.ID, "experiment-name")).select_by_value("x-routed")
    driver.find_element(By.CSS_SELECTOR, "#experiment-form button, #experiment-form [type=submit]").click()
    wait_for(driver, "document.querySelector('#experiment-body p.router-note')")
    note = driver.find_element(By.CSS_SELECTOR, "#experiment-body p.router-note").text
    assert "learned router x-router (at least 10% spread evenly)" in note and "not a randomized comparison" in note
    assert not driver.find_elements(By.CSS_SELECTOR, "#experiment-body p.sample-ratio")
    assert console_errors(driver) == []


def test_a_profile_column_sends_the_profile_and_its_overrides(served_with_store, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    open_with_key(driver, served_with_store.url)
    column = driver.find_elements(By.CSS_SELECTOR, ".column")[0]
    Select(column.find_element(By.TAG_NAME, "select")).select_by_value("profile:tone@2")
    assert '"best_of_n"' in column.find_element(By.CSS_SELECTOR, "pre.profile").get_attribute("textContent")
    driver.execute_script("arguments[0].querySelector('details.params-box').open = true;", column)
    column.find_element(By.CSS_SELECTOR, '[data-param="return_candidates"] input').click()
    driver.find_elements(By.CSS_SELECTOR, ".column .remove")[1].click()
    send_and_wait(driver)
    assert driver.find_element(By.ID, "send-status").text == "Done."
    assert column.find_element(By.CSS_SELECTOR, '[data-stat="strategy"]').text == "best_of_n (body:profile tone@2)"
    assert len(shown_candidates(column)) == 2
    assert column.find_element(By.CSS_SELECTOR, '[data-stat="relative"]').text == "add a none column to compare"


def test_without_experiments_the_dashboard_says_so(served, driver):
    from selenium.webdriver.common.by import By

    open_with_key(driver, served.url)
    driver.find_element(By.ID, "nav-dashboard").click()
    wait_for(driver, "document.querySelector('#experiment-body').textContent")
    assert driver.find_element(By.ID, "experiment-body").text == "This server's profiles file defines no experiments."
    assert not driver.find_element(By.ID, "experiment-form").is_displayed()


# -- the page's own arithmetic, run in the browser -------------------------------------------


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """PromQL's histogram_quantile over cumulative (le, count) buckets, +Inf last."""
    total = buckets[-1][1]
    rank = q * total
    for i, (le, count) in enumerate(buckets):
        if count >= rank:
            if math.isinf(le):
                return buckets[i - 1][0]
            lower, below = (buckets[i - 1] if i else (0.0, 0.0))
            return lower + (le - lower) * (rank - below) / (count - below)
    raise AssertionError


def run_module(driver, base: str, module: str, body: str):
    """Import /ui/<module> in the page and run `body` (which sees it as `m`)."""
    return driver.execute_async_script(f"""
        const done = arguments[arguments.length - 1];
        import('/ui/{module}').then((m) => done((() => {{ {body} }})())).catch((e) => done('error: ' + e));""")


def test_quantiles_and_the_summary_match_prometheus_arithmetic(served, driver):
    driver.get(f"{served.url}/ui/")
    buckets = [(0.05, 0), (0.1, 2), (0.25, 2), (0.5, 7), (1.0, 9), (2.0, 10), (math.inf, 11)]
    js_buckets = json.dumps([{"le": le if not math.isinf(le) else "Infinity", "count": c} for le, c in buckets])
    for q in (0.1, 0.5, 0.9, 0.99):
        got = run_module(driver, served.url, "prometheus.js", f"""
            const b = {js_buckets}.map((x) => ({{le: Number(x.le), count: x.count}}));
            return m.histogramQuantile({q}, b);""")
        assert got == pytest.approx(histogram_quantile(q, buckets)), q
    text = "\n".join([
        "# HELP aligner_request_seconds End-to-end request latency.",
        *[f'aligner_request_seconds_bucket{{le="{"+Inf" if math.isinf(le) else le}",strategy="best_of_n"}} {c}.0'
          for le, c in buckets],
        'aligner_request_seconds_count{strategy="best_of_n"} 11.0',
        'aligner_request_seconds_sum{strategy="best_of_n"} 9.5',
        'aligner_generated_tokens_total{strategy="best_of_n"} 440.0',
        'aligner_fallbacks_total{strategy="best_of_n"} 2.0',
        'aligner_errors_total{type="invalid_request_error"} 3.0',
        'aligner_errors_total{type="a \\"quoted\\" type"} 1.0',
    ])
    summary = run_module(driver, served.url, "prometheus.js",
                         f"return m.strategySummary(m.parseMetrics({json.dumps(text)}));")
    assert len(summary) == 1 and summary[0]["strategy"] == "best_of_n"
    assert summary[0]["requests"] == 11 and summary[0]["tokensPerRequest"] == 40 and summary[0]["fallbacks"] == 2
    assert summary[0]["latency"]["0.9"] == pytest.approx(histogram_quantile(0.9, buckets))
    assert summary[0]["meanLatency"] == pytest.approx(9.5 / 11)
    errors = run_module(driver, served.url, "prometheus.js",
                        f"return m.byLabel(m.parseMetrics({json.dumps(text)}), 'aligner_errors_total', 'type');")
    assert errors == [["invalid_request_error", 3], ['a "quoted" type', 1]]


def test_what_a_strategy_reports_is_shown_guided_steps_fallback_and_budget(served, driver):
    driver.get(f"{served.url}/ui/")
    shown = run_module(driver, served.url, "results.js", """
        const box = document.createElement('div');
        document.body.append(box);
        const handle = m.startResult(box);
        m.finishResult(handle, {id: 'chatcmpl-1', text: 'hi', pieces: 3, ttft_s: 0.1, latency_s: 0.4,
          usage: {completion_tokens: 12},
          alignment: {strategy: 'guided', source: 'body', guided_steps: 12,
                      fallback: {reward: 'helpful', error: 'timeout'}, budget: {exhausted: 'deadline'}}});
        return Object.fromEntries([...box.querySelectorAll('dd')].map((d) => [d.dataset.stat, d.textContent]));""")
    assert shown["guided_steps"] == "12 steps" and shown["tokens"] == "12" and shown["pieces"] == "in 3 pieces"
    assert shown["fallback"] == '{"reward":"helpful","error":"timeout"}' and shown["budget"] == "stopped at deadline"
    assert shown["ttft"] == "100 ms" and shown["latency"] == "400 ms" and shown["strategy"] == "guided (body)"


def test_reward_fields_read_a_name_weights_or_json(served, driver):
    driver.get(f"{served.url}/ui/")
    got = run_module(driver, served.url, "schema_form.js", """
        return ["helpful", "a=1, b=0.5", "{\\"x\\": 2}", "only,"].map((t) => m.parseReward(t));""")
    assert got == ["helpful", {"a": 1, "b": 0.5}, {"x": 2}, {"only": 1}]
