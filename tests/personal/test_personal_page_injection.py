"""A real browser on the personal page fed hostile text everywhere it is shown back: the prompt, the reason and
the answers (model output, which an attacker can steer) render as inert text: no element, no script runs."""

import pytest
from test_personal_page import url  # noqa: F401 - the served app, the same set-up

from feedback.test_browser import chromium_browser, expect, log_in
from rlhfkit.personal.models import Answer, PersonalModels

HOSTILE = '<img src=x onerror="alert(1)"><script>alert(2)</script><a href="javascript:alert(3)">x</a>'


@pytest.mark.slow
def test_markup_in_prompts_reasons_and_answers_is_shown_as_text(url, monkeypatch):
    url, training = url
    monkeypatch.setattr(PersonalModels, "answer", lambda *args, **kwargs: Answer("answer " + HOSTILE, False))
    with chromium_browser() as browser:
        page = browser.new_page()
        dialogs = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        log_in(page, url, "ann", "ann-password")
        page.goto(f"{url}/personal")
        page.fill("#prompt", "prompt " + HOSTILE)
        page.click("#ask button")
        expect(page.locator("#answer-a")).to_have_text("answer " + HOSTILE)
        page.fill("#reason", HOSTILE[:60])
        page.click("button[data-choice=a]")
        expect(page.locator("#learned table")).to_contain_text("prompt " + HOSTILE)
        expect(page.locator("#learned table")).to_contain_text(HOSTILE[:60])
        training.wait()
        page.click("#sample")
        expect(page.locator("#after")).to_have_text("answer " + HOSTILE)
        expect(page.locator("#before-model")).to_contain_text("prompt " + HOSTILE)
        for box in ("#answer-a", "#answer-b", "#learned", "#before-after"):
            assert page.locator(f"{box} img, {box} script, {box} a").count() == 0, box
        assert dialogs == []
