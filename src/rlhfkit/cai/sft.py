"""Supervised fine-tuning on (prompt, response) pairs: stage 1 of Constitutional AI trains on the final
revisions, optionally mixed with helpful answers so that the model does not drift into refusing.

    L(θ) = − (1 / Σ_i |y_i|) Σ_i Σ_t log π_θ(y_i,t | x_i, y_i,<t)      (response tokens only, EOS included)

Causal and seq2seq models share the code through `completion_logits`; full or LoRA fine-tuning (LoRA
is merged into the weights on save, so later stages load a plain model).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.config import save_config
from rlhfkit.console import console, progress_bar
from rlhfkit.data.records import Text
from rlhfkit.generate import format_prompt, uses_chat_template
from rlhfkit.models.policy import (
    TokenBatch,
    cast_trainable,
    completion_logits,
    prepare_tokenizer,
    token_logprobs,
    tokenize_completions,
)
from rlhfkit.models.reference import add_lora
from rlhfkit.models.update import guarded_step
from rlhfkit.rl.trainer import save_as_loaded

METRICS_FILE = "sft_metrics.json"  # written last: its presence means the run finished


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
    output_dir: str = "runs/cai/sft"


def sft_batch(tokenizer: PreTrainedTokenizerBase, examples: Sequence[tuple[Text, str]], chat: bool,
              config: SFTConfig, device: torch.device | str = "cpu") -> TokenBatch:
    """Prompts formatted as at generation time, responses + EOS (the same layout as DPO's batches)."""
    batch = tokenize_completions(tokenizer, [format_prompt(x, tokenizer, chat) for x, _ in examples],
                                 [y for _, y in examples], not chat, config.max_prompt_tokens,
                                 config.max_response_tokens)
    return batch.to(device)


def sft_loss(model: PreTrainedModel, batch: TokenBatch) -> torch.Tensor:
    """Mean negative log-likelihood per response token."""
    logits, _ = completion_logits(model, batch)
    logprobs, _ = token_logprobs(logits, batch.completion_ids)
    mask = batch.completion_mask.float()
    return -(logprobs * mask).sum() / mask.sum()


@torch.no_grad()
def mean_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[tuple[Text, str]],
              chat: bool, config: SFTConfig) -> float:
    model.eval()
    device = next(model.parameters()).device
    total = tokens = 0.0
    for start in range(0, len(examples), config.batch_size):
        batch = sft_batch(tokenizer, examples[start:start + config.batch_size], chat, config, device)
        n = batch.completion_mask.sum().item()
        total += sft_loss(model, batch).item() * n
        tokens += n
    return total / max(tokens, 1)


def train_sft(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[tuple[Text, str]],
              config: SFTConfig | None = None, helpful: Sequence[tuple[Text, str]] = (),
              output_dir: str | os.PathLike | None = None, progress: bool = True) -> tuple[PreTrainedModel, dict]:
    """Fine-tune on ``examples`` (+ a ``helpful_fraction`` of ``helpful``); returns the model and its
    losses on ``examples`` before and after, and per epoch.

    With ``output_dir`` the run is resumable: a checkpoint (trainable weights, optimizer, RNG states) is
    written after every epoch and picked up by a rerun; a finished run is loaded instead of retrained."""
    config = config or SFTConfig()
    if not examples:
        raise ValueError("no examples to fine-tune on")
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and (out / METRICS_FILE).exists():
        console.print(f"SFT already finished in {out}; loading it")
        return type(model).from_pretrained(out).eval(), json.loads((out / METRICS_FILE).read_text())
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    checkpoint = out / "checkpoint.pt" if out is not None else None
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        before, history, mixed = state["loss_before"], state["history"], state["mixed"]
        console.print(f"resuming SFT after epoch {len(history)} from {checkpoint}")
    else:
        before, history = mean_loss(model, tokenizer, examples, chat, config), []
    steps = config.epochs * -(-len(mixed) // config.batch_size)
    with progress_bar(progress) as bar:
        task = bar.add_task("SFT", total=steps, completed=len(history) * -(-len(mixed) // config.batch_size),
                            info="")
        for epoch in range(len(history), config.epochs):
            model.train()
            rng.shuffle(mixed)
            losses = []
            for start in range(0, len(mixed), config.batch_size):
                loss = sft_loss(model, sft_batch(tokenizer, mixed[start:start + config.batch_size], chat, config,
                                                 device))
                guarded_step(optimizer, model.parameters(), loss, 1.0, f"SFT stopped in epoch {epoch + 1}")
                losses.append(loss.item())
                bar.update(task, advance=1, info=f"epoch {epoch + 1} loss {loss.item():.3f}")
            history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses)})
            if checkpoint is not None:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
                torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(), "rng": rng.getstate(),
                            "torch_rng": torch.get_rng_state(), "loss_before": before, "history": history,
                            "mixed": mixed}, checkpoint.with_suffix(".tmp"))
                checkpoint.with_suffix(".tmp").replace(checkpoint)
    model.eval()
    if config.lora:
        model = model.merge_and_unload()
    metrics = {"loss_before": before, "loss_after": mean_loss(model, tokenizer, examples, chat, config),
               "examples": len(examples), "helpful_examples": len(mixed) - len(examples), "history": history}
    if progress:
        console.print(f"SFT loss on the revisions: {metrics['loss_before']:.3f} → {metrics['loss_after']:.3f}")
    if out is not None:
        save_as_loaded(model, out)
        tokenizer.save_pretrained(out)
        save_config(config, out / "sft_config.yaml")
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        checkpoint.unlink(missing_ok=True)
    return model, metrics
