"""N completions per prompt from any causal or seq2seq model: batched, KV-cached, resumable.

Prompts are processed in batches of ``batch_size``; each batch is one call of the rollout engine
(``models/engine.py``: each prompt's KV computed once for its n samples, every sequence of the batch
decoding in lock-step; ``generate`` for models the engine cannot run). Each finished batch is appended to
the output file and fsynced, so a crash loses at most the batch in flight, and a rerun skips the prompts
already done.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.console import progress_bar
from rlhfkit.data.io import append_records, drop_partial_last_line, read_records, write_records
from rlhfkit.data.records import Completion, Prompt, SamplingParams, Text, render_text
from rlhfkit.models.engine import Decoding, sample_completions
from rlhfkit.models.packed import keep_packed_weights
from rlhfkit.models.policy import check_prompt_lengths, is_seq2seq


def format_prompt(prompt: Text, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool) -> str:
    """The exact string the model sees: the chat template applied (a plain prompt becomes one user
    turn) when ``use_chat_template``, else the prompt as plain text."""
    if not use_chat_template:
        return render_text(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [
        m.model_dump() for m in prompt]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, given: bool | None) -> bool:
    """``given`` if set; else the chat template when the tokenizer has one and the model is causal
    (instruct models expect it; seq2seq models read plain text)."""
    if given is not None:
        return given
    return bool(getattr(tokenizer, "chat_template", None)) and not is_seq2seq(model)


def _decoding(tokenizer: PreTrainedTokenizerBase, sampling: SamplingParams) -> Decoding:
    if not sampling.do_sample:
        return Decoding(sampling.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
    return Decoding(sampling.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                    temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)


def _batch_seed(seed: int, prompt_ids: Sequence[str]) -> int:
    """A seed fixed by the run's seed and the batch's prompts: the same prompts batched together sample
    the same completions (a resumed run may batch the remaining prompts differently)."""
    return (seed * 1_000_003 + zlib.crc32("\x00".join(prompt_ids).encode())) % (2**63)


def cut_at_limit(new_tokens: torch.Tensor, eos_token_id: int | None) -> list[bool]:
    """Per row of sampled tokens [B, T]: True when it holds no EOS, i.e. sampling stopped at
    ``max_new_tokens`` and the text is the start of an answer, not a whole one."""
    if eos_token_id is None:
        return [True] * len(new_tokens)
    return (~(new_tokens == eos_token_id).any(dim=1)).tolist()


class Samples(NamedTuple):
    """``n`` completions per prompt, whether each was cut at ``max_new_tokens``, and the new tokens produced."""

    texts: list[list[str]]
    truncated: list[list[bool]]
    tokens: int


@torch.inference_mode()
def sample_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], n: int,
                 sampling: SamplingParams, use_chat_template: bool, names: Sequence[str] | None = None,
                 compiled: bool = False) -> Samples:
    """``n`` completions for each of ``texts`` (already formatted; ``names`` label them in errors), sampled
    with ``sampling``'s settings only (none from the model's generation_config); ``compiled``: the decode step
    compiled (``rlhfkit.models.engine.compiled_step``)."""
    # A chat template already holds the special tokens the model expects; don't add them twice.
    encoded = tokenizer(texts, return_tensors="pt", padding=True,
                        add_special_tokens=not use_chat_template).to(model.device)
    check_prompt_lengths(model, encoded["attention_mask"], names or texts, sampling.max_new_tokens)
    new_tokens = sample_completions(model, encoded["input_ids"], encoded["attention_mask"], n,
                                    _decoding(tokenizer, sampling), compiled=compiled)
    special = torch.tensor(sorted(tokenizer.all_special_ids), device=new_tokens.device)
    produced = int((~torch.isin(new_tokens, special)).sum())
    decoded = [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    cut = cut_at_limit(new_tokens, tokenizer.eos_token_id)
    per_prompt = range(0, len(decoded), n)
    return Samples([decoded[i:i + n] for i in per_prompt], [cut[i:i + n] for i in per_prompt], produced)


def _resume(output: Path, n: int) -> dict[str, int]:
    """Completions already in ``output``, per prompt id. A prompt with fewer than ``n`` (a torn batch)
    is removed from the file so that it is generated again whole."""
    if not output.exists():
        return {}
    drop_partial_last_line(output)
    existing = read_records(output, Completion)
    counts = Counter(c.prompt_id for c in existing)
    partial = {pid for pid, count in counts.items() if count < n}
    if partial:
        write_records(output, [c for c in existing if c.prompt_id not in partial])
    return {pid: count for pid, count in counts.items() if pid not in partial}


def generate_completions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                         n: int = 4, sampling: SamplingParams | None = None, batch_size: int = 8,
                         output: str | os.PathLike | None = None, model_name: str | None = None,
                         use_chat_template: bool | None = None, progress: bool = True,
                         compiled: bool = False) -> list[Completion]:
    """Sample ``n`` completions for every prompt; returns the new ones (those already in ``output`` are
    skipped and not returned).

    ``use_chat_template=None`` applies the tokenizer's chat template when it has one and the model is
    causal (instruct models expect it). With an ``output`` file the run is resumable. ``compiled``: the decode
    step runs ``torch.compile``'d with the weights folded in (frozen here): about a minute to compile per batch
    shape, then fewer seconds per token (``rlhfkit.models.engine``); for long runs. A last batch smaller than
    ``batch_size`` decodes without (its shape would cost a compile of its own).
    """
    sampling = sampling or SamplingParams()
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, Prompt):
            raise TypeError(f"prompts[{index}] is a {type(prompt).__name__}; generate_completions takes Prompt "
                            "records (their ids let a rerun resume): [Prompt(id=..., text=...)] or read_prompts(path)")
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be at least 1 (got n={n}, batch_size={batch_size})")
    use_chat_template = uses_chat_template(tokenizer, model, use_chat_template)
    model_name = model_name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    output = Path(output) if output is not None else None
    done = _resume(output, n) if output is not None else {}
    todo = [p for p in prompts if p.id not in done]
    created: list[Completion] = []
    started, tokens = time.perf_counter(), 0
    with progress_bar(progress) as bar, keep_packed_weights(model):  # one packing of the weights for all batches
        task = bar.add_task("generating", total=len(todo), info="")
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            torch.manual_seed(_batch_seed(sampling.seed, [p.id for p in batch]))
            texts = [format_prompt(p.text, tokenizer, use_chat_template) for p in batch]
            full = len(batch) == batch_size  # a last, smaller batch is not worth a compile of its own
            samples = sample_batch(model, tokenizer, texts, n, sampling, use_chat_template, [p.id for p in batch],
                                   compiled and full)
            tokens += samples.tokens
            new = [Completion(id=f"{p.id}-{i}", prompt_id=p.id, prompt=p.text, text=text, index=i,
                              model=model_name, sampling=sampling, truncated=cut)
                   for p, texts_of_p, cut_of_p in zip(batch, samples.texts, samples.truncated, strict=True)
                   for i, (text, cut) in enumerate(zip(texts_of_p, cut_of_p, strict=True))]
            if output is not None:
                append_records(output, new)
            created += new
            bar.update(task, advance=len(batch),
                       info=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f} tok/s")
    return created
