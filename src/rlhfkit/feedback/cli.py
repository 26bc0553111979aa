"""`rlhfkit feedback serve | project | user | export | simulate`: the labeling app from the command line."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rlhfkit.console import console, friendly_errors

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

feedback_app = typer.Typer(help="The human-feedback web app: labelers rank completions; agreement, export.",
                           no_args_is_help=True)

DbOption = Annotated[str, typer.Option(help="Database: a SQLite file path, or postgresql://user@host/db.")]
DEFAULT_DB = "runs/feedback.db"


@contextmanager
def _session(db: str, create: bool = True) -> Iterator[Session]:
    """A session on the database (migrated first; a SQLite file is made unless ``create`` is false). An
    unreachable or unknown database and a refused request (a name that exists, a project that does not)
    end the command with one line naming ``db``."""
    from sqlalchemy.exc import SQLAlchemyError

    from rlhfkit.feedback.db import session_factory
    from rlhfkit.feedback.service import FeedbackError

    if "://" not in db:
        if not create and not Path(db).expanduser().is_file():
            raise ValueError(f"{db}: no such database file")
        Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        with session_factory(db)() as session:
            yield session
    except FeedbackError as exc:
        raise ValueError(f"{db}: {exc.message}") from None
    except SQLAlchemyError as exc:  # the driver's own error (e.g. connection refused) says most
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split()).partition(" (Background on")[0]
        raise ValueError(f"{db}: cannot use the database: {reason}") from None
    except ImportError as exc:
        raise ValueError(f"{db}: no driver for this database ({exc})") from None


@feedback_app.command()
@friendly_errors
def serve(
    db: DbOption = DEFAULT_DB,
    host: str = "127.0.0.1",
    port: int = 8000,
    secure_cookies: Annotated[bool, typer.Option(help="Mark session cookies Secure (serve over HTTPS).")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Server processes (each opens up to 15 PostgreSQL "
                                                     "connections).")] = 1,
    threads: Annotated[int, typer.Option(min=1, help="Requests per server process that run their database work "
                                                     "at once; the others wait on the event loop.")] = 8,
    forwarded_allow_ips: Annotated[str | None, typer.Option(
        help="Comma-separated addresses of your reverse proxies: only requests from them may set the client "
             "address with X-Forwarded-For (used for login throttling). Unset: the header is ignored.")] = None,
) -> None:
    """Start the app (migrations are applied first). The first start creates an `admin` account with the
    password in $RLHFKIT_ADMIN_PASSWORD, or a generated one that is printed once."""
    import uvicorn
    from sqlalchemy import select

    from rlhfkit.feedback import service
    from rlhfkit.feedback.db import User

    with _session(db) as session:
        if session.scalar(select(User).where(User.role == "admin")) is None:
            given = os.environ.get("RLHFKIT_ADMIN_PASSWORD")
            if given is not None and len(given) < service.MIN_PASSWORD_LENGTH:
                raise ValueError(f"$RLHFKIT_ADMIN_PASSWORD is {'empty' if not given else 'too short'}: set a "
                                 f"password of at least {service.MIN_PASSWORD_LENGTH} characters, or unset the "
                                 "variable to have one generated and printed")
            password = given or secrets.token_urlsafe(12)
            service.create_user(session, "admin", "admin", password=password)
            shown = "from $RLHFKIT_ADMIN_PASSWORD" if given else password
            console.print(f"created the admin account: user [bold]admin[/], password [bold]{shown}[/]")
    os.environ["RLHFKIT_FEEDBACK_DB"] = db
    os.environ["RLHFKIT_SECURE_COOKIES"] = "1" if secure_cookies else ""
    os.environ["RLHFKIT_THREADS"] = str(threads)
    app_from_environment()  # the app's own start-up writes (the session key) happen once here, not in racing workers
    console.print(f"labeling app on http://{host}:{port}/ (admin: /admin), database {db}")
    uvicorn.run("rlhfkit.feedback.cli:app_from_environment", factory=True, host=host, port=port, workers=workers,
                proxy_headers=forwarded_allow_ips is not None, forwarded_allow_ips=forwarded_allow_ips,
                log_level="warning", access_log=False)


def app_from_environment():
    """The app for uvicorn's factory mode (one per worker process)."""
    from rlhfkit.feedback.app import create_app

    return create_app(os.environ["RLHFKIT_FEEDBACK_DB"], bool(os.environ.get("RLHFKIT_SECURE_COOKIES")),
                      int(os.environ.get("RLHFKIT_THREADS", "8")))


@feedback_app.command()
@friendly_errors
def project(
    name: Annotated[str, typer.Option(help="Project name.")],
    completions: Annotated[Path, typer.Option(help="Completions JSONL from `rlhfkit generate`.")],
    criterion: Annotated[str, typer.Option(help="What labelers rank by, e.g. helpfulness, harmlessness.")],
    db: DbOption = DEFAULT_DB,
    instructions: Annotated[Path | None, typer.Option(help="Markdown file shown to labelers.")] = None,
    overlap: Annotated[int, typer.Option(help="Labelers per item (k).")] = 3,
    consensus: Annotated[str, typer.Option(help="borda or ranked_pairs.")] = "borda",
    gold: Annotated[Path | None, typer.Option(help="Rankings JSONL: known answers of gold items.")] = None,
    gold_rate: Annotated[float, typer.Option(help="Chance that a labeler's next item is a gold item.")] = 0.1,
) -> None:
    """Create a labeling project from a completions file (one item per prompt)."""
    from rlhfkit.data.io import read_records
    from rlhfkit.data.records import Completion, Ranking
    from rlhfkit.feedback import service

    records = read_records(completions, Completion, allow_empty=False)
    answers = read_records(gold, Ranking, allow_empty=False) if gold else []
    with _session(db) as session:
        created = service.create_project(session, name, criterion, records,
                                         instructions.read_text() if instructions else "", overlap, consensus,
                                         answers, gold_rate)
        console.print(f"project {created.name!r}: {len({c.prompt_id for c in records})} items "
                      f"({len(answers)} gold), {overlap} labelers each")


@feedback_app.command()
@friendly_errors
def user(
    name: Annotated[str, typer.Option(help="Username.")],
    db: DbOption = DEFAULT_DB,
    role: Annotated[str, typer.Option(help="labeler or admin.")] = "labeler",
) -> None:
    """Create an account; prints the invite link path with which its owner sets a password."""
    from rlhfkit.feedback import service

    with _session(db) as session:
        created = service.create_user(session, name, role)
        console.print(f"{role} {name!r}: send them /invite/{created.invite_token}")


@feedback_app.command()
@friendly_errors
def export(
    project: Annotated[str, typer.Option(help="Project name.")],
    db: DbOption = DEFAULT_DB,
    rankings: Annotated[Path | None, typer.Option(help="Write the rankings JSONL here.")] = None,
    pairs: Annotated[Path | None, typer.Option(help="Write the consensus preference pairs JSONL here.")] = None,
    keep_poor: Annotated[bool, typer.Option(help="Keep the labelers flagged as poor.")] = False,
) -> None:
    """Export rankings and/or pairs (poor labelers left out unless --keep-poor), with agreement figures."""
    from rlhfkit.data.io import write_records
    from rlhfkit.feedback import service

    if rankings is None and pairs is None:
        raise ValueError("nothing to export: pass --rankings and/or --pairs")
    with _session(db, create=False) as session:
        chosen = service.get_project(session, project)
        stats = service.project_agreement(session, chosen)
        kept, consensus_pairs = service.export(session, chosen, keep_poor)
    if not kept or (pairs is not None and not consensus_pairs):
        left_out = "" if keep_poor or not stats.poor_labelers else " (poor labelers left out; --keep-poor keeps them)"
        raise ValueError(f"{db}: project {project!r} has no {'rankings' if not kept else 'pairs'} to export"
                         f"{left_out}")
    if rankings is not None:
        write_records(rankings, kept)
    if pairs is not None:
        write_records(pairs, consensus_pairs)
    console.print(f"{len(kept)} rankings, {len(consensus_pairs)} pairs; Krippendorff α "
                  f"{stats.krippendorff_alpha:.3f}; poor labelers: {', '.join(stats.poor_labelers) or 'none'}"
                  + (" (kept)" if keep_poor else " (left out)"))


@feedback_app.command()
@friendly_errors
def simulate(
    url: Annotated[str, typer.Option(help="The running app, e.g. http://127.0.0.1:8000.")],
    project: Annotated[str | None, typer.Option(help="Project name [default: the first].")] = None,
    labelers: Annotated[str, typer.Option(help="Comma-separated kinds: good, noisy, random, adversarial, "
                                               "tie-happy.")] = "good,good,noisy,random",
    quality: Annotated[str, typer.Option(help="The hidden quality they rank by (a reward spec).")
                       ] = "judge:sentiment",
    admin_user: str = "admin",
    admin_password: Annotated[str | None, typer.Option(
        help="[default: $RLHFKIT_ADMIN_PASSWORD]")] = None,
    seed: int = 0,
) -> None:
    """Simulated labelers create accounts and label through the same API as people (for demos and tests)."""
    from concurrent.futures import ThreadPoolExecutor

    from rlhfkit.feedback.client import FeedbackClient, SimulatedSession, accept_invite
    from rlhfkit.feedback.simulated import KINDS
    from rlhfkit.reward.spec import load_reward

    password = admin_password or os.environ.get("RLHFKIT_ADMIN_PASSWORD")
    if not password:
        raise ValueError("the admin password: pass --admin-password or set $RLHFKIT_ADMIN_PASSWORD")
    kinds = [k.strip() for k in labelers.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown labeler kinds {unknown}; choose from {sorted(KINDS)}")
    admin = FeedbackClient(url, admin_user, password)
    score = load_reward(quality)
    sessions = []
    for i, kind in enumerate(kinds):
        name, secret = f"sim-{kind}-{i}-{secrets.token_hex(2)}", secrets.token_urlsafe(12)
        accept_invite(url, admin.create_user(name), secret)
        sessions.append(SimulatedSession(FeedbackClient(url, name, secret), KINDS[kind](name), score))
    with ThreadPoolExecutor(len(sessions)) as pool:
        counts = list(pool.map(lambda s: s[1].run(project, seed=seed + s[0]), enumerate(sessions)))
    figures = admin.stats(project)["agreement"]
    console.print(f"{sum(counts)} labels from {len(sessions)} simulated labelers; pairwise agreement "
                  f"{figures['pairwise_agreement']}, Krippendorff α {figures['krippendorff_alpha']}; "
                  f"flagged as poor: {', '.join(figures['poor_labelers']) or 'none'}")
