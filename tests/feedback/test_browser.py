"""A real browser (Debian's headless Chromium, driven by Playwright) against a real server: a labeler
logs in, reads the instructions, ranks with drag-and-drop and the keyboard, marks a tie and a flag,
submits; the admin sees the agreement figures. Screenshots are saved."""

import os
import shutil
from pathlib import Path

import pytest

from conftest import make_completions
from feedback_postgres import skip_or_fail
from rlhfkit.feedback import service
from rlhfkit.feedback.db import session_factory

spec_path = Path(__file__).parents[2] / "benchmarks" / "feedback_load.py"


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        skip_or_fail("Chromium is not installed (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail("Playwright is not installed (pip install playwright)")
    return path


@pytest.fixture
def server(tmp_path):
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
        completions = [c.model_copy(update={"text": f"Answer number {c.index}: be kind."})
                       for p in range(2) for c in make_completions(f"p{p}", 4)]
        service.create_project(session, "browser", "helpfulness", completions,
                               "## How to rank\nPut the **most helpful** answer first.", overlap=2)
    port = load.free_port()
    process = load.start_server(db, port)
    yield f"http://127.0.0.1:{port}", sessions
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.slow
def test_labeler_ranks_with_a_tie_and_a_flag_and_the_admin_sees_agreement(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, sessions = server
    shots = Path(os.environ.get("RLHFKIT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage"])
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
        page.wait_for_function("document.querySelector('#status').textContent.includes('Saved')")
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
        browser.close()

    with sessions() as session:
        [label] = session.query(service.Label).all()
    assert label.groups == [[order[0]], [order[1], order[2]], [order[3]]]
    assert label.flagged == [order[3]]
    for name in ("labeler-ranking.png", "labeler-next.png", "admin-dashboard.png"):
        assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
