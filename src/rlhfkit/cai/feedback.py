"""Constitutional AI, stage 2: AI feedback. A feedback model compares two responses under a principle,
as a multiple-choice question, and its answer probabilities become a soft preference label.

For responses a, b to prompt x and a principle p drawn at random:

    q_ab = P(answer "A" | x, p, (A) a, (B) b) / (P("A") + P("B"))     a in first position
    q_ba = P(answer "B" | x, p, (A) b, (B) a) / (P("A") + P("B"))     a in second position
    P(a ≻ b) = (q_ab + q_ba) / 2                                       position bias cancels

With chain of thought, the model first writes its reasoning ("Let's think step by step:"), then the
answer's probabilities are read after "Therefore, the answer is: ("; such probabilities are
over-confident, so each is clamped to a band (default 0.4–0.6, as in Bai et al. 2022).

The output pair puts the preferred response first with ``label`` = max(P, 1 − P) ∈ [0.5, 1], which
the reward model trainer uses as a soft target.
"""

from __future__ import annotations

import itertools
import os
import random
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.cai.constitution import Constitution
from rlhfkit.cai.critique import complete
from rlhfkit.console import progress_bar
from rlhfkit.data.io import append_records, drop_partial_last_line, read_records
from rlhfkit.data.records import Completion, PreferencePair, SamplingParams, render_text
from rlhfkit.generate import format_prompt, uses_chat_template
from rlhfkit.models.policy import TokenBatch, completion_logits, prepare_tokenizer

# texts → P(first option) for each text, normalised over the two options
OptionScorer = Callable[[list[str]], torch.Tensor]


@dataclass
class FeedbackConfig:
    chain_of_thought: bool = False
    band: tuple[float, float] = (0.4, 0.6)  # clamp for chain-of-thought probabilities
    thought_tokens: int = 96
    batch_size: int = 8
    use_chat_template: bool | None = None
    seed: int = 0


class ModelOptionScorer:
    """P(first option) from a causal or seq2seq model's next-token logits after the answer prefix."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, options: tuple[str, str]) -> None:
        self.model, self.tokenizer = model.eval(), prepare_tokenizer(tokenizer, model)
        ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        if not all(ids) or ids[0][0] == ids[1][0]:
            raise ValueError(f"the answer options {options} must start with two different tokens; "
                             "set templates.options in the constitution")
        self.option_ids = torch.tensor([ids[0][0], ids[1][0]])

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        first = torch.full((len(texts), 1), int(self.option_ids[0]), device=device)
        batch = TokenBatch(encoded["input_ids"], encoded["attention_mask"], first, torch.ones_like(first))
        logits, _ = completion_logits(self.model, batch)
        pair = logits[:, 0, self.option_ids.to(device)].float()
        return torch.softmax(pair, dim=-1)[:, 0].cpu()


def comparison_texts(constitution: Constitution, prompt: str, first: str, second: str, principle,
                     tokenizer: PreTrainedTokenizerBase | None, chat: bool) -> str:
    """The question as the model reads it (a user turn with a chat template), up to where it answers."""
    body = constitution.comparison_prompt(prompt, first, second, principle)
    return format_prompt(body, tokenizer, True) if chat else body + "\n\n"


def label_pairs(completions: Sequence[Completion], constitution: Constitution, scorer: OptionScorer,
                config: FeedbackConfig | None = None, model: PreTrainedModel | None = None,
                tokenizer: PreTrainedTokenizerBase | None = None, output: str | os.PathLike | None = None,
                feedback_model: str = "", progress: bool = True) -> list[PreferencePair]:
    """A soft-labelled pair for every two completions of each prompt. ``model`` and ``tokenizer`` are
    needed for chain of thought (the reasoning is generated) and to apply a chat template."""
    config = config or FeedbackConfig()
    templates = constitution.templates
    chat = uses_chat_template(tokenizer, model, config.use_chat_template) if model is not None else bool(
        config.use_chat_template)
    if config.chain_of_thought and model is None:
        raise ValueError("chain of thought needs the feedback model to generate its reasoning")
    by_prompt: dict[str, list[Completion]] = defaultdict(list)
    for c in completions:
        by_prompt[c.prompt_id].append(c)
    done: set[str] = set()
    if output is not None and Path(output).exists():
        drop_partial_last_line(output)
        done = {p.prompt_id for p in read_records(output, PreferencePair)}
    # batches hold whole prompts, so that a prompt found in the output was labelled completely
    batches: list[list[tuple[str, Completion, Completion]]] = [[]]
    for pid, group in by_prompt.items():
        if pid in done:
            continue
        if len(batches[-1]) >= config.batch_size:
            batches.append([])
        batches[-1] += [(pid, a, b) for a, b in itertools.combinations(sorted(group, key=lambda c: c.index), 2)]
    created: list[PreferencePair] = []
    thinking = SamplingParams(do_sample=False, max_new_tokens=config.thought_tokens)
    with progress_bar(progress) as bar:
        task = bar.add_task("AI feedback", total=sum(map(len, batches)), info="")
        for batch in filter(None, batches):
            principles = [constitution.draw(random.Random(config.seed * 1_000_003 + zlib.crc32(
                f"{a.id}|{b.id}".encode()))) for _, a, b in batch]
            texts = []
            for (_, a, b), principle in zip(batch, principles, strict=True):
                prompt = render_text(a.prompt)
                texts += [comparison_texts(constitution, prompt, a.text, b.text, principle, tokenizer, chat),
                          comparison_texts(constitution, prompt, b.text, a.text, principle, tokenizer, chat)]
            if config.chain_of_thought:
                thoughts = complete(model, tokenizer, [t + templates.thought for t in texts], thinking, False)[0]
                texts = [t + templates.thought + " " + th.strip() + templates.after_thought
                         for t, th in zip(texts, thoughts, strict=True)]
            else:
                texts = [t + templates.answer for t in texts]
            p_first = scorer(texts)
            if config.chain_of_thought:
                p_first = p_first.clamp(*config.band)
            new = []
            for i, ((pid, a, b), principle) in enumerate(zip(batch, principles, strict=True)):
                q_ab, q_ba = float(p_first[2 * i]), 1.0 - float(p_first[2 * i + 1])
                p = (q_ab + q_ba) / 2
                chosen, rejected = (a, b) if p >= 0.5 else (b, a)
                new.append(PreferencePair(
                    prompt=a.prompt, chosen=chosen.text, rejected=rejected.text, prompt_id=pid,
                    chosen_id=chosen.id, rejected_id=rejected.id, label=max(p, 1 - p),
                    chosen_truncated=chosen.truncated, rejected_truncated=rejected.truncated,
                    provenance={"source": "ai_feedback", "feedback_model": feedback_model,
                                "principle": principle.name, "p_a_first": q_ab, "p_a_second": q_ba,
                                "a": a.id, "chain_of_thought": config.chain_of_thought}))
            if output is not None:
                append_records(output, new)
            created += new
            bar.update(task, advance=len(batch))
    return created


def comparison_dry_run(constitution: Constitution, prompt: str, first: str, second: str,
            tokenizer: PreTrainedTokenizerBase | None = None, chat: bool = False,
            chain_of_thought: bool = False) -> dict[str, str]:
    """The exact strings for one comparison, in both orders."""
    principle = constitution.principles[0]
    end = constitution.templates.thought if chain_of_thought else constitution.templates.answer
    return {
        f"first order (principle {principle.name!r})":
            comparison_texts(constitution, prompt, first, second, principle, tokenizer, chat) + end,
        "second order": comparison_texts(constitution, prompt, second, first, principle, tokenizer, chat) + end,
    }
