"""`rlhfkit personal serve | train`: personal models over the feedback app's database and accounts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rlhfkit.console import console, friendly_errors
from rlhfkit.feedback.cli import DEFAULT_DB, DbOption, _session

personal_app = typer.Typer(help="Personal models: a LoRA adapter per user, trained by DPO on their own choices.",
                           no_args_is_help=True)

PolicyOption = Annotated[str, typer.Option(help="The shared base policy: a hub id or a model folder.")]
AdaptersOption = Annotated[Path, typer.Option(help="Folder of the adapters (one sub-folder per user, a version "
                                                   "per training).")]
DEFAULT_ADAPTERS = Path("runs/personal")
ChatTemplateOption = Annotated[bool | None, typer.Option(
    help="Apply the tokenizer's chat template (default: when it has one).")]


def _models(policy: str, adapters: Path, chat_template: bool | None, lora_r: int, max_in_memory: int = 1000):
    from rlhfkit.generate import uses_chat_template
    from rlhfkit.models.policy import load_policy
    from rlhfkit.personal.models import PersonalModels

    model, tokenizer = load_policy(policy, dtype="float32")
    return PersonalModels(model, tokenizer, adapters, lora_r=lora_r, lora_alpha=2 * lora_r,
                          use_chat_template=uses_chat_template(tokenizer, model, chat_template),
                          max_in_memory=max_in_memory)


def _dpo_config(lr: float, epochs: int, beta: float, nll_coef: float, kl_coef: float):
    from rlhfkit.personal.train import PersonalDPOConfig

    return PersonalDPOConfig(lr=lr, epochs=epochs, beta=beta, nll_coef=nll_coef, kl_coef=kl_coef)


LrOption = Annotated[float, typer.Option(help="Learning rate of the adapter.")]
EpochsOption = Annotated[int, typer.Option(help="Passes over the user's pairs per version.")]
BetaOption = Annotated[float, typer.Option(help="β of DPO (strength of the pull towards the starting point).")]
NllOption = Annotated[float, typer.Option(help="α of the NLL term on the chosen answer (0: plain DPO).")]
KlOption = Annotated[float, typer.Option(help="γ of the per-token KL to the starting point, which keeps the "
                                              "answers as varied as the start's (the personal demo's: 2; 0: off).")]
LoraROption = Annotated[int, typer.Option(min=1, help="LoRA rank of new adapters (alpha = 2 × rank).")]


@personal_app.command()
@friendly_errors
def train(
    policy: PolicyOption,
    db: DbOption = DEFAULT_DB,
    adapters: AdaptersOption = DEFAULT_ADAPTERS,
    user: Annotated[str | None, typer.Option(help="Train this user's next version.")] = None,
    all_users: Annotated[bool, typer.Option("--all", help="Train every user who gave a pair.")] = False,
    population: Annotated[bool, typer.Option(help="Train the population adapter on everyone's pairs (first, "
                                                  "so that the users' versions start from it).")] = False,
    lr: LrOption = 3e-4, epochs: EpochsOption = 4, beta: BetaOption = 0.1, nll_coef: NllOption = 1.0,
    kl_coef: KlOption = 0.0, lora_r: LoraROption = 8, chat_template: ChatTemplateOption = None,
) -> None:
    """A new adapter version per user (each from the starting point, on all of that user's pairs)."""
    from sqlalchemy import select

    from rlhfkit.feedback.db import User
    from rlhfkit.personal.models import POPULATION, user_owner
    from rlhfkit.personal.store import users_with_pairs
    from rlhfkit.personal.train import train_population, train_user

    if user is not None and all_users:
        raise ValueError("--user and --all: give one of them")
    if user is None and not all_users and not population:
        raise ValueError("say whose model to train: --user NAME, --all, or --population")
    config = _dpo_config(lr, epochs, beta, nll_coef, kl_coef)
    with _session(db, create=False) as session:
        names = dict(session.execute(select(User.id, User.username)).all())
        if user is not None and user not in names.values():
            raise ValueError(f"{db}: no user named {user!r}")
        ids = users_with_pairs(session) if all_users else [i for i, n in names.items() if n == user]
        models = _models(policy, adapters, chat_template, lora_r)
        if population:
            _report(models, POPULATION, "population", train_population(models, session, config))
        for user_id in ids:
            _report(models, user_owner(user_id), names[user_id], train_user(models, session, user_id, config))


def _report(models, owner: str, shown: str, version: int | None) -> None:
    if version is None:
        console.print(f"{shown}: no preference pairs (choices of A or B) yet: nothing trained")
        return
    try:
        info = models.version_info(owner, version)
    except FileNotFoundError:  # a deletion in `personal serve` was waiting for this training to end
        why = {r["version"]: r["removed"] for r in models.removed_versions(owner)}.get(version, "removed")
        console.print(f"{shown}: version {version} was removed right after it was published ({why})")
        return
    console.print(f"{shown}: version {version} on {info['pairs']} pairs (from {info['start']}); last step: loss "
                  f"{info['final']['loss']:.4f}, margin {info['final']['margin']:+.4f} → {models.folder / owner}")


@personal_app.command()
@friendly_errors
def serve(
    policy: PolicyOption,
    db: DbOption = DEFAULT_DB,
    adapters: AdaptersOption = DEFAULT_ADAPTERS,
    train_every: Annotated[int, typer.Option(min=1, help="New pairs of a user that start a training of their "
                                                         "next version (in the background).")] = 8,
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    secure_cookies: Annotated[bool, typer.Option(help="Mark session cookies Secure (serve over HTTPS).")] = False,
    max_in_memory: Annotated[int, typer.Option(min=1, help="Users' adapters kept in memory; the least recently "
                                                           "used is dropped and read again when needed.")] = 1000,
    lr: LrOption = 3e-4, epochs: EpochsOption = 4, beta: BetaOption = 0.1, nll_coef: NllOption = 1.0,
    kl_coef: KlOption = 0.0, lora_r: LoraROption = 8, chat_template: ChatTemplateOption = None,
    rerank_n: Annotated[int, typer.Option(help="Cold start: until a user's first version, their answer is the best "
                                               "of this many samples by their preference head (0: off).")] = 4,
    rerank_min_pairs: Annotated[int, typer.Option(help="Pairs a user gives before their head reranks.")] = 4,
    rerank_encoder: Annotated[str, typer.Option(help="The heads' shared encoder: a sentence-transformers model or "
                                                     "an encoder folder, such as a reward model's (default: the "
                                                     "offline MiniLM-L6).")] = "",
) -> None:
    """The feedback app with the personal-model page at /personal, in one process (the base model and the
    adapters are in its memory). Accounts are the feedback app's: `rlhfkit feedback user --name NAME`."""
    import uvicorn
    from sqlalchemy import func, select

    from rlhfkit.feedback.app import create_app
    from rlhfkit.feedback.db import User
    from rlhfkit.personal.api import PersonalSettings, include_personal
    from rlhfkit.personal.rerank import RerankConfig

    settings = PersonalSettings(train_every=train_every, dpo=_dpo_config(lr, epochs, beta, nll_coef, kl_coef),
                                rerank=RerankConfig(n=rerank_n, min_pairs=rerank_min_pairs, encoder=rerank_encoder))
    with _session(db) as session:
        accounts = session.scalar(select(func.count()).select_from(User))
    models = _models(policy, adapters, chat_template, lora_r, max_in_memory)
    app = create_app(db, secure_cookies)
    queue = include_personal(app, models, settings)
    if settings.rerank.n:
        app.state.personal_reranker.load_encoder()  # a wrong --rerank-encoder stops here, not at a user's answer
    console.print(f"personal models on http://{host}:{port}/personal, database {db} ({accounts} accounts; add "
                  f"one with `rlhfkit feedback user --name NAME --db {db}`), adapters in {adapters}")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        queue.shutdown()
