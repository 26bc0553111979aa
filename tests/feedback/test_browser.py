"""A real browser (Debian's headless Chromium, driven by Playwright) against a real server: a labeler
logs in, reads the instructions, ranks with drag-and-drop and the keyboard, marks a tie and a flag,
submits; the admin sees the agreement figures. Screenshots are saved."""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import make_completions
from feedback_postgres import skip_or_fail
from rlhfkit.feedback import service
from rlhfkit.feedback.db import session_factory

spec_path = Path(__file__).parents[2] / "benchmarks" / "feedback_load.py"


def expect(locator):
    """Playwright's waiting assertions (they need no eval, which the app's Content-Security-Policy forbids)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        skip_or_fail("Chromium is not installed (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail("Playwright is not installed (pip install playwright)")
    return path


@contextmanager
def running_app(tmp_path, instructions: str, completions):
    """A real server on a fresh database with an admin, ann and bob, and one project "browser"."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("feedback_load", spec_path)
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    db = str(tmp_path / "app.db")
    sessions = session_factory(db)
    with sessions() as session:
        service.create_user(session, "admin", "admin", password=load.PASSWORD)
        for name in ("ann", "bob"):
            service.create_user(session, name, password=f"{name}-password")
        service.create_project(session, "browser", "helpfulness", completions, instructions, overlap=2)
    port = load.free_port()
    process = load.start_server(db, port)
    try:
        yield f"http://127.0.0.1:{port}", sessions
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    completions = [c.model_copy(update={"text": f"Answer number {c.index}: be kind."})
                   for p in range(2) for c in make_completions(f"p{p}", 4)]
    with running_app(tmp_path, "## How to rank\nPut the **most helpful** answer first.", completions) as running:
        yield running


@contextmanager
def chromium_browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


def log_in(page, url: str, name: str, password: str) -> None:
    page.goto(f"{url}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button.primary")


@pytest.mark.slow
def test_labeler_ranks_with_a_tie_and_a_flag_and_the_admin_sees_agreement(server, tmp_path):
    url, sessions = server
    shots = Path(os.environ.get("RLHFKIT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with chromium_browser() as browser:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(f"{url}/")  # not logged in: sent to the login page
        assert page.url.endswith("/login")
        page.fill("input[name=username]", "ann")
        page.fill("input[name=password]", "ann-password")
        page.click("button.primary")
        page.wait_for_selector("li.completion")
        assert "most helpful" in page.inner_text("#instructions")
        assert page.is_visible("#instructions strong")  # the instructions are open and rendered Markdown
        page.keyboard.press("?")  # collapse them, and back
        assert page.get_attribute("#instructions", "open") is None
        page.keyboard.press("?")
        cards = page.locator("li.completion")
        first_ids = [cards.nth(i).get_attribute("data-id") for i in range(4)]
        cards.nth(3).drag_to(cards.nth(0))  # drag the last answer to the top
        order = [cards.nth(i).get_attribute("data-id") for i in range(4)]
        assert order[0] == first_ids[3]
        cards.nth(0).focus()
        page.keyboard.press("ArrowDown")  # keyboard: move the top answer down one place
        order = [cards.nth(i).get_attribute("data-id") for i in range(4)]
        assert order[1] == first_ids[3]
        cards.nth(2).focus()
        page.keyboard.press("t")  # the third answer is tied with the second
        assert "ties should be rare" in page.inner_text("#status")
        cards.nth(3).focus()
        page.keyboard.press("f")  # the last one is nonsense
        page.screenshot(path=str(shots / "labeler-ranking.png"), full_page=True)
        page.click("#submit")
        expect(page.locator("#status")).to_contain_text("Saved")
        assert "1 tie" in page.inner_text("#status")
        page.wait_for_selector("li.completion")  # the next item arrived
        page.screenshot(path=str(shots / "labeler-next.png"), full_page=True)

        admin = browser.new_page(viewport={"width": 1100, "height": 1200})
        admin.goto(f"{url}/login")
        admin.fill("input[name=username]", "admin")
        admin.fill("input[name=password]", "load-test-password")
        admin.click("button.primary")
        admin.wait_for_selector("#agreement")
        assert "Krippendorff" in admin.inner_text("#agreement") and "ann" in admin.inner_text("#labelers")
        admin.screenshot(path=str(shots / "admin-dashboard.png"), full_page=True)

    with sessions() as session:
        [label] = session.query(service.Label).all()
    assert label.groups == [[order[0]], [order[1], order[2]], [order[3]]]
    assert label.flagged == [order[3]]
    for name in ("labeler-ranking.png", "labeler-next.png", "admin-dashboard.png"):
        assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


HOSTILE_GUIDE = """# Guide
<script>fetch('/api/admin/users', {method: 'POST', headers: {'Content-Type': 'application/json',
  'X-CSRF-Token': document.getElementById('labeling').dataset.csrf}, body: '{"username": "mallory", "role": "admin"}'});
  window.pwned = 'script';</script>
<img src="/nothing.png" onerror="window.pwned = 'img'">
[a link](javascript:window.pwned='link') <iframe src="/login" id="framed"></iframe>
<svg onload="window.pwned = 'svg'"></svg>
Rank by **helpfulness**.
"""


@pytest.mark.slow
def test_a_hostile_instructions_file_runs_nothing_in_the_admins_browser(tmp_path):
    with running_app(tmp_path, HOSTILE_GUIDE, make_completions("p0", 3)) as (url, sessions), \
            chromium_browser() as browser:
        page = browser.new_page()
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        log_in(page, url, "admin", "load-test-password")
        page.wait_for_selector("#agreement")
        page.goto(f"{url}/")  # the admin opens the labeling page with the project's instructions
        page.wait_for_selector("li.completion")
        assert page.is_visible("#guide strong")  # the harmless Markdown is there
        assert page.locator("#guide script, #guide iframe, #guide svg, #guide [onerror]").count() == 0
        page.click("#guide a")  # the link lost its javascript: target
        # defence in depth: markup that got in anyway cannot run inline code under the page's policy
        page.evaluate("document.body.insertAdjacentHTML('beforeend', "
                      "'<img src=\"/nothing.png\" onerror=\"window.pwned = 1\">')")
        page.wait_for_timeout(500)
        assert page.evaluate("window.pwned") is None and not dialogs
    with sessions() as session:
        assert session.query(service.User).filter_by(username="mallory").count() == 0


@pytest.mark.slow
def test_labeler_keys_order_progress_prompts_undo_errors_and_invite(tmp_path):
    from rlhfkit.data.records import Completion

    prompts = {"p0": "line one\nline two", "p1": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Hello?"}]}
    completions = [Completion(id=f"{p}-{i}", prompt_id=p, prompt=prompt, text=f"answer {i}", index=i)
                   for p, prompt in prompts.items() for i in range(4)]
    with running_app(tmp_path, "Rank them.", completions) as (url, sessions), chromium_browser() as browser:
        page = browser.new_page()
        log_in(page, url, "ann", "ann-password")
        page.wait_for_selector("li.completion")
        assert page.inner_text("#progress") == "(0 done, at most 2 left)"
        shown = page.locator("li.completion").evaluate_all("els => els.map(e => e.dataset.id)")
        page.focus("#instructions summary")
        page.keyboard.press("Enter")  # the summary's own action (fold), never a submission
        page.keyboard.press("Control+s")  # the browser's shortcut, not a skip
        page.keyboard.press("Control+f")
        page.wait_for_timeout(300)
        assert page.inner_text("#status") == "" and page.locator("li.flagged").count() == 0
        roles = {}  # prompt text → the roles of its turns
        for done in ("1 done", "2 done"):
            roles[page.inner_text("#prompt")] = page.locator("#prompt .role").all_inner_texts()
            page.locator("li.completion").first.focus()
            page.keyboard.press("Enter")
            expect(page.locator("#status")).to_contain_text("Saved")
            expect(page.locator("#progress")).to_contain_text(done)
        last_prompt = list(roles)[-1]
        page.click("#undo")  # take the last label back: its item returns
        expect(page.locator("#status")).to_contain_text("taken back")
        expect(page.locator("#progress")).to_contain_text("1 done")
        assert page.inner_text("#prompt") == last_prompt
        page.keyboard.press("u")  # U again does not reach the label before it
        expect(page.locator("#status")).to_contain_text("only your last label")
        assert page.inner_text("#progress") == "(1 done, at most 1 left)"
        page.locator("li.completion").first.focus()
        page.keyboard.press("Enter")
        expect(page.locator("#progress")).to_contain_text("2 done")
        # a plain prompt keeps its line breaks; a chat prompt shows one block per turn
        assert roles == {"line one\nline two": [], "System:Be brief.\nUser:Hello?": ["System:", "User:"]}
        expect(page.locator("#status")).to_contain_text("All done")
        assert page.inner_text("#progress") == "(2 done, at most 0 left)"  # fresh at "All done"

        page.goto(f"{url}/admin")  # a labeler on an admin page: a page that says why, not JSON
        assert "Not allowed" in page.inner_text("h1") and "admins only" in page.inner_text("#reason")

        with sessions() as session:
            token = service.create_user(session, "Eve", "labeler").invite_token
        invited = browser.new_page()
        invited.goto(f"{url}/invite/{token}")
        assert invited.inner_text("#username") == "eve"
        invited.fill("input[name=password]", "eve-password-1")
        invited.fill("input[name=confirm]", "eve-password-2")
        invited.click("button.primary")
        assert "differ" in invited.inner_text("#reason")
        invited.goto(f"{url}/invite/{token}")
        invited.fill("input[name=password]", "eve-password-1")
        invited.fill("input[name=confirm]", "eve-password-1")
        invited.click("button.primary")
        invited.wait_for_selector("li.completion")

    with sessions() as session:
        labels = {label.item_id: label for label in session.query(service.Label).all()}
        items = {item.id: item for item in session.query(service.Item).all()}
    assert sorted(items[i].prompt_id for i in labels) == ["p0", "p1"]
    assert all(label.groups[0] == [label.shown_order[0]] for label in labels.values())  # Enter took the order shown
    [first] = [label for i, label in labels.items() if items[i].prompt_id == shown[0].split("-")[0]]
    assert shown == first.shown_order  # the page showed the order stored with the label
    assert any(label.shown_order != sorted(label.shown_order) for label in labels.values())  # not file order


@pytest.mark.slow
def test_a_busy_server_makes_the_page_say_so_and_ask_again_by_itself(server):
    """/api/next answers 503 with Retry-After when every candidate item is being given out: the page
    says the server is busy, asks again after that many seconds, and shows the item without a reload."""
    url, _ = server
    with chromium_browser() as browser:
        page = browser.new_page()
        busy = {"left": 1}

        def first_busy(route):
            if busy["left"]:
                busy["left"] -= 1
                route.fulfill(status=503, headers={"retry-after": "1", "content-type": "application/json"},
                              body='{"detail": "the server is busy: try again"}')
            else:
                route.continue_()

        page.route("**/api/next*", first_busy)
        log_in(page, url, "ann", "ann-password")
        expect(page.locator("#status")).to_contain_text("busy")
        page.wait_for_selector("li.completion", timeout=5000)
        assert busy["left"] == 0 and "busy" not in page.inner_text("#status")
