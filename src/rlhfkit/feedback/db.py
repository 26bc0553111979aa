"""The labeling database: SQLAlchemy 2 models, the engine, and Alembic migrations applied on start-up.

SQLite (a file; the default) or PostgreSQL (``postgresql+psycopg://...``). SQLite runs in WAL mode with
``synchronous=FULL``, so a label whose request got a success response survives a ``kill -9``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config


def now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(256))  # None until the invite is used
    role: Mapped[str] = mapped_column(String(16), default="labeler")  # admin | labeler
    invite_token: Mapped[str | None] = mapped_column(String(64), unique=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)  # an admin turned the account off
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    criterion: Mapped[str] = mapped_column(String(128))
    instructions: Mapped[str] = mapped_column(Text, default="")  # Markdown
    overlap: Mapped[int] = mapped_column(Integer, default=3)  # labelers per item (k)
    consensus: Mapped[str] = mapped_column(String(32), default="borda")
    gold_rate: Mapped[float] = mapped_column(Float, default=0.0)  # chance that the next item is a gold item
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    items: Mapped[list[Item]] = relationship(back_populates="project")


class Item(Base):
    """One prompt and its N completions, to be ranked.

    ``free_slots`` = max(0, k − (the item's assignments that hold a slot: open or done, ``slot`` not NULL)), kept
    in the transaction that takes or frees a slot, under the item's row lock; it cannot go below 0 (a
    CHECK), so an item cannot be over-filled. Gold items have no slots (0). /api/next picks by it.
    """

    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("project_id", "prompt_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    prompt_id: Mapped[str] = mapped_column(String(256))
    prompt: Mapped[str] = mapped_column(Text)  # JSON: a string or a list of chat messages
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    gold_groups: Mapped[list | None] = mapped_column(JSON)  # the known answer of a gold item
    free_slots: Mapped[int] = mapped_column(Integer, CheckConstraint("free_slots >= 0"), default=0)
    project: Mapped[Project] = relationship(back_populates="items")
    completions: Mapped[list[ItemCompletion]] = relationship(order_by="ItemCompletion.index")

    @property
    def prompt_value(self):
        return json.loads(self.prompt)


class ItemCompletion(Base):
    __tablename__ = "completions"
    __table_args__ = (UniqueConstraint("item_id", "completion_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    completion_id: Mapped[str] = mapped_column(String(256))
    text: Mapped[str] = mapped_column(Text)
    index: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(256), default="")
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)  # cut at max_new_tokens (Completion.truncated)


class Assignment(Base):
    """An item handed to a labeler: open until labeled (done), skipped, or expired (its slot was freed).

    A regular item's assignment holds one of its k slots (``slot`` in 0..k-1) while open or done; the
    partial unique index on (item, slot) makes a second holder of a slot impossible, and the one on
    (labeler, project) over open assignments gives a labeler one open item per project. Gold items
    have no slots (``slot`` is NULL): every labeler may get them.
    """

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("item_id", "user_id"),
        Index("one_holder_per_slot", "item_id", "slot", unique=True,
              sqlite_where=text("status IN ('open', 'done')"), postgresql_where=text("status IN ('open', 'done')")),
        Index("one_open_item_per_labeler", "user_id", "project_id", unique=True,
              sqlite_where=text("status = 'open'"), postgresql_where=text("status = 'open'")),
        Index("open_assignments_by_age", "project_id", "created_at",
              sqlite_where=text("status = 'open'"), postgresql_where=text("status = 'open'")),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    slot: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | done | skipped | expired
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    undone_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # the labeler's undo of its label


class Label(Base):
    """A labeler's ranking of an item: groups best first (a group of several is a tie), flags."""

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    groups: Mapped[list] = mapped_column(JSON)
    flagged: Mapped[list] = mapped_column(JSON, default=list)
    seconds: Mapped[float | None] = mapped_column(Float)  # time the labeler spent, as reported by the page
    shown_order: Mapped[list | None] = mapped_column(JSON)  # completion ids in the order the labeler saw them
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class WebSession(Base):
    """A logged-in browser or API client. The cookie carries a random token; the table keeps its SHA-256,
    so deleting the row (logout, password change, account disabled) ends the session at once."""

    __tablename__ = "web_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256(token), hex
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LoginFailures(Base):
    """Recent failed logins of one account (``user:NAME``) or one client address (``ip:ADDR``)."""

    __tablename__ = "login_failures"
    key: Mapped[str] = mapped_column(String(160), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Setting(Base):
    """Server settings kept across restarts (e.g. the session signing key)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def normalise_url(url: str) -> str:
    """A bare path means a SQLite file; postgresql:// uses the psycopg 3 driver."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def checkpoint(engine: Engine) -> None:
    """SQLite: the write-ahead log copied into the database file and emptied, so that rows deleted before are in
    neither (the log keeps every page as written, a deleted row's text too, until a checkpoint; the file's copy is
    zeroed: ``secure_delete``). A reader holding a snapshot leaves the log as it is; PostgreSQL: nothing."""
    if engine.dialect.name == "sqlite":
        connection = engine.raw_connection()
        try:
            connection.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            connection.close()


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20,
                               max_overflow=40)

        @event.listens_for(engine, "connect")
        def _sqlite_setup(connection, _record) -> None:
            connection.isolation_level = None  # transactions are begun below, not by pysqlite
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA secure_delete=ON")  # a deleted row's bytes zeroed, not left in the free pages
            cursor.close()

        # BEGIN IMMEDIATE: a transaction takes the write lock at its start, so concurrent writers queue
        # (busy timeout) instead of failing half-way. Transactions are therefore kept short: the app
        # commits as soon as it has read what it needs (see app.current_user, service.authenticate).
        @event.listens_for(engine, "begin")
        def _begin_immediate(connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # Per server process: `serve --workers N` opens up to N × 15 connections, which must stay under
    # PostgreSQL's max_connections (100 by default); requests beyond 15 wait for a free connection.
    # No pre-ping: it cost a round trip per checkout (3 per /api/next); after a database restart the
    # first request on a dead connection fails and SQLAlchemy then replaces the whole pool.
    return create_engine(url, pool_size=10, max_overflow=5)


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration for our migrations, run on ``connection``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to ``revision``, the latest by default (creates it on an empty database)."""
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)


def session_factory(url: str) -> sessionmaker:
    engine = make_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)
