"""Judge a policy on held-out prompts: several samples per prompt, several seeds, independent judges,
and the KL to the reference measured on the same samples.

Samples come from the rollout code (plain temperature sampling), so that the per-sequence estimate
KL = Σ_t log π(y_t) − log π_ref(y_t) is unbiased for KL(π ‖ π_ref) on the evaluation prompts. Before
training, π = π_ref and it is exactly 0.

An evaluation's file is reused only when it was made by the same policy, reference, judges and
settings: a fingerprint of the four is written next to it, and any difference means recompute.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.config import require_seed
from rlhfkit.console import console, progress_bar
from rlhfkit.data.io import read_records, write_records
from rlhfkit.data.records import Completion, Prompt, SamplingParams
from rlhfkit.eval.metrics import (
    Comparison,
    distinct_n,
    jackknife_interval,
    mean_words,
    paired_comparison,
    repetition,
    template_share,
)
from rlhfkit.models.packed import keep_packed_weights
from rlhfkit.models.policy import SamplingDistribution, prepare_tokenizer
from rlhfkit.models.reference import Reference
from rlhfkit.models.value_head import Actor
from rlhfkit.reward.base import RewardFn
from rlhfkit.rollout import collect_rollout


@dataclass
class EvalConfig:
    samples: int = 4  # completions per prompt and seed
    seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 40
    temperature: float = 1.0
    batch_size: int = 16  # prompts per generate call
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        for seed in self.seeds:
            require_seed(seed, "seeds")


@torch.no_grad()
def evaluate_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                    judges: dict[str, RewardFn], config: EvalConfig, reference: Reference | None = None,
                    model_name: str = "policy", output: str | os.PathLike | None = None,
                    progress: bool = True) -> list[Completion]:
    """Sample and score; every completion carries each judge's score, ``kl`` and ``tokens``.

    ``reference``: π_ref for the KL (None: the policy itself, as for the initial policy). With an
    ``output`` file that already holds an evaluation with the same fingerprint (policy, reference,
    judges, settings), that file is read instead; with another fingerprint it is recomputed."""
    if not judges:
        raise ValueError("evaluation needs at least one judge")
    reference = reference or _SelfReference(model)
    made_by = evaluation_fingerprint(model, reference, judges, config)
    if output is not None and Path(output).exists():
        saved = fingerprint_path(output)
        earlier = json.loads(saved.read_text()) if saved.exists() else {}
        if earlier == made_by:
            return read_records(output, Completion)
        changed = [k for k in made_by if earlier.get(k) != made_by[k]]
        console.print(f"recomputing {output}: it was made with a different {', '.join(changed)}")
    tokenizer = prepare_tokenizer(tokenizer, model)
    model.eval()
    actor = Actor(model, value_head=False)
    sampling = SamplingDistribution(config.temperature, 0, tokenizer.eos_token_id)
    first, *others = judges.items()
    completions: list[Completion] = []
    batches = [prompts[i:i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    with progress_bar(progress) as bar, keep_packed_weights(model):  # one packing of the weights for all batches
        task = bar.add_task(f"evaluating {model_name}", total=len(batches) * len(config.seeds), info="")
        for seed in config.seeds:
            params = SamplingParams(temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=seed)
            for b, batch in enumerate(batches):
                torch.manual_seed(seed * 1_000_003 + b)
                rollout = collect_rollout(actor, reference, tokenizer, [p.text for p in batch], first[1], sampling,
                                          config.max_new_tokens, config.samples, config.use_chat_template)
                mask = rollout.mask
                kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(dim=1)
                scores = {first[0]: rollout.scores.tolist(), "kl": kl.tolist(), "tokens": mask.sum(dim=1).tolist()}
                for name, judge in others:
                    scores[name] = judge(rollout.prompts, rollout.completions).tolist()
                for i, text in enumerate(rollout.completions):
                    prompt = batch[i // config.samples]
                    index = seed * config.samples + i % config.samples
                    completions.append(Completion(
                        id=f"{prompt.id}-s{seed}-{i % config.samples}", prompt_id=prompt.id, prompt=prompt.text,
                        text=text.strip(), index=index, model=model_name, sampling=params,
                        scores={k: float(v[i]) for k, v in scores.items()}))
                bar.update(task, advance=1)
    if output is not None:
        write_records(output, completions)
        fingerprint_path(output).write_text(json.dumps(made_by, indent=1))
    return completions


def fingerprint_path(output: str | os.PathLike) -> Path:
    return Path(f"{output}.fingerprint.json")


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every named tensor of the model (parameters and buffers), bytes as stored."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def evaluation_fingerprint(model: torch.nn.Module, reference: Reference, judges: Mapping[str, RewardFn],
                           config: EvalConfig) -> dict:
    """What an evaluation depends on: the policy's weights, the reference's (and whether it is the
    policy with its adapter off), each judge by name and kind, and the settings."""
    return {"policy": weights_digest(model),
            "reference": f"{'adapter-off ' if reference.shared else ''}{weights_digest(reference.model)}",
            "judges": sorted(judge_identity(name, judge) for name, judge in judges.items()),
            "settings": json.loads(json.dumps(asdict(config)))}


def judge_identity(name: str, judge: RewardFn) -> str:
    """A judge by name and kind, with its plain settings, the digest of each model it holds and the
    code of each function it wraps: two reward models from two folders (both named "reward_model"),
    or one folder retrained, are different judges."""
    parts = [f"{name}={type(judge).__qualname__}"]
    for key, value in sorted(getattr(judge, "__dict__", {}).items()):
        if isinstance(value, torch.nn.Module):
            parts.append(f"{key}:{weights_digest(value)[:16]}")
        elif isinstance(value, bool | int | float | str):
            parts.append(f"{key}={value}")
        elif code := getattr(value, "__code__", None):
            parts.append(f"{key}:{hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16]}")
    return " ".join(parts)


class _SelfReference(Reference):
    """The policy as its own reference (KL = 0): evaluating the initial policy needs no copy of it."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.shared, self.model = False, model


def scores_by_prompt(completions: Sequence[Completion], key: str) -> dict[str, list[float]]:
    result: dict[str, list[float]] = defaultdict(list)
    for c in completions:
        result[c.prompt_id].append(c.scores[key])
    return dict(result)


def text_stats(completions: Sequence[Completion]) -> dict[str, float]:
    texts = [c.text for c in completions]
    n = max(len(completions), 1)
    return {"kl": sum(c.scores.get("kl", 0.0) for c in completions) / n,
            "tokens": sum(c.scores.get("tokens", 0.0) for c in completions) / n,
            "words": mean_words(texts), "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "repetition_3": repetition(texts, 3), "template_share": template_share(texts)}


def compare(before: Sequence[Completion], after: Sequence[Completion], key: str,
            clusters: Mapping[str, str] | None = None, higher_is_better: bool = True) -> Comparison:
    """One score's per-prompt means after vs before, with its cluster interval (eval/metrics.py)."""
    for side, completions in (("before", before), ("after", after)):
        if any(key not in c.scores for c in completions):
            raise ValueError(f"the {side} evaluation has no {key!r} score; evaluate again with that judge")
    return paired_comparison(scores_by_prompt(before, key), scores_by_prompt(after, key), clusters, higher_is_better)


def compare_distinct_2(before: Sequence[Completion], afters: Sequence[Sequence[Completion]],
                       clusters: Mapping[str, str] | None = None) -> Comparison:
    """Distinct-2 of the after texts − of the before texts on the same prompts, each "after" (one per
    training seed) measured on its own (distinct-n falls with the number of texts) and averaged, with
    the cluster jackknife interval; the win rate is the share of prompts whose own samples are more
    diverse after."""
    def by_prompt(completions: Sequence[Completion]) -> dict[str, list[str]]:
        texts = defaultdict(list)
        for c in completions:
            texts[c.prompt_id].append(c.text)
        return texts

    sides = [by_prompt(before), *map(by_prompt, afters)]
    prompts = sorted(set.intersection(*(set(side) for side in sides)))

    def distinct(side: dict[str, list[str]], subset: Sequence[str]) -> float:
        return distinct_n([t for p in subset for t in side[p]], 2)

    def after(subset: Sequence[str]) -> float:
        return sum(distinct(side, subset) for side in sides[1:]) / len(afters)

    per_prompt = paired_comparison({p: [distinct(sides[0], [p])] for p in prompts},
                                   {p: [after([p])] for p in prompts}, clusters)
    difference, low, high = jackknife_interval(lambda s: after(s) - distinct(sides[0], s), prompts, clusters)
    return Comparison(before=distinct(sides[0], prompts), after=after(prompts), difference=difference, ci_low=low,
                      ci_high=high, prompts=len(prompts), clusters=per_prompt.clusters,
                      samples=sum(len(a) for a in afters) // len(afters), win_rate=per_prompt.win_rate,
                      win_low=per_prompt.win_low, win_high=per_prompt.win_high)
