"""Constitutional AI, stage 1: the model critiques and revises its own answers to red-team prompts.

For each prompt x:
    y_0 = model(x)                                                     the initial response
    for round k = 1..n, with a principle p_k drawn at random (fresh each round where possible):
        c_k = model(critique_prompt(x, y_{k−1}, p_k))                  what is wrong with y_{k−1} under p_k
        y_k = model(revision_prompt(x, y_{k−1}, p_k, c_k))             the answer rewritten
    SFT target: (x, y_n)

Every step is kept in the output JSONL (one :class:`Revision` per prompt) for inspection. Batches of
prompts are generated together and appended when finished, so a rerun continues where a crash stopped.
"""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.cai.constitution import Constitution, Principle
from rlhfkit.console import progress_bar
from rlhfkit.data.io import append_records, drop_partial_last_line, read_records
from rlhfkit.data.records import Prompt, Revision, RevisionStep, SamplingParams, Text, render_text
from rlhfkit.generate import _batch_seed, format_prompt, sample_batch, uses_chat_template
from rlhfkit.models.policy import prepare_tokenizer


def complete(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[Text],
             sampling: SamplingParams, use_chat_template: bool) -> list[str]:
    """One completion for each plain-text request (formatted as a user turn with a chat template)."""
    formatted = [format_prompt(t, tokenizer, use_chat_template) for t in texts]
    samples, _ = sample_batch(model, tokenizer, formatted, 1, sampling, use_chat_template)
    return [s[0] for s in samples]


def principle_rng(seed: int, prompt_id: str) -> random.Random:
    """Principles drawn per prompt, whatever the batching: a resumed run draws the same ones."""
    return random.Random(seed * 1_000_003 + zlib.crc32(prompt_id.encode()))


def revise(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
           constitution: Constitution, rounds: int = 1, sampling: SamplingParams | None = None,
           batch_size: int = 8, use_chat_template: bool | None = None, output: str | os.PathLike | None = None,
           model_name: str = "", progress: bool = True) -> list[Revision]:
    """Critique → revision for every prompt; returns the new records (those in ``output`` are skipped)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    sampling = sampling or SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=128)
    tokenizer = prepare_tokenizer(tokenizer, model)
    chat = uses_chat_template(tokenizer, model, use_chat_template)
    done: set[str] = set()
    if output is not None and Path(output).exists():
        drop_partial_last_line(output)
        done = {r.id for r in read_records(output, Revision)}
    todo = [p for p in prompts if p.id not in done]
    created: list[Revision] = []
    with progress_bar(progress) as bar:
        task = bar.add_task(f"critique → revision × {rounds}", total=len(todo), info="")
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            texts = [render_text(p.text) for p in batch]
            torch.manual_seed(_batch_seed(sampling.seed, [p.id for p in batch]))
            responses = complete(model, tokenizer, [p.text for p in batch], sampling, chat)
            initial = list(responses)
            rngs = [principle_rng(sampling.seed, p.id) for p in batch]
            steps: list[list[RevisionStep]] = [[] for _ in batch]
            for _ in range(rounds):
                principles: list[Principle] = [constitution.draw(rng, {s.principle for s in done_steps})
                                               for rng, done_steps in zip(rngs, steps, strict=True)]
                critiques = [constitution.cut(c) for c in complete(
                    model, tokenizer, [constitution.critique_prompt(x, y, p)
                                       for x, y, p in zip(texts, responses, principles, strict=True)],
                    sampling, chat)]
                revisions = [constitution.cut(r) for r in complete(
                    model, tokenizer, [constitution.revision_prompt(x, y, p, c)
                                       for x, y, p, c in zip(texts, responses, principles, critiques, strict=True)],
                    sampling, chat)]
                for i, (p, c, r) in enumerate(zip(principles, critiques, revisions, strict=True)):
                    steps[i].append(RevisionStep(principle=p.name, critique_request=p.critique, critique=c,
                                                 revision_request=p.revision, revision=r))
                    if r:  # an empty revision keeps the previous answer
                        responses[i] = r
            new = [Revision(id=p.id, prompt=p.text, initial=init, steps=s, final=final, model=model_name)
                   for p, init, s, final in zip(batch, initial, steps, responses, strict=True)]
            if output is not None:
                append_records(output, new)
            created += new
            bar.update(task, advance=len(batch))
    return created


def revision_dry_run(constitution: Constitution, prompt: str, tokenizer: PreTrainedTokenizerBase | None = None,
            use_chat_template: bool = False) -> dict[str, str]:
    """The exact strings the model would get for one prompt's first round, with the model's own
    outputs shown as placeholders."""
    principle = constitution.principles[0]

    def shown(text: str) -> str:
        return format_prompt(text, tokenizer, True) if use_chat_template and tokenizer is not None else text

    return {
        "initial response request": shown(prompt),
        f"critique request (principle {principle.name!r})": shown(
            constitution.critique_prompt(prompt, "<initial response>", principle)),
        "revision request": shown(constitution.revision_prompt(prompt, "<initial response>", principle,
                                                               "<critique>")),
    }
