"""A new version of one owner's adapter: DPO on their preference pairs, from the starting point.

Each version is trained from the starting point s (the population adapter, or the base model when there
is none) on all of the owner's pairs so far, and s is also the reference (its log-probs computed once,
before training):

    h     = β · [ (log π_θ(y_c|x) − log π_s(y_c|x)) − (log π_θ(y_r|x) − log π_s(y_r|x)) ]
    L_DPO = −mean log σ(h)                                     (rlhfkit.rl.dpo.dpo_loss)
    L     = L_DPO + α · mean[ −Σ_{t: y_t ≠ EOS} log π_θ(y_t|x, y_<t) / |{t: y_t ≠ EOS}| ]
                                                   (y = y_c; α = ``nll_coef``; 0 turns it off)
                  + γ · mean_{y ∈ {y_c, y_r}, t} KL( π_s(·|x, y_<t) ‖ π_θ(·|x, y_<t) )
                                                   (γ = ``kl_coef``; 0 turns it off)

The NLL term on the chosen answer (per token) keeps the answers fluent when a handful of pairs would
otherwise let DPO push both answers' probabilities down. It leaves out the chosen answer's EOS: where an
answer stops is what a length taste is about, and an NLL on the EOS of every whole chosen answer pulls the
adapter to stop where the base stops, against a user who likes longer answers (DPO's own log-probs keep
the EOS; ``nll_on_eos`` puts it in the NLL too; benchmarks/results/personal_tastes.md, runs 25–34).

The KL term compares whole next-token distributions at every position of both answers, against the
starting point's: DPO's own β only sees the log-probs of the sampled answers, so it lets the adapter pile
onto a few openers and sentences that are always chosen (the toy demo's answers narrowed below the variety
bar, benchmarks/results/personal_tastes.md runs 57–86). The forward direction keeps every token the start
gives mass to: a distribution collapsing onto one of them pays for each it dropped.

A non-finite loss or gradient stops training with the step and the cause (``TrainingDiverged``) before
the weights take it in; a failed training leaves the owner's previous version in use and no version
folder behind. The population adapter is the same training on everyone's pairs, from the base model; its
version records whose pairs (``users``), so that a user's deletion removes it (``PersonalModels.forget``).
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from sqlalchemy.orm import Session

from rlhfkit.config import require, require_field_types, require_seed
from rlhfkit.data.records import PreferencePair
from rlhfkit.models.policy import TokenBatch, completion_logits
from rlhfkit.models.update import TrainingDiverged, adamw, apply_gradients
from rlhfkit.personal.models import POPULATION, PersonalModels, StartRemoved, user_owner
from rlhfkit.personal.store import preference_pairs, user_choices, users_with_pairs
from rlhfkit.rl.dpo import dpo_loss, pair_tokens


@dataclass
class PersonalDPOConfig:
    beta: float = 0.1
    lr: float = 3e-4  # a session's trials on the toy policy: ≥ 5e-4 degenerated (LoRA, a handful of pairs)
    epochs: int = 4
    batch_size: int = 8  # pairs per step
    nll_coef: float = 1.0  # α of the NLL term on the chosen answer (0: plain DPO)
    nll_on_eos: bool = False  # the NLL term also on the chosen answer's EOS (it teaches the base's stopping)
    kl_coef: float = 0.0  # γ of the per-token forward KL to the starting point (0: off)
    max_grad_norm: float = 1.0
    max_prompt_tokens: int = 256
    max_completion_tokens: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        require_field_types(self)
        for name in ("beta", "lr", "max_grad_norm"):
            require(getattr(self, name) > 0, name, "must be positive")
        for name in ("epochs", "batch_size", "max_prompt_tokens", "max_completion_tokens"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        require(self.nll_coef >= 0, "nll_coef", "must be at least 0 (0 turns the NLL term off)")
        require(self.kl_coef >= 0, "kl_coef", "must be at least 0 (0 turns the KL term off)")
        require_seed(self.seed)


def pair_batch(models: PersonalModels, pairs: Sequence[PreferencePair], config: PersonalDPOConfig) -> TokenBatch:
    """Chosen completions then rejected ones, as the model reads them (its prompt format)."""
    return pair_tokens(pairs, models.tokenizer, models.use_chat_template, config.max_prompt_tokens,
                       config.max_completion_tokens, models.model)


def completion_log_distributions(models: PersonalModels, batch: TokenBatch) -> tuple[torch.Tensor, TokenBatch]:
    """log π(·|x, y_<t) at every completion position of the active adapter ([B, T, V], fp32), and the batch
    on the model's device."""
    batch = batch.to(next(models.model.parameters()).device)
    logits, _ = completion_logits(models.model, batch)
    return torch.log_softmax(logits.float(), dim=-1), batch


def completion_token_logprobs(models: PersonalModels, batch: TokenBatch) -> tuple[torch.Tensor, TokenBatch]:
    """log π(y_t|x, y_<t) per completion token of the active adapter, 0 past the completion ([B, T]), and
    the batch on the model's device."""
    log_distributions, batch = completion_log_distributions(models, batch)
    return token_logprobs_from(log_distributions, batch), batch


def token_logprobs_from(log_distributions: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """log π(y_t|…) of each completion token (of chosen and rejected answers alike) from the distributions
    [B, T, V], 0 past the completion."""
    return log_distributions.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1) * batch.completion_mask


def forward_kl(reference: torch.Tensor, policy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over the tokens in ``mask`` [B, T] of KL(π_s ‖ π_θ) = Σ_v π_s(v) (log π_s(v) − log π_θ(v)), from
    log-distributions [B, T, V] (a token π_s gives no mass adds nothing, whatever π_θ gives it)."""
    per_token = torch.where(reference.isinf(), 0.0, reference.exp() * (reference - policy)).sum(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def sequence_logprobs(models: PersonalModels, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t log π(y_t|x, y_<t), the number of completion tokens) per row, for the active adapter."""
    logprobs, batch = completion_token_logprobs(models, batch)
    return logprobs.sum(dim=1), batch.completion_mask.sum(dim=1)


def personal_loss(logprobs: torch.Tensor, reference: torch.Tensor, nll_mask: torch.Tensor,
                  config: PersonalDPOConfig, kl: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L = L_DPO + α · NLL per token of the chosen answers + γ · ``kl``, the margins h) for a batch's
    per-token log-probs [B, T] (0 past each completion; chosen rows first, then rejected), the reference's
    sequence log-probs [B], the chosen rows' tokens the NLL counts (``nll_mask``, [B/2, T]) and the mean
    per-token KL to the starting point (``forward_kl``; needed when γ > 0)."""
    half = len(logprobs) // 2
    policy = logprobs.sum(dim=1)
    loss, margins = dpo_loss(policy[:half], policy[half:], reference[:half], reference[half:], config.beta)
    if config.nll_coef:
        nll = -(logprobs[:half] * nll_mask).sum(dim=1) / nll_mask.sum(dim=1).clamp(min=1)
        loss = loss + config.nll_coef * nll.mean()
    if config.kl_coef:
        loss = loss + config.kl_coef * kl
    return loss, margins


def nll_tokens(batch: TokenBatch, eos_token_id: int, config: PersonalDPOConfig) -> torch.Tensor:
    """The chosen rows' completion tokens the NLL term counts: all but the EOS (an answer cut at the
    generation limit has none to leave out); with ``config.nll_on_eos``, all of them."""
    chosen = batch[: len(batch) // 2]
    if config.nll_on_eos:
        return chosen.completion_mask
    return chosen.completion_mask * (chosen.completion_ids != eos_token_id)


def train_user(models: PersonalModels, session: Session, user_id: int, config: PersonalDPOConfig) -> int | None:
    """The user's next version, trained on all their pairs; None when they have none (e.g. deleted). The
    pairs are read under the user's training lock, so a deletion either waits for it or comes first. A
    version whose starting point another user's deletion removed meanwhile is trained again from the
    current one."""
    owner = user_owner(user_id)
    with models.training_of(owner):
        while True:
            pairs = preference_pairs(user_choices(session, user_id))
            session.rollback()  # no transaction held during training
            try:
                return train_version(models, owner, pairs, config)[0] if pairs else None
            except StartRemoved:
                continue  # each removal is final (its number is not given again): this ends


def train_population(models: PersonalModels, session: Session, config: PersonalDPOConfig) -> int | None:
    """The population adapter's next version, trained from the base model on every user's pairs."""
    with models.training_of(POPULATION):
        users = users_with_pairs(session)
        pairs = [p for user_id in users for p in preference_pairs(user_choices(session, user_id))]
        session.rollback()
        return train_version(models, POPULATION, pairs, config, users)[0] if pairs else None


def train_version(models: PersonalModels, owner: str, pairs: Sequence[PreferencePair],
                  config: PersonalDPOConfig, users: Sequence[int] | None = None) -> tuple[int, list[dict]]:
    """OWNER's next adapter version trained on ``pairs`` and published; returns (version, per-step history).
    ``users``: whose pairs these are, recorded in the version (without it a deletion of anyone removes a
    population version). On any failure the half-trained adapter is dropped and the previous version stays
    in use."""
    if not pairs:
        raise ValueError(f"{owner}: no preference pairs to train on (choices of 'a' or 'b')")
    with models.training_of(owner):
        name = models.next_adapter(owner)
        try:
            with models.lock:  # the starting point cannot change between its copy and its log-probs
                start = models.starting_point(owner)
                start_saved = models.saved_as(start)
                models.new_adapter(name, start)
                # the KL term's π_s at every step: a frozen copy (the start may leave memory meanwhile), or the base
                kl_reference = models.new_adapter(f"{name}-start", start) if config.kl_coef and start else None
                tokens = [pair_batch(models, pairs[i:i + config.batch_size], config)
                          for i in range(0, len(pairs), config.batch_size)]
                with torch.no_grad(), models.active(start):
                    reference = [sequence_logprobs(models, t)[0] for t in tokens]
            history = _optimise(models, name, tokens, reference, config, kl_reference)
            info = {"pairs": len(pairs), "start": start or "base", "config": asdict(config), "final": history[-1]}
            if users is not None:
                info["users"] = sorted(users)
            return models.publish(owner, name, info, start_saved), history
        except BaseException:
            models.delete_adapter(name)
            raise
        finally:
            models.delete_adapter(f"{name}-start")


def _optimise(models: PersonalModels, adapter: str, tokens: Sequence[TokenBatch], reference: Sequence[torch.Tensor],
              config: PersonalDPOConfig, kl_reference: str | None = None) -> list[dict]:
    """The DPO steps on ``adapter`` over the pair batches ``tokens``, whose reference log-probs are given;
    ``kl_reference``: the adapter holding π_s for the KL term (None: the base model). Each step holds the
    model's lock only for its own forwards, backward and update, so answers are served in between."""
    device = next(models.model.parameters()).device
    accelerator = Accelerator(cpu=device.type == "cpu")
    with models.active(adapter):  # peft makes the active adapter's weights the trainable ones
        parameters = [p for n, p in models.model.named_parameters() if f".{adapter}." in n]
    optimizer = adamw(parameters, config.lr, device)
    rng, history, step = random.Random(config.seed), [], 0
    for _ in range(config.epochs):
        for index in rng.sample(range(len(tokens)), len(tokens)):
            step += 1
            with models.lock:
                loss, margins, kl = _step_loss(models, adapter, kl_reference, tokens[index],
                                               reference[index].to(device), config)
                try:
                    grad_norm = apply_gradients(accelerator, models.model, optimizer, loss, config.max_grad_norm)
                except TrainingDiverged as exc:
                    raise TrainingDiverged(f"personal dpo of {adapter} stopped at step {step}: {exc}") from None
            history.append({"step": step, "loss": loss.item(), "margin": margins.mean().item(),
                            "accuracy": (margins > 0).float().mean().item(), "grad_norm": grad_norm,
                            **({"kl": kl.item()} if kl is not None else {})})
    optimizer.zero_grad()  # the adapter is served from now on: its last gradients would double its memory
    return history


def _step_loss(models: PersonalModels, adapter: str, kl_reference: str | None, batch: TokenBatch,
               reference: torch.Tensor, config: PersonalDPOConfig
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(L, the margins h, the KL term or None when γ = 0) of one batch, under the model's lock. Its own
    function so that the [B, T, V] distributions are freed when it returns (the backward frees what the
    graph keeps of them), not held into the next step's forwards."""
    kl = None
    if config.kl_coef:  # before the policy's forward: activating an adapter sets what is trainable
        with torch.no_grad(), models.active(kl_reference):
            start_distributions, _ = completion_log_distributions(models, batch)
    with models.active(adapter):  # the model stays in eval mode: dropout off, as in rl.dpo
        distributions, batch = completion_log_distributions(models, batch)
        if config.kl_coef:
            kl = forward_kl(start_distributions, distributions, batch.completion_mask)
        loss, margins = personal_loss(token_logprobs_from(distributions, batch), reference,
                                      nll_tokens(batch, models.tokenizer.eos_token_id, config), config, kl)
    return loss, margins, kl


class TrainingQueue:
    """Trainings run in one background thread, one at a time (so one at a time per user), in the order
    queued. ``trigger(user_id, pairs_now, pairs_trained)`` queues ``train(user_id)`` when the user has
    ``every`` new pairs since their last version and no training of theirs is waiting or running (their new
    pairs count at the next choice after it); ``submit(owner)`` queues one regardless (a user id, or
    ``POPULATION``)."""

    def __init__(self, train: Callable[[int | str], object], every: int) -> None:
        require(every >= 1, "train_every", "must be at least 1")
        self.train, self.every = train, every
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personal-training")
        self.waiting: Counter[int | str] = Counter()  # trainings queued or running, per user id (or population)
        self.lock = threading.RLock()
        self.errors: dict[int | str, str] = {}  # user id (or population) → the last failed training's cause

    def trigger(self, user_id: int, pairs_now: int, pairs_trained: int) -> Future | None:
        if pairs_now - pairs_trained < self.every:
            return None
        with self.lock:  # re-entrant: the check and the queueing are one step
            return None if self.waiting[user_id] else self.submit(user_id)

    def submit(self, owner: int | str) -> Future:
        with self.lock:
            self.waiting[owner] += 1
        return self.executor.submit(self._run, owner)

    def _run(self, owner: int | str) -> None:
        try:
            self.train(owner)
            self.errors.pop(owner, None)
        except Exception as exc:  # the server keeps serving the previous version; the page shows why
            self.errors[owner] = f"{type(exc).__name__}: {exc}"
        finally:  # only now: until its version is published, its pairs still look untrained
            with self.lock:
                self.waiting[owner] -= 1

    def wait(self) -> None:
        """Return once every training queued so far has ended."""
        self.executor.submit(lambda: None).result()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
