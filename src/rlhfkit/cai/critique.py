"""Constitutional AI, stage 1: the model critiques and revises its own answers to red-team prompts.

For each prompt x:
    y_0 = model(x)                                                     the initial response
    for round k = 1..n, with a principle p_k drawn at random (fresh each round where possible):
        c_k = model(critique_prompt(x, y_{k−1}, p_k))                  what is wrong with y_{k−1} under p_k
        y_k = model(revision_prompt(x, y_{k−1}, p_k, c_k))             the answer rewritten
    SFT target: (x, y_n)

For a chat model (a chat template in use) the critique and the revision are turns of one real
conversation, not a transcript pasted into a user turn that ends in a dangling "Critique:" cue:

    user x · assistant y_{k−1} · user <critique request of p_k>                → c_k
    user x · assistant y_{k−1} · user <critique request> · assistant c_k · user <revision request>  → y_k

with the constitution's few-shot examples played first as earlier exchanges of the same shape.

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
from rlhfkit.data.records import Message, Prompt, Revision, RevisionStep, SamplingParams, Text, render_text
from rlhfkit.generate import _batch_seed, format_prompt, sample_batch, uses_chat_template
from rlhfkit.models.policy import prepare_tokenizer


def complete(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[Text],
             sampling: SamplingParams, use_chat_template: bool) -> tuple[list[str], list[bool]]:
    """One completion for each plain-text request (formatted as a user turn with a chat template), and
    whether each was cut at ``max_new_tokens``."""
    formatted = [format_prompt(t, tokenizer, use_chat_template) for t in texts]
    samples = sample_batch(model, tokenizer, formatted, 1, sampling, use_chat_template)
    return [s[0] for s in samples.texts], [cut[0] for cut in samples.truncated]


def _turn(role: str, content: str) -> Message:
    return Message(role=role, content=content)


def example_turns(constitution: Constitution) -> list[Message]:
    """The few-shot examples as exchanges: prompt, response, critique request, critique, revision request, revision."""
    turns = []
    for example in constitution.examples:
        principle = constitution.principle(example.principle)
        turns += [_turn("user", example.prompt), _turn("assistant", example.response),
                  _turn("user", principle.critique), _turn("assistant", example.critique),
                  _turn("user", principle.revision), _turn("assistant", example.revision)]
    return turns


def critique_request(constitution: Constitution, prompt: str, response: str, principle: Principle,
                     chat: bool) -> Text:
    """What the model reads to critique ``response``: for a chat model the conversation so far and the
    critique request as the user's next turn; else the constitution's text template."""
    if not chat:
        return constitution.critique_prompt(prompt, response, principle)
    return [*example_turns(constitution), _turn("user", prompt), _turn("assistant", response),
            _turn("user", principle.critique)]


def revision_request(constitution: Constitution, prompt: str, response: str, principle: Principle, critique: str,
                     chat: bool) -> Text:
    """What the model reads to revise ``response``: for a chat model the critique exchange, the critique as
    the assistant's turn and the revision request as the user's next; else the text template."""
    if not chat:
        return constitution.revision_prompt(prompt, response, principle, critique)
    return [*critique_request(constitution, prompt, response, principle, chat), _turn("assistant", critique),
            _turn("user", principle.revision)]


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
            responses, truncated = complete(model, tokenizer, [p.text for p in batch], sampling, chat)
            initial = list(responses)
            rngs = [principle_rng(sampling.seed, p.id) for p in batch]
            steps: list[list[RevisionStep]] = [[] for _ in batch]
            for _ in range(rounds):
                principles: list[Principle] = [constitution.draw(rng, {s.principle for s in done_steps})
                                               for rng, done_steps in zip(rngs, steps, strict=True)]
                critiques = [constitution.cut(c) for c in complete(
                    model, tokenizer, [critique_request(constitution, x, y, p, chat)
                                       for x, y, p in zip(texts, responses, principles, strict=True)],
                    sampling, chat)[0]]
                generated, cut = complete(
                    model, tokenizer, [revision_request(constitution, x, y, p, c, chat)
                                       for x, y, p, c in zip(texts, responses, principles, critiques, strict=True)],
                    sampling, chat)
                for i, (p, c, g) in enumerate(zip(principles, critiques, generated, strict=True)):
                    r = constitution.cut(g)
                    steps[i].append(RevisionStep(principle=p.name, critique_request=p.critique, critique=c,
                                                 revision_request=p.revision, revision=r))
                    if r:  # an empty revision keeps the previous answer
                        # cut at max_new_tokens unless a stop string ended it first
                        responses[i], truncated[i] = r, cut[i] and r == g.strip()
            new = [Revision(id=p.id, prompt=p.text, initial=init, steps=s, final=final, final_truncated=cut,
                            model=model_name)
                   for p, init, s, final, cut in zip(batch, initial, steps, responses, truncated, strict=True)]
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
    chat = use_chat_template and tokenizer is not None

    def shown(text: Text) -> str:
        return format_prompt(text, tokenizer, True) if chat else render_text(text)

    return {
        "initial response request": shown(prompt),
        f"critique request (principle {principle.name!r})": shown(
            critique_request(constitution, prompt, "<initial response>", principle, chat)),
        "revision request": shown(revision_request(constitution, prompt, "<initial response>", principle,
                                                   "<critique>", chat)),
    }
