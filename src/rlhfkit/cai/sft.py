"""Supervised fine-tuning on (prompt, response) pairs: stage 1 of Constitutional AI trains on the final
revisions, optionally mixed with helpful answers so that the model does not drift into refusing.

    L(θ) = − (1 / Σ_i |y_i|) Σ_i Σ_t log π_θ(y_i,t | x_i, y_i,<t)      (response tokens only, EOS included)

except for a response cut at the generation limit (``SFTExample.truncated``): it gets no EOS, so that the
model does not learn to stop where the cut fell.

Causal and seq2seq models share the code through `completion_logits`; full or LoRA fine-tuning (LoRA
is merged into the weights on save, so later stages load a plain model).

Under ``accelerate launch`` (DDP) a step's batch is the same as in one process: each of the W processes
takes its share of the batch's examples, with n_w of the step's N = Σ_w n_w response tokens and mean
loss L_w over them, and back-propagates W · (n_w / N) · L_w, so that DDP's mean of the gradients is the
gradient of the whole batch's loss L = Σ_w (n_w / N) · L_w.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.config import require_seed, save_config
from rlhfkit.console import console, progress_bar
from rlhfkit.data.records import Text
from rlhfkit.generate import format_prompt, uses_chat_template
from rlhfkit.models.policy import (
    TokenBatch,
    cast_trainable,
    prepare_tokenizer,
    tokenize_completions,
)
from rlhfkit.models.reference import add_lora
from rlhfkit.models.update import TrainingDiverged, adamw, apply_gradients
from rlhfkit.models.value_head import Actor
from rlhfkit.precision import PrecisionSetting, training_precision
from rlhfkit.rl.trainer import save_as_loaded

METRICS_FILE = "sft_metrics.json"  # written last: its presence means the run finished


class SFTExample(NamedTuple):
    """A prompt and its target response; ``truncated``: the response was cut at max_new_tokens (no EOS)."""

    prompt: Text
    response: str
    truncated: bool = False


Example = SFTExample | tuple[Text, str]  # a plain (prompt, response) is a whole response


@dataclass
class SFTConfig:
    epochs: int = 2
    lr: float = 5e-5
    batch_size: int = 8
    max_prompt_tokens: int = 256  # longer prompts keep their last tokens
    max_response_tokens: int = 256
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    use_chat_template: bool | None = None  # None: the tokenizer's template for causal models that have one
    helpful_fraction: float = 0.0  # helpful examples added, as a fraction of the revision examples
    seed: int = 0
    precision: PrecisionSetting = "auto"  # bf16 autocast while training where there is a bf16 unit (precision.py)
    output_dir: str = "runs/cai/sft"

    def __post_init__(self) -> None:
        require_seed(self.seed)


def sft_batch(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], chat: bool,
              config: SFTConfig, device: torch.device | str = "cpu") -> TokenBatch:
    """Prompts formatted as at generation time, responses + EOS unless cut (the same layout as DPO's batches)."""
    examples = [SFTExample(*e) for e in examples]
    batch = tokenize_completions(tokenizer, [format_prompt(e.prompt, tokenizer, chat) for e in examples],
                                 [e.response for e in examples], not chat, config.max_prompt_tokens,
                                 config.max_response_tokens, truncated=[e.truncated for e in examples])
    return batch.to(device)


def sft_loss(actor: Actor, batch: TokenBatch) -> torch.Tensor:
    """Mean negative log-likelihood per response token, with the policy in an :class:`Actor` (one module
    whose forward is the whole pass: what a DDP wrapper needs)."""
    logprobs = actor(batch, with_entropy=False)[0]
    mask = batch.completion_mask.float()
    return -(logprobs * mask).sum() / mask.sum()


@torch.no_grad()
def mean_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
              chat: bool, config: SFTConfig) -> float:
    model.eval()
    device = next(model.parameters()).device
    actor = Actor(model, value_head=False)
    total = tokens = 0.0
    for start in range(0, len(examples), config.batch_size):
        batch = sft_batch(tokenizer, examples[start:start + config.batch_size], chat, config, device)
        n = batch.completion_mask.sum().item()
        total += sft_loss(actor, batch).item() * n
        tokens += n
    return total / max(tokens, 1)


def _process_share(accelerator: Accelerator, actor: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                   examples: Sequence[Example], chat: bool, config: SFTConfig) -> tuple[torch.Tensor, float]:
    """This process's share of a step's ``examples``: (its loss scaled for DDP's mean of the gradients, see
    the module docstring; the step's loss L over all processes). A process left without examples (a
    batch smaller than W) still runs a pass, weighted 0, over an example it borrows: DDP needs every
    process in each backward pass."""
    share = examples[accelerator.process_index::accelerator.num_processes]
    batch = sft_batch(tokenizer, share or examples[:1], chat, config, accelerator.device)
    loss = sft_loss(actor, batch)
    n = batch.completion_mask.sum().item() if share else 0
    sums = torch.tensor([loss.item() * n, n], dtype=torch.float64)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    tokens = sums[1].item()
    return loss * (accelerator.num_processes * n / tokens), sums[0].item() / tokens


def train_sft(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
              config: SFTConfig | None = None, helpful: Sequence[Example] = (),
              output_dir: str | os.PathLike | None = None, progress: bool = True,
              accelerator: Accelerator | None = None) -> tuple[PreTrainedModel, dict]:
    """Fine-tune on ``examples`` (+ a ``helpful_fraction`` of ``helpful``); returns the model and its
    losses on ``examples`` before and after, and per epoch.

    With ``output_dir`` the run is resumable: a checkpoint (trainable weights, optimizer, RNG states) is
    written after every epoch and picked up by a rerun; a finished run is loaded instead of retrained.
    ``accelerator`` (default: a fresh one) is used as given; under ``accelerate launch`` each process
    trains on its share of every batch, logged losses are the whole batch's, and only the main process
    writes files. Every process returns the trained model."""
    config = config or SFTConfig()
    if not examples:
        raise ValueError("no examples to fine-tune on")
    out = Path(output_dir) if output_dir is not None else None
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    if out is not None and (out / METRICS_FILE).exists():
        if main:
            console.print(f"SFT already finished in {out}; loading it")
        return type(model).from_pretrained(out).eval(), json.loads((out / METRICS_FILE).read_text())
    precision = training_precision(config, accelerator, report=progress)  # a bf16 it cannot run: before any work
    tokenizer = prepare_tokenizer(tokenizer, model)
    chat = uses_chat_template(tokenizer, model, config.use_chat_template)
    rng = random.Random(config.seed)
    mixed = list(examples)
    if helpful and config.helpful_fraction > 0:
        count = min(len(helpful), round(config.helpful_fraction * len(examples)))
        mixed += rng.sample(list(helpful), count)
    if config.lora:
        model = add_lora(model, config.lora_r, config.lora_alpha)
    cast_trainable(model, torch.float32)  # fp32 master weights, also for a bf16 checkpoint
    model.to(accelerator.device)
    torch.manual_seed(config.seed)
    optimizer = adamw(model.parameters(), config.lr, accelerator.device)
    checkpoint = out / "checkpoint.pt" if out is not None else None
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        before, history, mixed = state["loss_before"], state["history"], state["mixed"]
        if main:
            console.print(f"resuming SFT after epoch {len(history)} from {checkpoint}")
    else:
        before, history = mean_loss(model, tokenizer, examples, chat, config), []
    actor, optimizer = accelerator.prepare(Actor(model, value_head=False), optimizer)
    steps = config.epochs * -(-len(mixed) // config.batch_size)
    with progress_bar(progress and main) as bar:
        task = bar.add_task("SFT", total=steps, completed=len(history) * -(-len(mixed) // config.batch_size),
                            info="")
        for epoch in range(len(history), config.epochs):
            actor.train()
            rng.shuffle(mixed)
            losses = []
            for start in range(0, len(mixed), config.batch_size):
                with precision.autocast():
                    loss, step_loss = _process_share(accelerator, actor, tokenizer,
                                                     mixed[start:start + config.batch_size], chat, config)
                try:
                    apply_gradients(accelerator, actor, optimizer, loss, 1.0)
                except TrainingDiverged as exc:
                    raise TrainingDiverged(f"SFT stopped in epoch {epoch + 1}: {exc}") from None
                losses.append(step_loss)
                bar.update(task, advance=1, info=f"epoch {epoch + 1} loss {step_loss:.3f}")
            history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses)})
            if checkpoint is not None:
                save_checkpoint(accelerator, model, optimizer, checkpoint, {
                    "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "loss_before": before,
                    "history": history, "mixed": mixed})
    model = accelerator.unwrap_model(actor, keep_fp32_wrapper=False).model.eval()
    if config.lora:
        model = model.merge_and_unload()
    metrics = {"loss_before": before, "loss_after": mean_loss(model, tokenizer, examples, chat, config),
               "examples": len(examples), "helpful_examples": len(mixed) - len(examples), "history": history}
    if progress and main:
        console.print(f"SFT loss on the revisions: {metrics['loss_before']:.3f} → {metrics['loss_after']:.3f}")
    if out is not None and main:
        save_as_loaded(model, out)
        tokenizer.save_pretrained(out)
        save_config(config, out / "sft_config.yaml")
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        checkpoint.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return model, metrics


def save_checkpoint(accelerator: Accelerator, model: PreTrainedModel, optimizer: torch.optim.Optimizer,
                    path: Path, state: dict) -> None:
    """Trainable weights, optimizer and ``state`` in one file, replaced whole; written by the main process
    (its random state stands for all: after a resume under several processes, dropout draws differ from
    an uninterrupted run's)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(), **state}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    accelerator.wait_for_everyone()
