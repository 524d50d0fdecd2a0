"""The web UI of `stepwell serve`, in a real headless Chromium (Playwright).

A real `stepwell serve` (subprocess, free loopback port) serves a small app:
a node step writing a table, an upstream SQL step reading it, a connector, a
long-running step, an action and a table-fed stream. The browser is Debian's
``/usr/bin/chromium`` (``scripts/system-deps.sh`` installs it); Playwright's
own browser downloads are never used.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from apputil import write_app
from playwright.sync_api import Browser as Chromium
from playwright.sync_api import Dialog, Page, Response, expect, sync_playwright
from plugin_helpers import PLUGIN_SRC
from serverutil import ServerProcess, wait_run

pytestmark = pytest.mark.timeout(120)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
#: What a step writes into a table, its state and its log; it must stay text.
PAYLOAD = '<img src=x onerror="window.__xss=1">'

APP = {
    "stepwell.yml": """
        title: UI test app
        tables: [{name: items}, {name: summary}]
        streams: [streams/items_s.json]
        steps:
          - name: produce
            node: produce.py
            outputs: {items: items}
          - name: summarize
            sql: summarize.sql
            output: summary
            trigger: upstream
          - name: files
            connector: files.py
            parser: csv
            output: file_rows
          - name: waits
            node: waits.py
          - name: breaks
            node: breaks.py
          - name: loud
            node: loud.py
        actions:
          - name: greet
            steps:
              - name: hello
                code: "return {'greeting': 'hello ' + params['who'], 'n': len(params['who'])}"
    """,
    "produce.py": f"""
        from patterns import State, Table
        Table("items", "w").append([{{"id": 1, "label": "alpha"}}, {{"id": 2, "label": {PAYLOAD!r}}}])
        state = State()
        state.set_value("marker", "state-value-42")
        state.set_value("html", {PAYLOAD!r})
        state.set_value("essay", "word " * 700)
        print("produced 2 items, hello from the log", flush=True)
        print({PAYLOAD!r}, flush=True)
    """,
    "summarize.sql": "select count(*) as n from items\n",
    "files.py": """
        def context(credentials):
            return {}

        def list_objects(context, metadata):
            yield {"name": "a.csv", "fingerprint": "fp-a-1", "is_prefix": False}
            yield {"name": "b.csv", "fingerprint": "fp-b-1", "is_prefix": False}

        def read_bytes(context, metadata):
            yield b"x,y\\n1,2\\n3,4\\n"
    """,
    "waits.py": """
        import time
        print("waiting started", flush=True)
        time.sleep(60)
    """,
    "loud.py": """
        for i in range(20_000):
            print(f"loud line {i}")
    """,
    "breaks.py": """
        raise RuntimeError("no-spaces-" + "x" * 3000)
    """,
    "streams/items_s.json": json.dumps(
        {"sql": 'CREATE STREAM items_s () WITH (TYPE="table", DATASOURCE="items")'}),
}
STEPS = ["breaks", "files", "loud", "produce", "summarize", "waits"]


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium package "
                    "(bash scripts/system-deps.sh, or apt-get install chromium)", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[ServerProcess]:
    """`stepwell serve` on loopback: no token needed."""
    app = write_app(tmp_path_factory.mktemp("ui") / "app", APP)
    with ServerProcess(app) as server:
        yield server


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Iterator[ServerProcess]:
    """`stepwell serve --host 0.0.0.0`: beyond loopback, so every API call needs the token."""
    app = write_app(tmp_path_factory.mktemp("ui-auth") / "app", APP)
    with ServerProcess(app, "--host", "0.0.0.0") as server:
        yield server


class Browser:
    """Opens pages in fresh browser contexts (own sessionStorage); records what
    the pages did: uncaught script errors, confirm() dialogs (accepted), API calls."""

    def __init__(self, browser: Chromium):
        self.browser = browser
        self.contexts: list = []
        self.script_errors: list[str] = []
        self.dialogs: list[str] = []
        self.api_calls: list[tuple[str, int, str | None]] = []  # (path, status, authorization)

    def open(self, url: str) -> Page:
        context = self.browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(15_000)
        self.contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: self.script_errors.append(str(exc)))
        page.on("dialog", self._accept)
        page.on("response", self._record)
        page.goto(url)
        return page

    def _accept(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.accept()

    def _record(self, response: Response) -> None:
        path = urlsplit(response.url).path
        if path.startswith("/api/"):
            self.api_calls.append((path, response.status,
                                   response.request.headers.get("authorization")))


@pytest.fixture
def ui(browser: Chromium) -> Iterator[Browser]:
    opened = Browser(browser)
    yield opened
    for context in opened.contexts:
        context.close()
    assert not opened.script_errors, opened.script_errors


@pytest.fixture(autouse=True)
def _expect_timeout() -> None:
    expect.set_options(timeout=15_000)


def run_step(server: ServerProcess, step: str) -> dict:
    """Run `step` through the API and wait for it to end."""
    with server.client(server.token) as client:
        response = client.post("/api/runs", json={"step": step})
        assert response.status_code == 202, response.text
        return wait_run(client, response.json()["run_id"])


def no_markup_from_data(page: Page) -> None:
    """The payload's <img> was not created and its handler did not run."""
    expect(page.locator("#view img")).to_have_count(0)
    assert page.evaluate("window.__xss") is None


# -- views ------------------------------------------------------------------------------------
def test_root_redirects_to_the_ui_and_the_graph_shows_every_step(served, ui: Browser) -> None:
    assert f"web UI: {served.url}/ui/" in served.output()
    page = ui.open(f"{served.url}/")
    expect(page).to_have_url(re.compile(r"/ui/(#.*)?$"))
    steps = page.locator("svg.graph g.node-step")
    expect(steps).to_have_count(len(STEPS))
    assert sorted(steps.evaluate_all("els => els.map(e => e.dataset.name)")) == STEPS
    assert sorted(steps.locator("text.name").all_text_contents()) == STEPS
    tables = page.locator("svg.graph g.node-table")
    assert sorted(tables.evaluate_all("els => els.map(e => e.dataset.name)")) == [
        "file_rows", "items", "summary"]
    # produce -> items -> summarize -> summary, files -> file_rows
    expect(page.locator("svg.graph path.edge")).to_have_count(4)
    expect(page.locator("#app-title")).to_have_text("UI test app")

    page.locator('svg.graph g.node-step[data-name="summarize"]').click()
    expect(page).to_have_url(re.compile(r"#/steps/summarize$"))
    expect(page.locator("h1")).to_have_text("summarize")
    expect(page.locator("dl.facts")).to_contain_text("upstream")  # its trigger


def test_run_button_then_log_runs_list_table_rows_and_state_reset(served, ui: Browser) -> None:
    page = ui.open(f"{served.url}/ui/#/steps/produce")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page).to_have_url(re.compile(r"#/runs/[0-9a-z]+$"))
    run_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#log")).to_contain_text("produced 2 items, hello from the log")
    expect(page.locator("dl.facts .status")).to_have_text("succeeded")
    expect(page.locator("#cancel-run")).to_be_hidden()

    page.goto(f"{served.url}/ui/#/runs")
    row = page.locator(f'table.runs tr[data-run="{run_id}"]')
    expect(row.locator(".status")).to_have_text("succeeded")
    expect(row.locator('td[data-col="Step"]')).to_have_text("produce")
    expect(row.locator('td[data-col="Rows out"]')).to_have_text("2")
    page.locator("#runs-status").select_option("failed")  # filtered in the store
    expect(page.locator("table.runs")).to_have_count(0)
    expect(page.get_by_text("No runs yet.")).to_be_visible()
    page.locator("#runs-status").select_option("succeeded")
    expect(row).to_be_visible()
    expect(page.locator("#runs-older")).to_be_disabled()  # fewer than a page

    page.goto(f"{served.url}/ui/#/tables/items")
    expect(page.locator("table.columns")).to_contain_text("label")
    expect(page.locator("#rows")).to_contain_text("alpha")
    expect(page.locator("#rows tbody tr")).to_have_count(2)
    expect(page.locator("table.versions tbody tr")).to_have_count(1)

    page.goto(f"{served.url}/ui/#/steps/produce")
    marker = page.locator('#step-state tr[data-key="marker"]')
    expect(marker).to_contain_text("state-value-42")
    essay = page.locator('#step-state tr[data-key="essay"] details.long')  # folded
    expect(essay.locator("summary")).to_contain_text("(3,500 characters)")
    expect(essay.locator(".full")).to_be_hidden()
    essay.locator("summary").click()
    expect(essay.locator(".full")).to_be_visible()
    page.locator("#reset-state").click()
    expect(page.locator("#step-state")).to_contain_text("No state.")
    expect(marker).to_have_count(0)
    assert ui.dialogs and "Reset step produce?" in ui.dialogs[-1]
    with served.client() as client:
        assert client.get("/api/steps/produce/state").json()["state"] == {}


def test_values_written_by_steps_are_shown_as_text(served, ui: Browser) -> None:
    run = run_step(served, "produce")
    page = ui.open(f"{served.url}/ui/#/tables/items")
    expect(page.locator("#rows")).to_contain_text(PAYLOAD)
    no_markup_from_data(page)
    page.goto(f"{served.url}/ui/#/steps/produce")
    expect(page.locator('#step-state tr[data-key="html"]')).to_contain_text(PAYLOAD)
    no_markup_from_data(page)
    page.goto(f"{served.url}/ui/#/runs/{run['id']}")
    expect(page.locator("#log .message").filter(has_text=PAYLOAD)).to_have_count(1)
    no_markup_from_data(page)


def test_live_log_of_a_running_step_and_cancel(served, ui: Browser) -> None:
    page = ui.open(f"{served.url}/ui/#/runs")
    with served.client() as client:
        run_id = client.post("/api/runs", json={"step": "waits"}).json()["run_id"]
    row = page.locator(f'table.runs tr[data-run="{run_id}"]')
    expect(row.locator(".status")).to_have_text("running")  # the list refreshes by itself
    row.locator('td[data-col="Run"] a').click()
    expect(page).to_have_url(re.compile(f"#/runs/{run_id}$"))
    # the line arrives while the run is still going (it sleeps 60 s after printing it)
    expect(page.locator("#log")).to_contain_text("waiting started")
    expect(page.locator("dl.facts .status")).to_have_text("running")
    expect(page.locator(".live")).to_be_visible()
    page.locator("#cancel-run").click()
    expect(page.locator("dl.facts .status")).to_have_text("cancelled")
    expect(page.locator("#cancel-run")).to_be_hidden()
    expect(page.locator(".live")).to_be_hidden()


def test_a_long_log_is_added_a_part_at_a_time(served, ui: Browser) -> None:
    # 100,000 lines added in one frame froze the page for seconds before the first showed
    run = run_step(served, "loud")
    with served.client() as client:
        total = len(client.get(f"/api/runs/{run['id']}/logs").json()["lines"])
    assert total >= 20_000
    page = ui.open(f"{served.url}/ui/#/runs")
    page.evaluate("""() => {  // how many lines each change of the log added
      window.__added = [];
      new MutationObserver((changes) => changes.forEach((c) => c.target.id === "log"
        && c.addedNodes.length && window.__added.push(c.addedNodes.length)))
        .observe(document.getElementById("view"), {childList: true, subtree: true});
    }""")
    page.evaluate("(id) => { location.hash = `#/runs/${id}`; }", run["id"])
    # the last 5,000 lines first, and what there is before them
    expect(page.locator("#log li")).to_have_count(5000, timeout=60_000)
    expect(page.locator("#log li").last).to_contain_text("loud line 19999")
    expect(page.locator("#log-earlier")).to_contain_text(f"{total - 5000:,} earlier lines are not shown")
    page.locator("#log-show-all").click()
    expect(page.locator("#log li")).to_have_count(total, timeout=60_000)
    expect(page.locator("#log-earlier")).to_be_hidden()
    added = page.evaluate("window.__added")
    assert sum(added) == 5000 + total and max(added) <= 2000, added
    expect(page.locator("#log li").first).to_contain_text("loud line 0")
    expect(page.locator("#log li").last).to_contain_text("loud line 19999")


def test_connector_partitions_on_the_step_page(served, ui: Browser) -> None:
    run_step(served, "files")
    page = ui.open(f"{served.url}/ui/#/steps/files")
    rows = page.locator("table.partitions tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("a.csv")
    expect(rows.first).to_contain_text("fp-a-1")
    expect(rows.first.locator('td[data-col="Rows"]')).to_have_text("2")
    expect(page.locator("#step-state")).to_contain_text("No state.")
    with served.client() as client:  # a connector's state lists its partitions, as the CLI's does
        described = client.get("/api/steps/files/state").json()
        assert (described["state"], described["stream_positions"]) == ({}, [])
        assert [p["name"] for p in described["partitions"]] == ["a.csv", "b.csv"]


def test_action_form_shows_the_json_result_or_the_error(served, ui: Browser) -> None:
    page = ui.open(f"{served.url}/ui/#/actions")
    card = page.locator('section.action[data-action="greet"]')
    card.locator("textarea").fill('{"who": "ui"}')
    card.get_by_role("button", name="Run").click()
    expect(card.locator(".result-head .status")).to_have_text("succeeded")
    result = json.loads(card.locator(".result-data").text_content())
    assert result == {"greeting": "hello ui", "n": 2}

    card.locator("textarea").fill("{}")  # the step reads params['who']
    card.get_by_role("button", name="Run").click()
    expect(card.locator(".result-head .status")).to_have_text("failed")
    expect(card.locator(".result-error")).to_contain_text("who")

    card.locator("textarea").fill("{not json")
    card.get_by_role("button", name="Run").click()
    expect(page.locator("#banner")).to_contain_text("params are not valid JSON")


def test_api_errors_show_in_the_banner(served, ui: Browser) -> None:
    page = ui.open(f"{served.url}/ui/#/tables/nope")  # said on the page, nothing to reset
    expect(page.locator("#no-table")).to_contain_text("table 'nope' does not exist")
    expect(page.locator("#reset-table")).to_be_hidden()
    page.goto(f"{served.url}/ui/#/runs/nosuchrun")
    banner = page.locator("#banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("not_found")
    expect(banner).to_contain_text("no run 'nosuchrun'")
    page.get_by_role("button", name="Dismiss").click()
    expect(banner).to_be_hidden()


def test_plugins_and_rules_with_start_and_stop(served, ui: Browser) -> None:
    run_step(served, "produce")
    with served.client() as client:
        assert client.post("/api/plugins", json={"path": str(PLUGIN_SRC)}).status_code == 200
        created = client.post("/api/rules", params={"replace": True}, json={
            "id": "copy", "sql": "SELECT id FROM items_s", "actions": [{"log": {}}]})
        assert created.status_code == 200, created.text
    page = ui.open(f"{served.url}/ui/#/plugins")
    expect(page.locator("table.plugins")).to_contain_text("swtest")
    expect(page.locator("table.plugins")).to_contain_text("revstr")
    rule = page.locator('table.rules tr[data-rule="copy"]')
    expect(rule.locator(".status")).to_have_text("running")
    expect(rule.locator('td[data-col="Metrics"]')).to_contain_text(re.compile(r"in [1-9]"))
    rule.get_by_role("button", name="Stop").click()
    expect(rule.locator(".status")).to_have_text("stopped")
    rule.get_by_role("button", name="Start").click()
    expect(rule.locator(".status")).to_have_text("running")
    with served.client() as client:
        assert client.get("/api/rules/copy/status").json()["status"] == "running"


def page_width(page: Page) -> int:
    """How wide the page's content is (wider than the window: it scrolls sideways)."""
    return page.evaluate("document.documentElement.scrollWidth")


def test_long_words_and_wide_tables_do_not_widen_the_page(served, ui: Browser) -> None:
    failed = run_step(served, "breaks")
    assert failed["status"] == "failed"
    with served.client() as client:
        row: dict = {f"c{i:03d}": i for i in range(300)}
        row.update(c000=None, c001="2024-02-29", c002="y" * 5000)  # short values beside a long one
        loaded = client.post("/api/tables/wide_ui/rows", json=[row])
        assert loaded.status_code == 200, loaded.text
    page = ui.open(f"{served.url}/ui/#/runs/{failed['id']}")  # an error without spaces wraps
    expect(page.locator("dl.facts .error-text")).to_contain_text("no-spaces-" + "x" * 100)
    assert page_width(page) <= 1280
    page.goto(f"{served.url}/ui/#/tables/wide_ui")  # 300 columns scroll inside their card
    expect(page.locator("#rows th")).to_have_count(301)  # (and patterns_id)
    assert page.evaluate("document.getElementById('rows').scrollWidth") > 1280
    assert page_width(page) <= 1280
    # a null and a date keep to one line (narrow columns broke them a character at a time)
    lines = "c => { const r = document.createRange(); r.selectNodeContents(c); " \
            "return new Set([...r.getClientRects()].map((b) => Math.round(b.top))).size; }"
    for text in ("null", "2024-02-29"):
        assert page.locator("#rows td", has_text=text).first.evaluate(lines) == 1, text
    name = "t" * 200  # a name and a message without spaces
    page.goto(f"{served.url}/ui/#/tables/{name}")
    expect(page.locator("#no-table")).to_contain_text(f"table '{name}' does not exist")
    assert page_width(page) <= 1280


def test_a_malformed_address_is_no_such_page(served, ui: Browser) -> None:
    page = ui.open(f"{served.url}/ui/#/tables/%E0%A4")  # decoding it threw: a blank page
    expect(page.locator("h1")).to_have_text("Not found")
    expect(page.locator("#view code")).to_have_text("/tables/%E0%A4")
    page.goto(f"{served.url}/ui/#/runs")
    expect(page.locator("h1")).to_have_text("Runs")
    # a malformed token in the address stopped the whole page from starting
    fresh = ui.open(f"{served.url}/ui/#token=%E0%A4")
    expect(fresh.locator("svg.graph g.node-step")).to_have_count(len(STEPS))
    expect(fresh).to_have_url(re.compile(r"/ui/#/graph$"))


# -- the token ----------------------------------------------------------------------------------
def test_a_server_that_needs_a_token_gets_it_from_the_prompt_or_the_fragment(
        guarded, ui: Browser) -> None:
    token = guarded.token
    assert f"web UI: {guarded.url}/ui/#token={token}" in guarded.output()

    page = ui.open(f"{guarded.url}/ui/")
    expect(page.locator("#token-prompt")).to_be_visible()
    expect(page.locator("#view")).to_be_hidden()
    expect(page.locator("svg.graph g.node")).to_have_count(0)
    assert ui.api_calls and all(status == 401 for _, status, _ in ui.api_calls)

    page.locator("#token-input").fill("wrong-token")
    page.get_by_role("button", name="Use token").click()
    expect(page.locator("#token-reason")).to_contain_text("refused")
    expect(page.locator("svg.graph g.node")).to_have_count(0)

    page.locator("#token-input").fill(token)
    page.get_by_role("button", name="Use token").click()
    expect(page.locator("svg.graph g.node-step")).to_have_count(len(STEPS))
    expect(page.locator("#token-prompt")).to_be_hidden()

    ui.api_calls.clear()
    fresh = ui.open(f"{guarded.url}/ui/#token={token}")
    expect(fresh.locator("svg.graph g.node-step")).to_have_count(len(STEPS))
    expect(fresh).to_have_url(re.compile(r"/ui/#/graph$"))  # the token left the address bar
    assert ui.api_calls and all(auth == f"Bearer {token}" for _, _, auth in ui.api_calls)
    assert all(status == 200 for _, status, _ in ui.api_calls)


def _raw_get(url: str, path: str, method: str = "GET") -> int:
    """Status of a request whose path is sent exactly as given (no normalising)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(method, path)
        return connection.getresponse().status
    finally:
        connection.close()


def test_only_the_ui_files_are_public(guarded) -> None:
    with guarded.client() as anonymous:
        root = anonymous.get("/")
        assert root.status_code == 307 and root.headers["location"] == "/ui/"
        assert anonymous.get("/ui").headers["location"] == "/ui/"
        page = anonymous.get("/ui/")
        assert page.status_code == 200 and "js/main.js" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        script = anonymous.get("/ui/js/main.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert anonymous.get("/ui/style.css").status_code == 200
        assert anonymous.get("/ui/no-such-file.js").status_code == 404
        for method, path in (("GET", "/api/health"), ("GET", "/api/app"), ("GET", "/openapi.json"),
                             ("GET", "/docs"), ("POST", "/ui/"), ("HEAD", "/ui/"),
                             ("GET", "/uix"), ("POST", "/")):
            response = anonymous.request(method, path)
            assert response.status_code == 401, (method, path, response.status_code)
    for path in ("/ui/../api/tables", "/ui/%2e%2e/api/tables", "/ui/js/../../api/app"):
        assert _raw_get(guarded.url, path) == 401, path
    with guarded.client(guarded.token) as authed:
        paths = authed.get("/openapi.json").json()["paths"]
        assert not [p for p in paths if p == "/" or p.startswith("/ui")]


def test_the_api_docs_work_without_internet(served, ui: Browser) -> None:
    """/docs loads Swagger UI from this server (the browser here has no network)."""
    page = ui.open(f"{served.url}/docs")
    expect(page.locator(".swagger-ui .opblock-summary-path").first).to_be_visible(timeout=20_000)
    expect(page.locator(".swagger-ui")).to_contain_text("/api/runs")
    with served.client() as client:
        assert client.get("/redoc").status_code == 404  # (it would need a CDN)


def test_a_big_table_pages_to_its_last_rows_and_back(served, ui: Browser) -> None:
    with served.client() as client:
        loaded = client.post("/api/tables/pages/rows", json=[{"n": i} for i in range(120)])
        assert loaded.status_code == 200, loaded.text
    page = ui.open(f"{served.url}/ui/#/tables/pages")
    pager = page.locator("p.pager")
    expect(pager).to_contain_text("rows 1–50 of 120")
    page.get_by_role("button", name="Last »").click()
    expect(pager).to_contain_text("rows 101–120 of 120")
    expect(page.locator("#rows tbody tr")).to_have_count(20)
    page.get_by_role("button", name="‹ Previous").click()
    expect(pager).to_contain_text("rows 51–100 of 120")
    page.get_by_role("button", name="« First").click()
    expect(pager).to_contain_text("rows 1–50 of 120")
