"""A real browser (headless Chromium, Playwright) on the personal page: ask, see two answers with their
models, choose with a reason, see it in what was learned and a before/after sample, delete everything."""

import threading
import time

import pytest

from conftest import build_tiny_causal, word_tokenizer
from feedback.test_browser import chromium_browser, expect, log_in  # the same browser set-up
from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app
from rlhfkit.personal.api import PersonalSettings, include_personal
from rlhfkit.personal.models import PersonalModels
from rlhfkit.personal.train import PersonalDPOConfig


@pytest.fixture
def url(tmp_path):
    import uvicorn

    app = create_app(str(tmp_path / "feedback.db"))
    queue = include_personal(app, PersonalModels(build_tiny_causal(), word_tokenizer(), tmp_path / "adapters"),
                             PersonalSettings(train_every=1, max_new_tokens=8,
                                              dpo=PersonalDPOConfig(epochs=1)))
    with app.state.sessions() as db:
        service.create_user(db, "ann", password="ann-password")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", queue
    server.should_exit = True
    thread.join(10)
    queue.shutdown()


@pytest.mark.slow
def test_a_user_asks_chooses_sees_what_was_learned_and_deletes_it(url):
    url, training = url
    with chromium_browser() as browser:
        page = browser.new_page()
        log_in(page, url, "ann", "ann-password")  # lands on the labeling page: no project there (404)
        failed = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.goto(f"{url}/personal")
        expect(page.locator("#learned")).to_contain_text("none yet")
        page.fill("#prompt", "how do i fix bike")
        page.click("#ask button")
        expect(page.locator("#question")).to_be_visible()
        expect(page.locator("#model-a")).to_contain_text("model: base")
        page.fill("#reason", "kinder")
        page.click("button[data-choice=b]")
        expect(page.locator("#status")).to_contain_text("Stored.")
        expect(page.locator("#learned")).to_contain_text("0 A, 1 B")
        expect(page.locator("#learned table")).to_contain_text("kinder")
        training.wait()  # the choice queued a training (every 1 pair here)
        page.click("#sample")
        expect(page.locator("#before-model")).to_contain_text("Before — base")
        expect(page.locator("#after-model")).to_contain_text("After — user-1-v1")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#delete")
        expect(page.locator("#status")).to_contain_text("Deleted 1 choices")
        expect(page.locator("#learned")).to_contain_text("0 A, 0 B")
        assert failed == []
