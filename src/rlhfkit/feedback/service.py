"""What the labeling app does, without HTTP: accounts, sessions, projects, assignment, labels, statistics,
export.

Assignment: every item should reach ``overlap`` (k) distinct labelers. A labeler's next item is their
open assignment if they have one (at most one per project: a partial unique index); otherwise the item
closest to completion among those that still need labelers and that this labeler has never been given
(so nobody gets an item twice). A regular item has k slots; a new assignment takes a free one while the
item row is locked (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite serialises writers), and a partial
unique index on (item, slot) over open and done assignments makes a second holder impossible. Each item
keeps its count of free slots (``items.free_slots``, never below 0), changed under the same row lock by
every path that takes or frees a slot; /api/next picks by it. Open assignments older than
``ASSIGNMENT_TIMEOUT`` are expired by the next /api/next of anyone in the project and give their slot
back. Gold items (known answers, no slots) are mixed in at the project's ``gold_rate`` as attention
checks, in an order of each labeler's own.

Labels: a submission must be a partition of the item's completions and is stored only with the
statement that turns the labeler's own open, unexpired assignment into done, so an item never has more
labels than slots; the same submission twice (double click, retry) stores one label and answers as the
first did; a different second submission is refused. The labeler's last label (only the last, once)
can be undone while its item is still open."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import random
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from sqlalchemy import Row, Select, bindparam, case, delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Delete, Update

from rlhfkit.data.pairs import CONSENSUS, rankings_to_pairs
from rlhfkit.data.records import Completion, PreferencePair, Ranking
from rlhfkit.feedback.agreement import Agreement, agreement
from rlhfkit.feedback.db import (
    Assignment,
    Item,
    ItemCompletion,
    Label,
    LoginFailures,
    Project,
    User,
    WebSession,
    now,
)

ASSIGNMENT_TIMEOUT = timedelta(hours=1)
MIN_PASSWORD_LENGTH = 10
MAX_OVERLAP = 1000  # labelers per item; a typo like 10**8 would make every assignment enumerate its slots
SESSION_LIFETIME = timedelta(days=14)


class FeedbackError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status it maps to, ``retry_after`` the
    seconds after which the same request may succeed (sent as Retry-After)."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.retry_after = message, status, retry_after


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


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the username is unknown, so that the answer takes as long as for a known one."""
    return hash_password(secrets.token_urlsafe(16))


def normalise_username(username: str) -> str:
    """" Ann " and "ann" are one account: usernames are stripped and case-folded."""
    return username.strip().casefold()


def check_password_policy(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise FeedbackError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")


def create_user(session: Session, username: str, role: str = "labeler", password: str | None = None) -> User:
    """A new account; without a password it gets an invite token to set one."""
    if role not in ("admin", "labeler"):
        raise FeedbackError(f"role must be admin or labeler, not {role!r}")
    username = normalise_username(username)
    if not username or len(username) > 64 or not username.isprintable():
        raise FeedbackError("a username has 1 to 64 printable characters")
    if password is not None:
        check_password_policy(password)
    if session.scalar(select(User).where(User.username == username)):
        raise FeedbackError(f"user {username!r} exists", 409)
    user = User(username=username, role=role, password_hash=hash_password(password) if password else None,
                invite_token=None if password else secrets.token_urlsafe(24))
    session.add(user)
    _commit_new(session, f"user {username!r}")
    return user


def _commit_new(session: Session, what: str) -> None:
    """Commit a new named row; on PostgreSQL a parallel request (a double click on the form) may have
    taken the name between the check and the commit, which the unique index turns into a 409."""
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise FeedbackError(f"{what} exists", 409) from None


def invited_user(session: Session, token: str) -> User:
    user = session.scalar(select(User).where(User.invite_token == token))
    if user is None:
        raise FeedbackError("unknown or used invite link", 404)
    return user


def accept_invite(session: Session, token: str, password: str) -> User:
    check_password_policy(password)
    user = invited_user(session, token)
    user.password_hash, user.invite_token = hash_password(password), None
    session.commit()
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The account if the password is right and the account enabled. An unknown username costs the same
    hash as a known one, so the answer time does not tell whether it exists."""
    user = find_user(session, username)
    session.commit()  # end the transaction (and SQLite's lock) before the deliberately slow hash check
    right = check_password(password, user.password_hash if user and user.password_hash else _dummy_hash())
    return user if right and user is not None and user.password_hash and not user.disabled else None


# Login throttling, kept in the database so that every server worker process sees the same counts.
# After ``start`` recent failures of a key, the next attempt waits 2^(failures - start) s; from ``lock``
# failures on, the key is locked for LOGIN_LOCK. Failures older than LOGIN_FORGET are forgotten. A
# client address gets more room than an account (several people may share one address).
LOGIN_THROTTLE = {"user": (3, 10), "ip": (20, 60)}
LOGIN_LOCK = timedelta(minutes=15)
LOGIN_FORGET = timedelta(hours=1)


def _aware(moment: datetime) -> datetime:
    """SQLite gives datetimes back without their (UTC) zone."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _upsert(session: Session):
    from sqlalchemy.dialects.postgresql import insert as postgresql_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def reserve_login_attempt(session: Session, keys: Sequence[str]) -> float:
    """Seconds before another login attempt is allowed for these keys (``user:NAME``, ``ip:ADDR``). At 0
    the attempt is counted as a failure at once, before its password is checked (a success takes the
    count back): check and count are one transaction over the keys' locked rows, so parallel attempts
    cannot all pass the check before the first failure is counted. A refused attempt writes nothing."""
    keys = sorted(set(keys))
    wait = _login_wait(session, keys)
    if wait <= 0:
        # Rows created or locked one by one in key order, the same order as every other lock on them (a
        # no-op update locks an existing row): with DO NOTHING a new account row was held before the
        # address row was locked, and two tabs of one account logging in deadlocked on PostgreSQL.
        session.execute(_upsert(session)(LoginFailures).values([{"key": k, "failures": 0, "last_failure": now()}
                                                                 for k in keys])
                        .on_conflict_do_update(index_elements=[LoginFailures.key],
                                               set_={"failures": LoginFailures.failures}))
        wait = _login_wait(session, keys, lock=True)
        if wait <= 0:
            record_login_failure(session, keys)
            return 0.0
    session.commit()
    return wait


def _login_wait(session: Session, keys: Sequence[str], lock: bool = False) -> float:
    """The longest wait that the keys' failures impose (the rules above); ``lock`` holds their rows."""
    query = select(LoginFailures).where(LoginFailures.key.in_(keys)).order_by(LoginFailures.key)
    wait = 0.0
    for row in session.scalars(query.with_for_update() if lock else query):
        start, lock_at = LOGIN_THROTTLE[row.key.split(":", 1)[0]]
        if row.failures < start:
            continue
        pause = LOGIN_LOCK if row.failures >= lock_at else min(timedelta(seconds=2 ** (row.failures - start)),
                                                                 LOGIN_LOCK)
        since = now() - _aware(row.last_failure)
        if since < LOGIN_FORGET:
            wait = max(wait, (pause - since).total_seconds())
    return wait


def record_login_failure(session: Session, keys: Sequence[str]) -> None:
    """One more failure per key, atomically (an upsert), so parallel workers count every failure."""
    moment = now()
    for key in keys:
        statement = _upsert(session)(LoginFailures).values(key=key, failures=1, last_failure=moment)
        session.execute(statement.on_conflict_do_update(index_elements=[LoginFailures.key], set_={
            "failures": case((LoginFailures.last_failure < moment - LOGIN_FORGET, 1),
                             else_=LoginFailures.failures + 1),
            "last_failure": moment}))
    session.commit()


def log_in(session: Session, username: str, password: str, client: str) -> tuple[User, str]:
    """The account and a new session token, or a refusal: 429 while the account or the client address is
    throttled, else 401 for a wrong username or password."""
    user_key, client_key = f"user:{normalise_username(username)[:64]}", f"ip:{client[:64]}"
    wait = reserve_login_attempt(session, [user_key, client_key])
    if wait > 0:
        raise FeedbackError(f"too many failed logins: try again in {math.ceil(wait)} s", 429, math.ceil(wait))
    user = authenticate(session, username, password)
    if user is None:
        raise FeedbackError("wrong username or password", 401)
    # the attempt was counted as a failure: the address forgets this one, the account its failures. Rows
    # in key order ("ip:" < "user:"), as reserve_login_attempt locks them: the other order deadlocked
    # parallel logins of one account from one address on PostgreSQL.
    session.execute(update(LoginFailures).where(LoginFailures.key == client_key, LoginFailures.failures > 0)
                    .values(failures=LoginFailures.failures - 1))
    session.execute(delete(LoginFailures).where(LoginFailures.key == user_key))  # committed with the session
    return user, start_session(session, user)


def start_session(session: Session, user: User) -> str:
    """A new server-side session; returns its token (for the cookie; the table keeps only its hash).
    The account's expired sessions are removed on the way."""
    token = secrets.token_urlsafe(32)
    session.execute(delete(WebSession).where(WebSession.user_id == user.id, WebSession.expires_at <= now()))
    session.add(WebSession(id=_token_hash(token), user_id=user.id, expires_at=now() + SESSION_LIFETIME))
    session.commit()
    return token


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def session_user(session: Session, token: str | None) -> User | None:
    """The account of a live session: not logged out, not expired, the account not disabled. Read in the
    caller's transaction (the caller commits)."""
    if not token:
        return None
    return session.scalar(_SESSION_USER, {"token_hash": _token_hash(token), "now": now()})


_SESSION_USER = select(User).join(WebSession, WebSession.user_id == User.id).where(
    WebSession.id == bindparam("token_hash"), WebSession.expires_at > bindparam("now"), User.disabled.is_(False))


class Labeler(NamedTuple):
    """The account of a labeler's hot call (/api/next, /api/labels): what those calls use of it."""

    id: int
    username: str


class ProjectRules(NamedTuple):
    """What /api/next uses of a project."""

    id: int
    criterion: str
    overlap: int
    gold_rate: float


AnyLabeler = User | Labeler  # the assignment and label functions take either
AnyProject = Project | ProjectRules


def session_labeler(session: Session, token: str) -> Labeler:
    """session_user's account as a plain row, else 401. Core, not the ORM: py-spy put session_user (an
    ORM User entity per hot call) at 12% of the server's CPU under the load benchmark."""
    row = session.connection().execute(_SESSION_LABELER, {"token_hash": _token_hash(token), "now": now()}).first()
    if row is None:
        raise FeedbackError("log in first", 401)
    return Labeler(*row)


def session_labeler_and_project(session: Session, token: str, name: str | None) -> tuple[Labeler, ProjectRules]:
    """session_labeler and the project named ``name`` (the first when None) in one statement: /api/next's
    first. 401 for a dead session, then 404 for an unknown project."""
    statement = _SESSION_LABELER_FIRST_PROJECT if name is None else _SESSION_LABELER_NAMED_PROJECT
    row = session.connection().execute(statement, {"token_hash": _token_hash(token), "now": now(),
                                                   "name": name}).first()
    if row is None:
        raise FeedbackError("log in first", 401)
    if row.project_id is None:
        raise _no_project(name)
    return Labeler(*row[:2]), ProjectRules(*row[2:])


_SESSION_LABELER = _SESSION_USER.with_only_columns(User.id, User.username)


def _session_labeler_and_project(project_is):
    return (_SESSION_LABELER.add_columns(Project.id.label("project_id"), Project.criterion, Project.overlap,
                                         Project.gold_rate).outerjoin(Project, project_is))


_SESSION_LABELER_NAMED_PROJECT = _session_labeler_and_project(Project.name == bindparam("name"))
_SESSION_LABELER_FIRST_PROJECT = _session_labeler_and_project(
    Project.id == select(func.min(Project.id)).scalar_subquery())


def end_session(session: Session, token: str) -> None:
    session.execute(delete(WebSession).where(WebSession.id == _token_hash(token)))
    session.commit()


def _end_sessions_of(session: Session, user: User) -> None:
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))


def find_user(session: Session, username: str) -> User | None:
    """The account named exactly ``username``, else the one with its normalised name. Exact first: a
    database from before names were normalised may hold both "BOB" and "bob" (migration 0002 leaves
    such a pair alone), and an action on "BOB" must not reach "bob"."""
    exact = session.scalar(select(User).where(User.username == username))
    return exact or session.scalar(select(User).where(User.username == normalise_username(username)))


def get_user(session: Session, username: str) -> User:
    user = find_user(session, username)
    if user is None:
        raise FeedbackError(f"no user {username!r}", 404)
    return user


def change_password(session: Session, user: User, old: str, new: str) -> None:
    """The user's own change; every session of the account ends (the caller starts a new one)."""
    if not check_password(old, user.password_hash):
        raise FeedbackError("the current password is wrong", 403)
    check_password_policy(new)
    user = session.merge(user)
    user.password_hash = hash_password(new)
    _end_sessions_of(session, user)
    session.commit()


def set_disabled(session: Session, username: str, disabled: bool, admin: User) -> User:
    """(``admin``) Turn another account off (its sessions end and its open items go back to the pool at
    once, not after ASSIGNMENT_TIMEOUT) or back on.

    A request of the labeler that is opening an assignment right now either sees the flag or has its
    assignment ended here: the flag is set under the user row's FOR UPDATE lock, which waits for the
    KEY SHARE lock that the assignment's INSERT holds (its foreign key check) until that transaction
    ends, and which a later INSERT waits for in turn and then finds the flag (``_refuse_if_disabled``).
    The flag is committed first, then the open assignments are ended: no user lock is held while items
    are locked (the order in which /api/next takes them is item, then user)."""
    user = get_user(session, username)
    if user.id == admin.id:
        raise FeedbackError("you cannot disable your own account (you would be locked out)", 409)
    session.execute(_LOCK_USER, {"user_id": user.id})
    user.disabled = disabled
    if disabled:
        _end_sessions_of(session, user)
    session.commit()
    if disabled:
        held = session.scalars(select(Assignment.item_id).where(Assignment.user_id == user.id,
                                                                Assignment.status == "open")).all()
        _end_assignments(session, update(Assignment.__table__).values(status="expired").where(
            Assignment.user_id == user.id, Assignment.status == "open"), held)
        session.commit()
    return user


_LOCK_USER = select(User.id).where(User.id == bindparam("user_id")).with_for_update()
# KEY SHARE: what an INSERT's foreign key check takes; it waits only for set_disabled's FOR UPDATE
_USER_DISABLED = select(User.disabled).where(User.id == bindparam("user_id")).with_for_update(key_share=True)


def _refuse_if_disabled(session: Session, user: AnyLabeler) -> None:
    """401 (and the transaction rolled back) if the account was disabled since the request's session
    lookup; called after a write that opens an assignment, before its commit (see set_disabled)."""
    if session.connection().scalar(_USER_DISABLED, {"user_id": user.id}):
        _refuse_disabled(session)


def _refuse_disabled(session: Session) -> None:
    session.rollback()
    raise FeedbackError("log in first (this account was disabled)", 401)


def reset_password(session: Session, username: str) -> str:
    """(admin) Forget the account's password and end its sessions; returns a new invite token with
    which its owner chooses a new one."""
    user = get_user(session, username)
    user.password_hash, user.invite_token = None, secrets.token_urlsafe(24)
    _end_sessions_of(session, user)
    session.commit()
    return user.invite_token


# ---------------------------------------------------------------- projects


def create_project(session: Session, name: str, criterion: str, completions: Sequence[Completion],
                   instructions: str = "", overlap: int = 3, consensus: str = "borda",
                   gold: Sequence[Ranking] = (), gold_rate: float = 0.1) -> Project:
    """A project with one item per prompt of ``completions``; prompts with a ranking in ``gold`` become
    gold items with that ranking as their answer."""
    if not all(1 <= len(text) <= 128 and text.isprintable() for text in (name, criterion)):
        raise FeedbackError("a project name and a criterion have 1 to 128 printable characters", 422)
    if not 1 <= overlap <= MAX_OVERLAP:
        raise FeedbackError(f"overlap (labelers per item) must be 1 to {MAX_OVERLAP}, not {overlap}", 422)
    if not 0 <= gold_rate <= 1:  # also refuses NaN
        raise FeedbackError(f"the gold-item rate is a probability from 0 to 1, not {gold_rate}", 422)
    if consensus not in CONSENSUS:
        raise FeedbackError(f"unknown consensus {consensus!r}; choose one of {sorted(CONSENSUS)}")
    if not completions:
        raise FeedbackError("no completions to label")
    if "\x00" in instructions:
        raise FeedbackError("the instructions contain a NUL character", 422)
    with_nul = next((c for c in completions if "\x00" in c.id + c.prompt_id + c.text + c.model), None)
    if with_nul is not None:
        raise FeedbackError(f"completion {with_nul.id!r} contains a NUL character", 422)
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
                    gold_groups=answer.groups if answer is not None else None,
                    free_slots=0 if answer is not None else overlap)
        item.completions = [ItemCompletion(completion_id=c.id, text=c.text, index=c.index, model=c.model,
                                           truncated=c.truncated) for c in sorted(group, key=lambda c: c.index)]
        session.add(item)
    _commit_new(session, f"project {name!r}")
    if session.get_bind().dialect.name == "postgresql":
        # statistics for the new items now, not at autovacuum's next round: without them PostgreSQL
        # plans the assignment queries for a one-row table (a nested loop over every item, ×4 the time)
        session.execute(text("ANALYZE items, completions, assignments, labels"))
        session.commit()
    return project


def get_project(session: Session, name: str | None = None) -> Project:
    """The project named ``name``, or the first one."""
    project = session.scalar(_FIRST_PROJECT) if name is None else session.scalar(_PROJECT, {"name": name})
    if project is None:
        raise _no_project(name)
    return project


def _no_project(name: str | None) -> FeedbackError:
    return FeedbackError(f"no project {name!r}" if name else "no project yet", 404)


_FIRST_PROJECT = select(Project).order_by(Project.id).limit(1)
_PROJECT = select(Project).where(Project.name == bindparam("name"))


# ---------------------------------------------------------------- assignment
# /api/next and /api/labels are what every labeler repeats, so they are the app's load: each runs one
# transaction of few statements that read only the columns they need. Their statements are built once
# (the _CAPITALS below, values as bound parameters): building a statement and its cache key on every
# request took a third of the server's CPU. benchmarks/README.md has the numbers.


def _holds_slot(stale_before=None):
    """Assignments that count towards an item's k: done, or open and created after ``stale_before``
    (now − ASSIGNMENT_TIMEOUT unless given, e.g. as a bound parameter)."""
    stale_before = now() - ASSIGNMENT_TIMEOUT if stale_before is None else stale_before
    return (Assignment.status == "done") | ((Assignment.status == "open") & (Assignment.created_at > stale_before))


def _end_assignments(session: Session, change: Update | Delete, item_ids: Collection[int]) -> list[int]:
    """Run ``change`` (an UPDATE or DELETE of the assignments table that ends open assignments) on the
    assignments of ``item_ids`` only, with those items locked first, in id order (the order every
    writer takes: no deadlock); the slots it ends go back to their items' ``free_slots`` in the same
    transaction. Returns the items of the assignments it ended."""
    if not item_ids:
        return []
    connection = session.connection()
    connection.execute(_LOCK_ITEMS, {"item_ids": sorted(set(item_ids))})
    ended = connection.execute(change.where(Assignment.item_id.in_(item_ids))
                               .returning(Assignment.item_id, Assignment.slot)).all()
    freed = sorted({item_id for item_id, slot in ended if slot is not None})
    if freed:
        connection.execute(_FREE_SLOTS, {"freed_items": freed})
    return [item_id for item_id, _ in ended]


def _free_slots_counted():
    """An item's free slots as its rows say: max(0, k − holders), 0 for a gold item. Holders beyond k exist
    only on an item over-filled before slots were kept (migration 0002 numbers them all): freeing one of
    its slots must not open the item to a new labeler while it still has k."""
    holders = (select(func.count()).where(Assignment.item_id == Item.id, Assignment.status.in_(("open", "done")),
                                          Assignment.slot.is_not(None)).scalar_subquery())
    overlap = select(Project.overlap).where(Project.id == Item.project_id).scalar_subquery()
    return case((Item.is_gold, 0), (holders >= overlap, 0), else_=overlap - holders)


_LOCK_ITEMS = (select(Item.id).where(Item.id.in_(bindparam("item_ids", expanding=True))).order_by(Item.id)
               .with_for_update())
_FREE_SLOTS = (update(Item.__table__).where(Item.id.in_(bindparam("freed_items", expanding=True)))  # recounted
               .values(free_slots=_free_slots_counted()))


def _take_slot(session: Session, user: AnyLabeler, item_id: int) -> None:
    """One free slot of the (locked) item goes to the labeler's new assignment; 401 if their account was
    disabled meanwhile: the same statement reads the flag, after the assignment's INSERT, whose foreign key
    check holds the user row's KEY SHARE lock (see set_disabled). One statement less than
    _refuse_if_disabled on every /api/next that opens an item."""
    if session.connection().scalar(_TAKE_SLOT, {"taken_item": item_id, "user_id": user.id}):
        _refuse_disabled(session)


_TAKE_SLOT = (update(Item.__table__).where(Item.id == bindparam("taken_item")).values(free_slots=Item.free_slots - 1)
              .returning(select(User.disabled).where(User.id == bindparam("user_id")).scalar_subquery()))


def expire_stale_assignments(session: Session, project: AnyProject, stale_before: datetime) -> None:
    """Open assignments of the project created at or before ``stale_before`` (now − ASSIGNMENT_TIMEOUT)
    become expired and give their slot back. Committed on its own when there were any, so that its item
    locks are not held while the caller locks others."""
    item_ids = session.connection().scalars(_STALE_ITEMS, {"project_id": project.id,
                                                          "stale_before": stale_before}).all()
    _end_assignments(session, update(Assignment.__table__).values(status="expired").where(
        Assignment.status == "open", Assignment.created_at <= stale_before), item_ids)
    if item_ids:
        session.commit()


_STALE_ITEMS = select(Assignment.item_id).where(
    Assignment.project_id == bindparam("project_id"), Assignment.status == "open",
    Assignment.created_at <= bindparam("stale_before")).distinct()


def free_slot_mismatches(session: Session) -> dict[int, tuple[int, int]]:
    """Items whose ``free_slots`` differs from what their rows say (max(0, k − holders), 0 for gold items):
    {item id: (stored, counted)}. Empty when every path kept the counters right."""
    counted = _free_slots_counted()
    rows = session.execute(select(Item.id, Item.free_slots, counted).where(Item.free_slots != counted)).all()
    session.commit()
    return {item_id: (stored, right) for item_id, stored, right in rows}


@dataclass
class Offered:
    """An item as a labeler is given it: the prompt (JSON), the completions (``completion_id``, ``text``)
    in file order, and the labeler's progress at that moment."""

    id: int
    prompt_id: str
    prompt: str
    completions: Sequence[Row]
    progress: dict


def next_item(session: Session, user: AnyLabeler, project: AnyProject,
              rng: random.Random | None = None) -> Offered | None:
    """The labeler's open item, or a new assignment; None when nothing is left for them. One transaction
    (more when timed-out assignments of the project are expired first, or when every item with work is
    being given out on PostgreSQL: see _assign_new).

    A regular item's new assignment takes the lowest free slot (0..k-1) while the item row is locked;
    the unique indexes turn any race the lock does not cover (two requests of one labeler, two labelers
    on one slot) into an IntegrityError, after which the labeler's state is read again."""
    rng = rng or random.Random()
    stale_before = now() - ASSIGNMENT_TIMEOUT
    for _ in range(5):
        try:
            item_id, progress = _open_item(session, user, project, stale_before), None
            if item_id is None:
                item_id, progress = _assign_new(session, user, project, rng, stale_before)
            offered = None if item_id is None else _offered(session, user, project, item_id, progress)
            session.commit()
            return offered
        except IntegrityError:  # a parallel request of this labeler won: read its assignment
            session.rollback()
    raise FeedbackError("the server is busy: try again", 503, retry_after=1)


def _open_item(session: Session, user: AnyLabeler, project: AnyProject, stale_before: datetime) -> int | None:
    """The item of the labeler's open assignment in the project, read with whether any open assignment
    of the project timed out (one statement: /api/next's common case); those are expired first."""
    mine = {"user_id": user.id, "project_id": project.id, "stale_before": stale_before}
    item_id, any_stale = session.connection().execute(_OPEN_ITEM_AND_ANY_STALE, mine).one()
    if any_stale:  # read again even if another request expired them first: the labeler's may be among them
        expire_stale_assignments(session, project, stale_before)
        item_id = session.connection().scalar(_OPEN_ITEM, mine)
    return item_id


_OPEN_ITEM = select(Assignment.item_id).where(
    Assignment.user_id == bindparam("user_id"), Assignment.project_id == bindparam("project_id"),
    Assignment.status == "open")
_OPEN_ITEM_AND_ANY_STALE = select(_OPEN_ITEM.scalar_subquery(), select(Assignment.id).where(
    Assignment.project_id == bindparam("project_id"), Assignment.status == "open",
    Assignment.created_at <= bindparam("stale_before")).exists())


def _assign_new(session: Session, user: AnyLabeler, project: AnyProject, rng: random.Random,
                stale_before: datetime) -> tuple[int | None, dict | None]:
    """Assign the labeler an item they were never given; returns its id (None when none is left) and,
    for a regular item, the labeler's progress, read by the statement that chose it.

    Gold items come at the project's gold rate, in an order of each labeler's own. Regular items: the
    fullest first (fewest free slots), ties broken at random, so that every labeler meets the items
    in an order of their own and a gold item's place in the sequence tells nothing."""
    connection, mine = session.connection(), {"user_id": user.id, "project_id": project.id}
    if project.gold_rate > 0 and rng.random() < project.gold_rate:
        gold = connection.scalars(_GOLD_NOT_SEEN, mine).all()
        if gold:
            item_id = rng.choice(gold)
            connection.execute(_ASSIGN, {**mine, "item_id": item_id, "slot": None})
            _refuse_if_disabled(session, user)
            return item_id, None
    # The candidate is locked in the same statement. An item that another labeler is being given right now
    # (row locked) is passed over (SKIP LOCKED, PostgreSQL): otherwise every labeler queues on the same
    # fullest item. When all candidates are locked, wait for one of them, but only after a commit: PostgreSQL
    # keeps the lock of a row it locked and then found changed (no free slot left), and a wait while holding
    # it could close a cycle with the writers that lock several items in id order (deadlock); holding no
    # lock, the wait cannot. Refusing instead (503) would turn away a labeler while there is work, e.g. on
    # one hot item whose holder commits slowly. SQLite serialises whole transactions and never skips.
    tried, free = [], {**mine, "stale_before": stale_before}
    for _ in range(PICK_ROUNDS):
        while (row := connection.execute(_LOCK_FULLEST, {**free, "tried": tried}).first()):
            tried.append(row.id)
            slot = _free_slot(session, row.id, project.overlap)
            if slot is not None:
                connection.execute(_ASSIGN, {**mine, "item_id": row.id, "slot": slot})
                _take_slot(session, user, row.id)
                return row.id, _progress_of(*row[1:])
        busy_item = connection.scalar(_ANY_FREE, {**mine, "tried": tried})
        if busy_item is None:
            return None, None
        session.commit()  # nothing written yet: this only ends the locks of the full rows tried
        connection = session.connection()
        connection.execute(_LOCK_ITEMS, {"item_ids": [busy_item]})  # until its holder commits; then pick again
    raise FeedbackError("the server is busy: try again", 503, retry_after=1)


PICK_ROUNDS = 50  # waits for a busy item; each ends with that item locked by us, so few rounds are ever needed


_SEEN = select(Assignment.item_id).where(Assignment.user_id == bindparam("user_id"))
_GOLD_NOT_SEEN = select(Item.id).where(Item.project_id == bindparam("project_id"), Item.is_gold.is_(True),
                                       Item.id.not_in(_SEEN)).order_by(Item.id)


def _progress_columns() -> tuple:
    """The labeler's progress as three scalar subqueries: their labels in the project; the regular
    items left to them — never given to them and with a free slot, plus their open (unexpired) regular
    item, which holds one of its slots; the gold items they were not given or hold open."""
    closed = select(Assignment.item_id).where(Assignment.user_id == bindparam("user_id"), Assignment.status != "open")
    in_project = select(func.count()).select_from(Item).where(Item.project_id == bindparam("project_id"))
    return (
        select(func.count()).select_from(Label).join(Item, Item.id == Label.item_id)
        .where(Label.user_id == bindparam("user_id"), Item.project_id == bindparam("project_id")).scalar_subquery(),
        in_project.where(Item.is_gold.is_(False), Item.id.not_in(_SEEN), Item.free_slots > 0).scalar_subquery()
        + in_project.join(Assignment, Assignment.item_id == Item.id)
        .where(Item.is_gold.is_(False), Assignment.user_id == bindparam("user_id"), Assignment.status == "open",
               Assignment.created_at > bindparam("stale_before")).scalar_subquery(),
        in_project.where(Item.is_gold.is_(True), Item.id.not_in(closed)).scalar_subquery())


def _progress_of(done: int, regular: int, gold: int) -> dict:
    """Gold items count like any other in both numbers while regular items remain, so that neither tells
    a gold item apart: each label, gold or not, moves ``done`` up and ``left`` down by one."""
    return {"done": done, "left": regular + gold if regular else 0}


def _candidates() -> tuple:
    """A regular item of the project with a free slot that the labeler was never given (nor ``tried``)."""
    return (Item.project_id == bindparam("project_id"), Item.is_gold.is_(False), Item.free_slots > 0,
            Item.id.not_in(_SEEN), Item.id.not_in(bindparam("tried", expanding=True)))


def _fullest_statement() -> Select:
    """The fullest candidate (fewest ``free_slots``), the first among equals at random; and the labeler's
    progress once it is theirs (it is counted among the items left: the same count as after the assignment)."""
    return (select(Item.id, *_progress_columns()).where(*_candidates())
            .order_by(Item.free_slots, func.random()).limit(1))


_LOCK_FULLEST = _fullest_statement().with_for_update(of=Item, skip_locked=True)
_ANY_FREE = select(Item.id).where(*_candidates()).limit(1)
_ASSIGN = insert(Assignment.__table__)


def _free_slot(session: Session, item_id: int, overlap: int) -> int | None:
    """The lowest slot of the (locked) item that no open or done assignment holds."""
    used = set(session.connection().scalars(_SLOT_HOLDERS, {"item_id": item_id}))
    if len(used) >= overlap:  # an item over-filled before slots were kept (see _free_slots_counted)
        return None
    return next((slot for slot in range(overlap) if slot not in used), None)


_SLOT_HOLDERS = select(Assignment.slot).where(Assignment.item_id == bindparam("item_id"),
                                              Assignment.status.in_(("open", "done")))


def _offered(session: Session, user: AnyLabeler, project: AnyProject, item_id: int, progress: dict | None) -> Offered:
    rows = session.connection().execute(_ITEM_CONTENT, {"item_id": item_id}).all()
    return Offered(item_id, rows[0].prompt_id, rows[0].prompt, rows, progress or _progress(session, user, project))


_ITEM_CONTENT = (select(Item.prompt_id, Item.prompt, ItemCompletion.completion_id, ItemCompletion.text)
                 .join(ItemCompletion, ItemCompletion.item_id == Item.id).where(Item.id == bindparam("item_id"))
                 .order_by(ItemCompletion.index))


def answer_order(user_id: int, item_id: int, completion_ids: Sequence[str]) -> list[str]:
    """The order in which this labeler sees this item's answers: shuffled, seeded by (labeler, item), so a
    reload shows the same order and the order can be stored with the label."""
    ids = list(completion_ids)
    random.Random(f"{user_id}:{item_id}").shuffle(ids)
    return ids


def item_view(item: Offered, project: AnyProject, user: AnyLabeler) -> dict:
    """What a labeler sees of an item (never whether it is gold, nor other labelers' work)."""
    texts = {c.completion_id: c.text for c in item.completions}
    return {"item_id": item.id, "prompt": json.loads(item.prompt), "criterion": project.criterion,
            "completions": [{"id": i, "text": texts[i]} for i in answer_order(user.id, item.id, texts)],
            "progress": item.progress}


def labeler_progress(session: Session, user: User, project: Project) -> dict:
    expire_stale_assignments(session, project, now() - ASSIGNMENT_TIMEOUT)
    progress = _progress(session, user, project)
    session.commit()
    return progress


def _progress(session: Session, user: AnyLabeler, project: AnyProject) -> dict:
    """This labeler's labels in the project and the items still open to them: at most that many are
    left. One query."""
    return _progress_of(*session.connection().execute(_PROGRESS, {
        "user_id": user.id, "project_id": project.id, "stale_before": now() - ASSIGNMENT_TIMEOUT}).one())


_PROGRESS = select(*_progress_columns())


def _assignment(session: Session, user: AnyLabeler, item_id: int) -> Assignment:
    assignment = session.scalar(select(Assignment).where(Assignment.item_id == item_id, Assignment.user_id == user.id)
                                .with_for_update())
    if assignment is None:
        raise FeedbackError("this item is not assigned to you", 403)
    return assignment


def skip(session: Session, user: User, item_id: int) -> None:
    """The labeler's open assignment of the item becomes skipped; its slot goes back to the pool."""
    skipped = _end_assignments(session, update(Assignment.__table__).values(status="skipped").where(
        Assignment.user_id == user.id, Assignment.status == "open"), [item_id])
    if not skipped:
        _assignment(session, user, item_id)  # 403 unless the item was assigned (and is done or skipped already)
    session.commit()


# ---------------------------------------------------------------- labels


@dataclass
class Submitted:
    label_id: int
    duplicate: bool


def submit_label(session: Session, user: AnyLabeler, item_id: int, groups: list[list[str]], flagged: list[str],
                 seconds: float | None = None) -> Submitted:
    """Store a label. It is accepted only for the labeler's own open, unexpired assignment of the item
    (which holds one of the item's k slots): the assignment turns from open to done in the same
    statement that checks it, so a skipped or expired assignment cannot take a label, and an item can
    never have more labels than slots."""
    # locks in the order every writer takes them, item then assignment (PostgreSQL: no deadlock with undo)
    connection = session.connection()
    rows = connection.execute(_LOCK_ITEM_WITH_COMPLETIONS, {"item_id": item_id}).all()
    if not rows:
        session.rollback()
        raise FeedbackError(f"unknown item {item_id}", 404)
    completion_ids = [row.completion_id for row in rows]
    try:
        ranking = Ranking(prompt_id=rows[0].prompt_id, labeler_id=user.username, groups=groups, flagged=flagged)
        ranking.check_partition(set(completion_ids))
    except ValueError as exc:
        _assignment(session, user, item_id)  # not assigned: 403 first
        session.rollback()
        raise FeedbackError(f"invalid ranking: {exc}", 422) from None
    if connection.scalar(_CLAIM, {"claimed_item": item_id, "labeler": user.id,
                                  "stale_before": now() - ASSIGNMENT_TIMEOUT}) is None:
        return _submitted_again(session, user, item_id, groups, flagged)
    label_id = connection.scalar(_STORE_LABEL, {
        "item_id": item_id, "user_id": user.id, "groups": groups, "flagged": flagged, "seconds": seconds,
        "shown_order": answer_order(user.id, item_id, completion_ids)})
    session.commit()
    return Submitted(label_id, duplicate=False)


_LOCK_ITEM_WITH_COMPLETIONS = (select(Item.prompt_id, ItemCompletion.completion_id)
                               .join(ItemCompletion, ItemCompletion.item_id == Item.id)
                               .where(Item.id == bindparam("item_id")).order_by(ItemCompletion.index)
                               .with_for_update(of=Item))
_CLAIM = (update(Assignment.__table__).where(
    Assignment.item_id == bindparam("claimed_item"), Assignment.user_id == bindparam("labeler"),  # not column names
    Assignment.status == "open", Assignment.created_at > bindparam("stale_before"))
    .values(status="done").returning(Assignment.id))
_STORE_LABEL = insert(Label.__table__).returning(Label.id)


def _submitted_again(session: Session, user: AnyLabeler, item_id: int, groups: list[list[str]],
                     flagged: list[str]) -> Submitted:
    """A label the labeler's assignment could not take: the same submission again (a double click, a
    retry) answers as the first did; otherwise a refusal that says why."""
    existing = session.execute(select(Label.id, Label.groups, Label.flagged).where(
        Label.item_id == item_id, Label.user_id == user.id)).first()
    if existing is None:
        skipped = _assignment(session, user, item_id).status == "skipped"  # read before the rollback expires it
        session.rollback()
        reason = "you skipped this item" if skipped else (
            f"your assignment of this item expired (after {ASSIGNMENT_TIMEOUT}) and its place went back to the pool")
        raise FeedbackError(f"{reason}; the label was not stored: ask for the next item", 409)
    session.commit()
    if existing.groups == groups and sorted(existing.flagged) == sorted(flagged):
        return Submitted(existing.id, duplicate=True)
    raise FeedbackError("you already labeled this item; a label cannot be changed (undo works while the item "
                        "is still open)", 409)


def undo_last_label(session: Session, user: User, project: Project) -> int:
    """Take back the labeler's last label in the project, once, while its item is still open (has fewer
    than k labels, or is a gold item): the label is deleted and the item becomes the labeler's open item
    again (the item they were given next goes back to the pool). Only the last: a label stored before
    the labeler's previous undo in the project stays (pressing undo again does not reach further back).
    Returns the item id."""
    label = session.execute(select(Label.id, Label.item_id, Label.created_at).join(Item, Item.id == Label.item_id)
                            .where(Label.user_id == user.id, Item.project_id == project.id)
                            .order_by(Label.id.desc()).limit(1)).first()
    if label is None:
        session.rollback()
        raise FeedbackError("there is no label of yours to undo in this project", 404)
    last_undo = session.scalar(select(func.max(Assignment.undone_at)).where(
        Assignment.user_id == user.id, Assignment.project_id == project.id))
    if last_undo is not None and _aware(last_undo) >= _aware(label.created_at):
        session.rollback()
        raise FeedbackError("only your last label can be undone, and you took it back already", 409)
    # the label's item and that of the labeler's open item (given back), locked in id order like every writer
    given = session.scalar(select(Assignment.item_id).where(Assignment.user_id == user.id,
                                                            Assignment.project_id == project.id,
                                                            Assignment.status == "open"))
    locked = {label.item_id} if given is None else {label.item_id, given}
    session.connection().execute(_LOCK_ITEMS, {"item_ids": sorted(locked)})
    is_gold = session.scalar(select(Item.is_gold).where(Item.id == label.item_id))
    if session.scalar(select(Label.id).where(Label.id == label.id)) is None:  # another tab undid it meanwhile
        session.rollback()
        raise FeedbackError("that label was just undone (in another tab?): reload to see your item", 409)
    labels = session.scalar(select(func.count()).select_from(Label).where(Label.item_id == label.item_id))
    if not is_gold and labels >= project.overlap:
        session.rollback()
        raise FeedbackError(f"this item already has its {project.overlap} labels: they are final", 409)
    _end_assignments(session, delete(Assignment.__table__).where(
        Assignment.user_id == user.id, Assignment.project_id == project.id, Assignment.status == "open"), locked)
    session.execute(delete(Label).where(Label.id == label.id))
    try:
        moment = now()
        session.execute(update(Assignment).where(Assignment.item_id == label.item_id, Assignment.user_id == user.id)
                        .values(status="open", created_at=moment, undone_at=moment)
                        .execution_options(synchronize_session=False))
        _refuse_if_disabled(session, user)
        session.commit()
    except IntegrityError:  # a parallel /api/next of this labeler opened another item (not locked above)
        session.rollback()
        raise FeedbackError("your next item was being opened at the same moment: undo again", 409) from None
    return label.item_id


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


def position_bias(session: Session, project: Project) -> dict:
    """How often the answer ranked best was the one shown at each position. Without position bias the
    share at position p is about 1/N (N answers per item; ``chance`` is the mean of 1/N over the labels);
    a tie for first counts 1/|group| for each of its answers."""
    rows = session.execute(select(Label.groups, Label.shown_order).join(Item, Item.id == Label.item_id).where(
        Item.project_id == project.id, Label.shown_order.is_not(None))).all()
    session.commit()
    if not rows:
        return {"labels": 0, "best_at_position": [], "chance": None}
    width = max(len(order) for _, order in rows)
    best_at = [0.0] * width
    for groups, order in rows:
        for answer in groups[0]:
            best_at[order.index(answer)] += 1 / len(groups[0])
    return {"labels": len(rows), "best_at_position": [n / len(rows) for n in best_at],
            "chance": sum(1 / len(order) for _, order in rows) / len(rows)}


def assignment_overview(session: Session, project: Project) -> dict:
    """Skips per labeler, and the stranded items: regular items short of k labelers that fewer enabled
    labelers can still take than they need (everyone else labeled, skipped or let them expire). Timed-out
    assignments are expired first, as /api/next would, so that the counts are those that reopen_item acts on."""
    expire_stale_assignments(session, project, now() - ASSIGNMENT_TIMEOUT)
    skips = dict(session.execute(select(User.username, func.count()).join(Assignment, Assignment.user_id == User.id)
                                 .where(Assignment.project_id == project.id, Assignment.status == "skipped")
                                 .group_by(User.username).order_by(User.username)).all())
    labelers = set(session.scalars(select(User.id).where(User.role == "labeler", User.disabled.is_(False),
                                                         User.password_hash.is_not(None))))
    stranded = []
    for item in session.scalars(select(Item).where(Item.project_id == project.id, Item.is_gold.is_(False))
                                .order_by(Item.id)):
        rows = session.execute(select(Assignment.user_id, _holds_slot()).where(Assignment.item_id == item.id)).all()
        holders = sum(bool(holds) for _, holds in rows)
        could = len(labelers - {user_id for user_id, _ in rows})
        if holders < project.overlap and could < project.overlap - holders:
            stranded.append({"item_id": item.id, "prompt_id": item.prompt_id, "labels": holders,
                             "skipped_or_expired": sum(not holds for _, holds in rows)})
    session.commit()
    return {"skips": skips, "stranded": stranded}


def reopen_item(session: Session, item_id: int) -> int:
    """(admin) Offer a stranded item again to the labelers who skipped it or let it expire; returns how many.
    Timed-out assignments that nobody has marked expired yet are expired first, so they count too."""
    project = session.scalar(select(Project).join(Item, Item.project_id == Project.id).where(Item.id == item_id))
    if project is None:
        session.rollback()
        raise FeedbackError(f"unknown item {item_id}", 404)
    expire_stale_assignments(session, project, now() - ASSIGNMENT_TIMEOUT)
    released = session.execute(delete(Assignment).where(Assignment.item_id == item_id,
                                                        Assignment.status.in_(("skipped", "expired")))).rowcount
    session.commit()
    return released


def project_completions(session: Session, project: Project) -> list[Completion]:
    rows = session.execute(select(ItemCompletion, Item).join(Item, Item.id == ItemCompletion.item_id)
                           .where(Item.project_id == project.id)).all()
    return [Completion(id=c.completion_id, prompt_id=i.prompt_id, prompt=i.prompt_value, text=c.text, index=c.index,
                       model=c.model, truncated=c.truncated) for c, i in rows]


def export(session: Session, project: Project, keep_poor: bool = False) -> tuple[list[Ranking], list[PreferencePair]]:
    """The regular items' rankings and the consensus pairs; poor labelers are left out unless kept."""
    poor = set() if keep_poor else set(project_agreement(session, project).poor_labelers)
    kept = [r for r in rankings(session, project) if r.labeler_id not in poor]
    completions = [c for c in project_completions(session, project) if c.prompt_id in {r.prompt_id for r in kept}]
    return kept, rankings_to_pairs(kept, completions, consensus=project.consensus)
