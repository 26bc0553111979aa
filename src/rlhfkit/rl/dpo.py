"""Direct Preference Optimisation (Rafailov et al. 2023), straight from preference pairs.

With log-probs summed over the completion's tokens (EOS included when the completion is whole),

    h = β · [ (log π_θ(y_c|x) − log π_ref(y_c|x)) − (log π_θ(y_r|x) − log π_ref(y_r|x)) ]
    L = −E[ y log σ(h) + (1 − y) log σ(−h) ]                 (the sigmoid loss, soft targets)

where y is the pair's ``label``, the probability that the chosen completion is the better one (1 for
a hard preference, where L = −E[log σ(h)]; e.g. 0.7 from AI feedback, Mitchell 2023's conservative DPO).
β · (log π_θ − log π_ref) is the implicit reward of a completion; h is the chosen-over-rejected
margin, reported with its accuracy P(h > 0) on held-out pairs. The reference is the policy with its
LoRA adapter disabled, or a frozen copy; its log-probs are computed once, before training.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.config import require, require_field_types, require_seed
from rlhfkit.console import console, progress_bar
from rlhfkit.data.order import epoch_order
from rlhfkit.data.records import PreferencePair, Text
from rlhfkit.generate import format_prompt
from rlhfkit.models.policy import TokenBatch, tokenize_completions
from rlhfkit.models.reference import Reference
from rlhfkit.models.update import TrainingDiverged
from rlhfkit.precision import PrecisionSetting, training_precision
from rlhfkit.reward.model import split_by_prompt
from rlhfkit.rl.trainer import apply_gradients, prepare_training, save_trained_policy


@dataclass
class DPOConfig:
    beta: float = 0.1
    lr: float = 5e-6
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimiser steps (None: all epochs)
    batch_size: int = 8  # pairs per step on each process
    max_grad_norm: float = 1.0
    max_prompt_tokens: int = 256  # longer prompts keep their last tokens
    max_completion_tokens: int = 256
    eval_fraction: float = 0.1  # share of prompts held out for margin and accuracy
    seed: int = 0
    use_chat_template: bool = False
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    output_dir: str = "runs/dpo"
    weights_dtype: Literal["float32", "bfloat16"] = "float32"  # of the trained weights (see RLConfig)
    precision: PrecisionSetting = "auto"  # bf16 autocast where the hardware has a bf16 unit (see RLConfig)

    def __post_init__(self) -> None:
        require_field_types(self)
        for name in ("beta", "lr", "max_grad_norm"):
            require(getattr(self, name) > 0, name, "must be positive")
        for name in ("epochs", "batch_size", "max_prompt_tokens", "max_completion_tokens", "lora_r"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be at least 1 (or null: all epochs)")
        require(0 <= self.eval_fraction < 1, "eval_fraction", "must be in [0, 1)")
        require_seed(self.seed)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L = −mean[y log σ(h) + (1 − y) log σ(−h)], the margins h) for sequence log-probs of chosen and
    rejected completions; ``labels`` y default to 1 (hard preferences)."""
    margins = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    y = torch.ones_like(margins) if labels is None else labels
    return -(y * F.logsigmoid(margins) + (1 - y) * F.logsigmoid(-margins)).mean(), margins


def pair_labels(pairs: Sequence[PreferencePair]) -> torch.Tensor:
    """y of each pair: its soft ``label``, or 1 for a hard preference."""
    return torch.tensor([1.0 if p.label is None else p.label for p in pairs])


def _completion_text(text: Text) -> str:
    return text if isinstance(text, str) else "".join(m.content for m in text)


def pair_tokens(pairs: Sequence[PreferencePair], tokenizer: PreTrainedTokenizerBase, use_chat_template: bool,
                max_prompt_tokens: int, max_completion_tokens: int, model: PreTrainedModel) -> TokenBatch:
    """Chosen completions then rejected ones, in one batch (one forward pass for both), as ``model`` reads
    them (its prompt format); prompts cut to fit the model's positions if need be; an answer cut at the
    generation limit (``chosen_truncated`` / ``rejected_truncated``) gets no EOS."""
    prompts = [format_prompt(p.prompt, tokenizer, use_chat_template) for p in pairs] * 2
    completions = [_completion_text(p.chosen) for p in pairs] + [_completion_text(p.rejected) for p in pairs]
    truncated = [p.chosen_truncated for p in pairs] + [p.rejected_truncated for p in pairs]
    return tokenize_completions(tokenizer, prompts, completions, not use_chat_template, max_prompt_tokens,
                                max_completion_tokens, model, truncated)


class DPOTrainer:
    def __init__(self, config: DPOConfig, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 reference: Reference | None = None, accelerator: Accelerator | None = None) -> None:
        self.config = config
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        torch.manual_seed(config.seed)
        self.precision = training_precision(config, self.accelerator)
        self.tokenizer, self.reference, self.actor, self.optimizer = prepare_training(
            config, policy, tokenizer, reference, self.accelerator, value_head=False, precision=self.precision)
        self.history: list[dict] = []

    def batch(self, pairs: Sequence[PreferencePair]) -> TokenBatch:
        cfg = self.config
        return pair_tokens(pairs, self.tokenizer, cfg.use_chat_template, cfg.max_prompt_tokens,
                           cfg.max_completion_tokens, self.accelerator.unwrap_model(self.actor).model)

    def sequence_logprobs(self, batch: TokenBatch, reference: bool = False) -> torch.Tensor:
        batch = batch.to(self.accelerator.device)
        with self.precision.autocast():  # the reference's pass too: policy and reference compare like for like
            logprobs = self.reference.logprobs(batch) if reference else self.actor(batch, with_entropy=False)[0]
        return (logprobs * batch.completion_mask).sum(dim=1)

    @torch.no_grad()
    def evaluate(self, pairs: Sequence[PreferencePair]) -> dict[str, float]:
        """Held-out mean margin h and accuracy P(h > 0)."""
        margins = []
        for start in range(0, len(pairs), self.config.batch_size):
            batch = self.batch(pairs[start:start + self.config.batch_size])
            policy, ref = self.sequence_logprobs(batch), self.sequence_logprobs(batch, reference=True)
            half = len(batch) // 2
            margins.append(dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], self.config.beta)[1])
        if not margins:
            return {"margin": float("nan"), "accuracy": float("nan")}
        all_margins = torch.cat(margins)
        return {"margin": all_margins.mean().item(), "accuracy": (all_margins > 0).float().mean().item()}

    def train(self, pairs: Sequence[PreferencePair], eval_pairs: Sequence[PreferencePair] | None = None,
              progress: bool = True) -> list[dict]:
        cfg, acc = self.config, self.accelerator
        if eval_pairs is None:
            groups, eval_pairs = split_by_prompt(pairs, cfg.eval_fraction, cfg.seed)
            pairs = [p for g in groups for p in g]
        if not pairs:
            raise ValueError("no preference pairs to train on")
        # this process's share of the pairs; every process runs the same number of steps
        per_process = len(pairs) // acc.num_processes
        mine = list(pairs[acc.process_index * per_process:(acc.process_index + 1) * per_process])
        left_out = len(pairs) - per_process * acc.num_processes
        if left_out and acc.is_main_process:
            warnings.warn(f"dpo: the last {left_out} of {len(pairs)} pairs are not trained on: each of the "
                          f"{acc.num_processes} processes takes {per_process}", stacklevel=2)
        reference = [self.sequence_logprobs(self.batch(mine[i:i + cfg.batch_size]), reference=True)
                     for i in range(0, len(mine), cfg.batch_size)]
        ref_by_pair = torch.cat([torch.stack([r[: len(r) // 2], r[len(r) // 2:]], dim=1) for r in reference])
        before = self.evaluate(eval_pairs)
        self.history.append({"step": 0, **{f"eval/{k}": v for k, v in before.items()}})
        step = 0
        total = -(-len(mine) // cfg.batch_size) * cfg.epochs
        total = min(total, cfg.max_steps) if cfg.max_steps is not None else total
        with progress_bar(progress and acc.is_main_process) as bar:
            task = bar.add_task("dpo", total=total, info="")
            for epoch in range(cfg.epochs):
                if step == total:  # max_steps reached: no more epochs to draw an order for
                    break
                order = epoch_order(len(mine), cfg.seed, epoch)
                for start in range(0, len(order), cfg.batch_size):
                    if step == total:
                        break
                    started = time.perf_counter()
                    index = order[start:start + cfg.batch_size]
                    step_pairs = [mine[i] for i in index]
                    policy = self.sequence_logprobs(self.batch(step_pairs))
                    ref = ref_by_pair[index]
                    loss, margins = dpo_loss(policy[: len(index)], policy[len(index):], ref[:, 0], ref[:, 1], cfg.beta,
                                             pair_labels(step_pairs).to(policy.device))
                    try:
                        grad_norm = apply_gradients(acc, self.actor, self.optimizer, loss, cfg.max_grad_norm)
                    except TrainingDiverged as exc:
                        raise TrainingDiverged(f"dpo stopped at step {step + 1}: {exc}") from None
                    step += 1
                    # the step's loss, margin and accuracy over every process's pairs (equal shares of them)
                    logged = torch.stack([loss, margins.mean(), (margins > 0).float().mean()]).detach().double()
                    loss_all, margin, accuracy = acc.reduce(logged, reduction="mean").tolist()
                    self.history.append({"step": step, "loss": loss_all, "margin": margin, "accuracy": accuracy,
                                         "grad_norm": grad_norm, "time/step_s": time.perf_counter() - started})
                    bar.update(task, advance=1, info=f"loss {loss_all:.3f}")
        after = self.evaluate(eval_pairs)
        self.history.append({"step": step, **{f"eval/{k}": v for k, v in after.items()}})
        if acc.is_main_process and progress:
            console.print(f"dpo: held-out margin {before['margin']:.4f} → {after['margin']:.4f}, accuracy "
                          f"{before['accuracy']:.3f} → {after['accuracy']:.3f} on {len(eval_pairs)} pairs")
        return self.history

    def save_policy(self, path: str | None = None) -> None:
        save_trained_policy(self.accelerator, self.actor, self.tokenizer, self.config, "dpo",
                    path or Path(self.config.output_dir) / "policy")

