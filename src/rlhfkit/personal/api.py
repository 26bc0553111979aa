"""The personal-model page and JSON API, in the feedback app (same accounts, sessions, CSRF and headers).

    GET  /personal                      the page (two answers side by side, the choice, what was learned)
    POST /api/personal/ask {prompt}     → {question_id, answers: [A, B], models: [model of A, model of B]}
    POST /api/personal/choose {question_id, choice: a | b | both_fine | both_bad, reason?}
                                        → {question_id, pairs (the user's count), training_queued}
    GET  /api/personal/learned          → the user's choices, counts, adapter versions, last training error
    GET  /api/personal/sample           → their latest question answered before (starting point) and after
    DELETE /api/personal/data           → every choice and adapter of the user removed

Exploration: one answer comes from the user's current personal adapter, the other from the alternative:
the starting point (population adapter, else base) when the user has an adapter, else the same model at
``alternative_temperature``; which side each lands on is drawn at random, and both are stored as shown.
Every ``train_every`` new pairs of a user, a training of their next version is queued (one background
thread); the next answers come from it once it is saved.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy.orm import Session

from rlhfkit.feedback.app import Text, json_body
from rlhfkit.feedback.db import User
from rlhfkit.feedback.service import FeedbackError
from rlhfkit.personal import store
from rlhfkit.personal.models import PersonalModels, PromptTooLong, user_owner
from rlhfkit.personal.train import PersonalDPOConfig, TrainingQueue, train_user

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=[HERE / "templates", HERE.parent / "feedback" / "templates"])


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is blank: write a question")
    return value


def _text(min_length: int, max_length: int):
    """The feedback app's ``Text`` (storable in every database) of a length counted in characters (the
    length check comes first, so pydantic says "characters", not "items")."""
    return Annotated[str, Field(min_length=min_length, max_length=max_length), *Text.__metadata__]


class AskBody(BaseModel):
    prompt: Annotated[_text(1, store.MAX_PROMPT), AfterValidator(_not_blank)]


class ChooseBody(BaseModel):
    question_id: Annotated[int, Field(ge=1, le=2**31 - 1)]
    choice: store.Choice
    reason: _text(0, store.MAX_REASON) | None = None


# read after the session dependency (listed after it), as the feedback app's own JSON bodies
AskJson = Annotated[AskBody, Depends(json_body(AskBody))]
ChooseJson = Annotated[ChooseBody, Depends(json_body(ChooseBody))]


@dataclass
class PersonalSettings:
    train_every: int = 8  # new pairs of a user that queue a training of their next version
    temperature: float = 1.0
    alternative_temperature: float = 0.7  # the alternative when the user has no adapter yet
    max_new_tokens: int = 48
    dpo: PersonalDPOConfig = field(default_factory=PersonalDPOConfig)


def model_label(adapter: str | None, temperature: float, settings: PersonalSettings) -> str:
    """What the page shows: "base", "population-v1" or "user-3-v2", with the temperature when not the default."""
    name = adapter or "base"
    return name if temperature == settings.temperature else f"{name} τ={temperature:g}"


def include_personal(app: FastAPI, models: PersonalModels, settings: PersonalSettings | None = None) -> TrainingQueue:
    """Add the page and API to the feedback ``app``; returns the queue of background trainings."""
    settings = settings or PersonalSettings()
    sessions, deps = app.state.sessions, app.state.dependencies
    db, current_user, api_user, csrf_token = deps["db"], deps["user"], deps["api_user"], deps["csrf_token"]

    def train(user_id: int) -> None:
        with sessions() as session:
            train_user(models, session, user_id, settings.dpo)

    queue = TrainingQueue(train, settings.train_every)
    app.state.personal_training = queue
    router = APIRouter()

    @router.get("/personal", response_class=HTMLResponse)
    def personal_page(request: Request, user: User = Depends(current_user)):
        return TEMPLATES.TemplateResponse(request, "personal.html", {"csrf": csrf_token(request), "user": user})

    @router.post("/api/personal/ask")
    def ask(*, user: User = Depends(api_user), body: AskJson, session: Session = Depends(db)):
        owner = user_owner(user.id)
        with models.lock:  # a training that publishes meanwhile must not drop the adapters picked here
            personal, start = models.adapter(owner), models.starting_point(owner)
            if personal is not None:
                options = [(personal, settings.temperature), (start, settings.temperature)]
            else:
                options = [(start, settings.temperature), (start, settings.alternative_temperature)]
            random.shuffle(options)
            try:
                answers = tuple(models.answer(body.prompt, adapter, t, settings.max_new_tokens)
                                for adapter, t in options)
            except PromptTooLong as exc:
                raise FeedbackError(f"prompt: {exc}", 422) from None
        labels = tuple(model_label(adapter, t, settings) for adapter, t in options)
        row = store.record_question(session, user, body.prompt, tuple(a.text for a in answers), labels,
                                    tuple(a.truncated for a in answers))
        return {"question_id": row.id, "answers": [a.text.strip() for a in answers], "models": list(labels)}

    @router.post("/api/personal/choose")
    def choose(*, user: User = Depends(api_user), body: ChooseJson, session: Session = Depends(db)):
        store.record_choice(session, user, body.question_id, body.choice, body.reason)
        pairs = store.pair_count(session, user.id)
        owner = user_owner(user.id)
        version = models.version(owner)
        trained = models.version_info(owner, version)["pairs"] if version else 0
        queued = queue.trigger(user.id, pairs, trained) is not None
        return {"question_id": body.question_id, "pairs": pairs, "training_queued": queued}

    @router.get("/api/personal/learned")
    def learned(user: User = Depends(current_user), session: Session = Depends(db)):
        choices = store.user_choices(session, user.id)
        owner = user_owner(user.id)
        counts = {c: sum(row.choice == c for row in choices) for c in ("a", "b", "both_fine", "both_bad")}
        versions = [{k: v for k, v in models.version_info(owner, n).items() if k != "config"}
                    for n in models.versions(owner)]
        return {"choices": [row.as_dict() for row in choices], "counts": counts,
                "pairs": counts["a"] + counts["b"], "versions": versions,
                "current_model": models.adapter(owner) or "none yet (the starting point answers)",
                "train_every": settings.train_every, "training_error": queue.errors.get(user.id)}

    @router.get("/api/personal/sample")
    def before_after(user: User = Depends(current_user), session: Session = Depends(db)):
        """The user's latest question answered by the starting point (before) and by their current adapter
        (after), each with the same random draws (one seed), so that only the weights differ."""
        choices = store.user_choices(session, user.id)
        owner = user_owner(user.id)
        with models.lock:
            personal, start = models.adapter(owner), models.starting_point(owner)
            if not choices or personal is None:
                raise FeedbackError("no sample yet: your model has no trained version", 404)
            prompt, seed = choices[-1].prompt, random.randrange(2**31)
            before, after = (models.answer(prompt, adapter, settings.temperature, settings.max_new_tokens, seed)
                             for adapter in (start, personal))
        return {"prompt": prompt, "before": before.text.strip(), "after": after.text.strip(),
                "models": [model_label(start, settings.temperature, settings), personal]}

    @router.delete("/api/personal/data")
    def delete_data(user: User = Depends(api_user), session: Session = Depends(db)):
        deleted = store.delete_user_data(session, user, models)
        queue.errors.pop(user.id, None)
        return {"deleted_choices": deleted, "adapters": models.versions(user_owner(user.id))}

    app.include_router(router)
    app.mount("/personal/static", StaticFiles(directory=HERE / "static"), name="personal-static")
    return queue
