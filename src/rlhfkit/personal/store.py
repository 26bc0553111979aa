"""A user's choices between two answers, stored at once in the feedback database (same accounts).

A row is written when the user asks (the prompt, the two answers in the order shown, the model
version that produced each) and completed when they choose: ``a``, ``b``, ``both_fine`` or
``both_bad``, with an optional short reason. A choice of ``a`` or ``b`` is one preference pair
(chosen = the picked answer, rejected = the other); ``both_fine``, ``both_bad`` and questions never
answered give none. Rows and pairs belong to one user: every lookup is by (row id, user id), so
another user's row answers "no such question", as a missing one does.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from sqlalchemy import Boolean, CheckConstraint, DateTime, ForeignKey, Integer, String, Text, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from rlhfkit.data.records import PreferencePair
from rlhfkit.feedback.db import Base, User, checkpoint, now
from rlhfkit.feedback.service import FeedbackError

Choice = Literal["a", "b", "both_fine", "both_bad"]
MAX_REASON = 200  # characters: "say why in a word"
MAX_PROMPT = 2000


class PersonalChoice(Base):
    __tablename__ = "personal_choices"
    __table_args__ = ({"sqlite_autoincrement": True},)  # an id is never reused after a deletion (migration 0007)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    answer_a: Mapped[str] = mapped_column(Text)  # as decoded from the model (the page trims the display)
    answer_b: Mapped[str] = mapped_column(Text)
    model_a: Mapped[str] = mapped_column(String(64))  # which model version produced each answer
    model_b: Mapped[str] = mapped_column(String(64))
    truncated_a: Mapped[bool] = mapped_column(Boolean, default=False)  # cut at max_new_tokens before EOS
    truncated_b: Mapped[bool] = mapped_column(Boolean, default=False)
    choice: Mapped[str | None] = mapped_column(
        String(16), CheckConstraint("choice IN ('a', 'b', 'both_fine', 'both_bad')", name="known_choice"))
    reason: Mapped[str | None] = mapped_column(String(MAX_REASON))
    asked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    chosen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    def as_dict(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "answers": [self.answer_a, self.answer_b],
                "models": [self.model_a, self.model_b], "truncated": [self.truncated_a, self.truncated_b],
                "choice": self.choice, "reason": self.reason,
                "asked_at": self.asked_at.isoformat(), "chosen_at": self.chosen_at and self.chosen_at.isoformat()}


def record_question(session: Session, user: User, prompt: str, answers: tuple[str, str],
                    models: tuple[str, str], truncated: tuple[bool, bool] = (False, False)) -> PersonalChoice:
    """Store the two answers shown to ``user`` (in the order shown; ``truncated``: whether each was cut at
    max_new_tokens) before they choose."""
    row = PersonalChoice(user_id=user.id, prompt=prompt, answer_a=answers[0], answer_b=answers[1],
                         model_a=models[0], model_b=models[1], truncated_a=truncated[0], truncated_b=truncated[1])
    session.add(row)
    session.commit()
    return row


def record_choice(session: Session, user: User, question_id: int, choice: Choice,
                  reason: str | None = None) -> PersonalChoice:
    """``user``'s choice for their question ``question_id``, stored at once: 404 for a question that is
    not theirs (or does not exist), 409 for one already answered, 422 for a reason over MAX_REASON."""
    if reason is not None and len(reason) > MAX_REASON:
        raise FeedbackError(f"reason: {len(reason)} characters; say why in at most {MAX_REASON}", 422)
    row = session.scalar(select(PersonalChoice).where(PersonalChoice.id == question_id,
                                                      PersonalChoice.user_id == user.id).with_for_update())
    if row is None or row.choice is not None:
        session.rollback()  # end the (SQLite: write-locked) transaction before answering
        raise (FeedbackError(f"question {question_id}: no such question of yours", 404) if row is None else
               FeedbackError(f"question {question_id}: already answered ({row.choice})", 409))
    row.choice, row.reason, row.chosen_at = choice, reason or None, now()
    session.commit()
    return row


def user_choices(session: Session, user_id: int) -> list[PersonalChoice]:
    """Every question of the user that has a choice, oldest first."""
    return list(session.scalars(select(PersonalChoice).where(PersonalChoice.user_id == user_id,
                                                             PersonalChoice.choice.is_not(None))
                                .order_by(PersonalChoice.id)))


def preference_pairs(choices: list[PersonalChoice]) -> list[PreferencePair]:
    """One pair per choice of ``a`` or ``b``; ``both_fine`` / ``both_bad`` (and no choice) give none."""
    pairs = []
    for row in choices:
        if row.choice not in ("a", "b"):
            continue
        a, b = (row.answer_a, row.truncated_a), (row.answer_b, row.truncated_b)
        (picked, picked_cut), (other, other_cut) = (a, b) if row.choice == "a" else (b, a)
        pairs.append(PreferencePair(prompt=row.prompt, chosen=picked, rejected=other, prompt_id=f"q{row.id}",
                                    provenance={"source": "personal", "user_id": row.user_id,
                                                "models": [row.model_a, row.model_b]},
                                    chosen_truncated=picked_cut, rejected_truncated=other_cut))
    return pairs


def pair_count(session: Session, user_id: int) -> int:
    """How many preference pairs the user has given (choices of ``a`` or ``b``)."""
    return session.scalar(select(func.count()).select_from(PersonalChoice).where(
        PersonalChoice.user_id == user_id, PersonalChoice.choice.in_(("a", "b")))) or 0


def users_with_pairs(session: Session) -> list[int]:
    """The ids of users who gave at least one preference pair."""
    return list(session.scalars(select(PersonalChoice.user_id).where(PersonalChoice.choice.in_(("a", "b")))
                                .distinct().order_by(PersonalChoice.user_id)))


def delete_user_data(session: Session, user: User) -> int:
    """Remove every question and choice of ``user`` (their adapters: ``PersonalModels.forget``, after this,
    so that a training that starts meanwhile finds no pairs). Returns the rows deleted."""
    deleted = session.execute(delete(PersonalChoice).where(PersonalChoice.user_id == user.id)).rowcount
    session.commit()
    checkpoint(session.get_bind())  # their texts out of SQLite's write-ahead log too
    return deleted
