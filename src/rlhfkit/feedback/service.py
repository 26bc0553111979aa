"""What the labeling app does, without HTTP: accounts, projects, assignment, labels, statistics, export.

Assignment: every item should reach ``overlap`` (k) distinct labelers. A labeler's next item is their
open assignment if they have one; otherwise the item closest to completion among those that still
need labelers and that this labeler has never been given (so nobody gets an item twice). The item row
is locked while its slots are counted (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite serialises
writers), so concurrent labelers cannot over-fill an item. Open assignments older than
``ASSIGNMENT_TIMEOUT`` stop holding a slot. Gold items (known answers) are mixed in at the project's
``gold_rate`` as attention checks.

Labels: a submission must be a partition of the item's completions and the item must be assigned to
the labeler; the same submission twice (double click, retry) stores one label and answers as the
first did; a different second submission is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhfkit.data.pairs import CONSENSUS, rankings_to_pairs
from rlhfkit.data.records import Completion, PreferencePair, Ranking
from rlhfkit.feedback.agreement import Agreement, agreement
from rlhfkit.feedback.db import Assignment, Item, ItemCompletion, Label, Project, User, now

ASSIGNMENT_TIMEOUT = timedelta(hours=1)


class FeedbackError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


# ---------------------------------------------------------------- accounts


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str | None) -> bool:
    if not stored or not stored.startswith("scrypt$"):
        return False
    _, salt, digest = stored.split("$")
    return hmac.compare_digest(hash_password(password, bytes.fromhex(salt)).split("$")[2], digest)


def create_user(session: Session, username: str, role: str = "labeler", password: str | None = None) -> User:
    """A new account; without a password it gets an invite token to set one."""
    if role not in ("admin", "labeler"):
        raise FeedbackError(f"role must be admin or labeler, not {role!r}")
    if not username or len(username) > 64:
        raise FeedbackError("a username has 1 to 64 characters")
    if session.scalar(select(User).where(User.username == username)):
        raise FeedbackError(f"user {username!r} exists", 409)
    user = User(username=username, role=role, password_hash=hash_password(password) if password else None,
                invite_token=None if password else secrets.token_urlsafe(24))
    session.add(user)
    session.commit()
    return user


def accept_invite(session: Session, token: str, password: str) -> User:
    if len(password) < 8:
        raise FeedbackError("a password has at least 8 characters")
    user = session.scalar(select(User).where(User.invite_token == token))
    if user is None:
        raise FeedbackError("unknown or used invite link", 404)
    user.password_hash, user.invite_token = hash_password(password), None
    session.commit()
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    user = session.scalar(select(User).where(User.username == username))
    session.commit()  # end the transaction (and SQLite's lock) before the deliberately slow hash check
    return user if user is not None and check_password(password, user.password_hash) else None


# ---------------------------------------------------------------- projects


def create_project(session: Session, name: str, criterion: str, completions: Sequence[Completion],
                   instructions: str = "", overlap: int = 3, consensus: str = "borda",
                   gold: Sequence[Ranking] = (), gold_rate: float = 0.1) -> Project:
    """A project with one item per prompt of ``completions``; prompts with a ranking in ``gold`` become
    gold items with that ranking as their answer."""
    if overlap < 1:
        raise FeedbackError("overlap (labelers per item) must be at least 1")
    if consensus not in CONSENSUS:
        raise FeedbackError(f"unknown consensus {consensus!r}; choose one of {sorted(CONSENSUS)}")
    if not completions:
        raise FeedbackError("no completions to label")
    if session.scalar(select(Project).where(Project.name == name)):
        raise FeedbackError(f"project {name!r} exists", 409)
    answers = {r.prompt_id: r for r in gold}
    project = Project(name=name, criterion=criterion, instructions=instructions, overlap=overlap,
                      consensus=consensus, gold_rate=gold_rate if answers else 0.0)
    session.add(project)
    by_prompt: dict[str, list[Completion]] = {}
    for c in completions:
        by_prompt.setdefault(c.prompt_id, []).append(c)
    unknown = sorted(set(answers) - set(by_prompt))
    if unknown:
        raise FeedbackError(f"gold rankings for prompts that have no completions: {unknown[:5]}")
    for prompt_id, group in by_prompt.items():
        if len(group) < 2:
            raise FeedbackError(f"prompt {prompt_id!r} has {len(group)} completion; ranking needs at least 2")
        answer = answers.get(prompt_id)
        if answer is not None:
            answer.check_partition({c.id for c in group})
        first = group[0]
        prompt = first.prompt if isinstance(first.prompt, str) else [m.model_dump() for m in first.prompt]
        item = Item(project=project, prompt_id=prompt_id, prompt=json.dumps(prompt), is_gold=answer is not None,
                    gold_groups=answer.groups if answer is not None else None)
        item.completions = [ItemCompletion(completion_id=c.id, text=c.text, index=c.index, model=c.model)
                            for c in sorted(group, key=lambda c: c.index)]
        session.add(item)
    session.commit()
    return project


def get_project(session: Session, name: str | None = None) -> Project:
    query = select(Project).order_by(Project.id)
    if name is not None:
        query = query.where(Project.name == name)
    project = session.scalar(query)
    if project is None:
        raise FeedbackError(f"no project {name!r}" if name else "no project yet", 404)
    return project


# ---------------------------------------------------------------- assignment


def _holds_slot():
    """Assignments that count towards an item's k: done, or open and recent."""
    return (Assignment.status == "done") | ((Assignment.status == "open")
                                           & (Assignment.created_at > now() - ASSIGNMENT_TIMEOUT))


def next_item(session: Session, user: User, project: Project, rng: random.Random | None = None) -> Item | None:
    """The labeler's open item, or a new assignment; None when nothing is left for them."""
    open_item = session.scalar(select(Item).join(Assignment, Assignment.item_id == Item.id).where(
        Assignment.user_id == user.id, Assignment.status == "open", Item.project_id == project.id))
    if open_item is not None:
        return open_item
    seen = select(Assignment.item_id).where(Assignment.user_id == user.id)
    filled = (select(func.count()).select_from(Assignment).where(Assignment.item_id == Item.id, _holds_slot())
              .correlate(Item).scalar_subquery())
    rng = rng or random.Random()
    want_gold = project.gold_rate > 0 and rng.random() < project.gold_rate
    for gold in ([True, False] if want_gold else [False]):
        query = select(Item.id).where(Item.project_id == project.id, Item.is_gold == gold, Item.id.not_in(seen))
        if not gold:
            query = query.where(filled < project.overlap)
        candidates = session.scalars(query.order_by(filled.desc(), Item.id).limit(20)).all()
        for item_id in candidates:
            item = session.scalar(select(Item).where(Item.id == item_id).with_for_update())
            taken = session.scalar(select(func.count()).select_from(Assignment).where(
                Assignment.item_id == item_id, _holds_slot()))
            if not gold and taken >= project.overlap:
                session.rollback()
                continue
            session.add(Assignment(item_id=item_id, user_id=user.id))
            try:
                session.commit()
            except IntegrityError:  # the same labeler asked twice at once: use the other request's assignment
                session.rollback()
                continue
            return item
    return None


def item_view(item: Item, project: Project, user: User, session: Session) -> dict:
    """What a labeler sees of an item (never whether it is gold, nor other labelers' work)."""
    done = session.scalar(select(func.count()).select_from(Label).join(Item, Item.id == Label.item_id).where(
        Label.user_id == user.id, Item.project_id == project.id, Item.is_gold.is_(False)))
    return {"item_id": item.id, "prompt": item.prompt_value, "criterion": project.criterion,
            "completions": [{"id": c.completion_id, "text": c.text} for c in item.completions],
            "progress": {"done": done, "total": _items_for(session, project)}}


def _items_for(session: Session, project: Project) -> int:
    return session.scalar(select(func.count()).select_from(Item).where(Item.project_id == project.id,
                                                                        Item.is_gold.is_(False)))


def skip(session: Session, user: User, item_id: int) -> None:
    assignment = session.scalar(select(Assignment).where(Assignment.item_id == item_id,
                                                         Assignment.user_id == user.id))
    if assignment is None:
        raise FeedbackError("this item is not assigned to you", 403)
    if assignment.status == "open":
        assignment.status = "skipped"
        session.commit()


# ---------------------------------------------------------------- labels


@dataclass
class Submitted:
    label_id: int
    duplicate: bool


def submit_label(session: Session, user: User, item_id: int, groups: list[list[str]], flagged: list[str],
                 seconds: float | None = None) -> Submitted:
    item = session.get(Item, item_id)
    if item is None:
        raise FeedbackError(f"unknown item {item_id}", 404)
    assignment = session.scalar(select(Assignment).where(Assignment.item_id == item_id,
                                                         Assignment.user_id == user.id))
    if assignment is None:
        raise FeedbackError("this item is not assigned to you", 403)
    try:
        ranking = Ranking(prompt_id=item.prompt_id, labeler_id=user.username, groups=groups, flagged=flagged)
        ranking.check_partition({c.completion_id for c in item.completions})
    except ValueError as exc:
        raise FeedbackError(f"invalid ranking: {exc}", 422) from None
    existing = session.scalar(select(Label).where(Label.item_id == item_id, Label.user_id == user.id))
    if existing is None:
        label = Label(item_id=item_id, user_id=user.id, groups=groups, flagged=flagged, seconds=seconds)
        session.add(label)
        assignment.status = "done"
        try:
            session.commit()
            return Submitted(label.id, duplicate=False)
        except IntegrityError:  # a concurrent identical request won the race
            session.rollback()
            existing = session.scalar(select(Label).where(Label.item_id == item_id, Label.user_id == user.id))
    if existing.groups == groups and sorted(existing.flagged) == sorted(flagged):
        return Submitted(existing.id, duplicate=True)
    raise FeedbackError("you already labeled this item; a label cannot be changed", 409)


# ---------------------------------------------------------------- statistics and export


def rankings(session: Session, project: Project, gold: bool = False) -> list[Ranking]:
    """Every label of the project as a Ranking (labeler_id = username), regular or gold items."""
    rows = session.execute(select(Label, Item, User).join(Item, Item.id == Label.item_id)
                           .join(User, User.id == Label.user_id)
                           .where(Item.project_id == project.id, Item.is_gold.is_(gold)).order_by(Label.id)).all()
    return [Ranking(prompt_id=item.prompt_id, labeler_id=user.username, criterion=project.criterion,
                    groups=label.groups, flagged=label.flagged) for label, item, user in rows]


def gold_answers(session: Session, project: Project) -> dict[str, Ranking]:
    items = session.scalars(select(Item).where(Item.project_id == project.id, Item.is_gold.is_(True))).all()
    return {i.prompt_id: Ranking(prompt_id=i.prompt_id, labeler_id="gold", groups=i.gold_groups) for i in items}


def project_agreement(session: Session, project: Project, min_tau: float = 0.2,
                      min_gold_accuracy: float = 0.7) -> Agreement:
    all_rankings = rankings(session, project) + rankings(session, project, gold=True)
    return agreement(all_rankings, CONSENSUS[project.consensus], gold_answers(session, project), min_tau,
                     min_gold_accuracy)


def progress(session: Session, project: Project) -> dict:
    counts = session.execute(select(Item.id, func.count(Label.id)).outerjoin(Label, Label.item_id == Item.id)
                             .where(Item.project_id == project.id, Item.is_gold.is_(False))
                             .group_by(Item.id)).all()
    labels = sum(n for _, n in counts)
    return {"items": len(counts), "complete": sum(n >= project.overlap for _, n in counts), "labels": labels,
            "wanted": len(counts) * project.overlap}


def project_completions(session: Session, project: Project) -> list[Completion]:
    rows = session.execute(select(ItemCompletion, Item).join(Item, Item.id == ItemCompletion.item_id)
                           .where(Item.project_id == project.id)).all()
    return [Completion(id=c.completion_id, prompt_id=i.prompt_id, prompt=i.prompt_value, text=c.text, index=c.index,
                       model=c.model) for c, i in rows]


def export(session: Session, project: Project, keep_poor: bool = False) -> tuple[list[Ranking], list[PreferencePair]]:
    """The regular items' rankings and the consensus pairs; poor labelers are left out unless kept."""
    poor = set() if keep_poor else set(project_agreement(session, project).poor_labelers)
    kept = [r for r in rankings(session, project) if r.labeler_id not in poor]
    completions = [c for c in project_completions(session, project) if c.prompt_id in {r.prompt_id for r in kept}]
    return kept, rankings_to_pairs(kept, completions, consensus=project.consensus)
