"""`rlhfkit demo --preset personal`: simulated users with opposite hidden tastes teach their personal
models through the personal API (the feedback app's accounts), and the evidence that each model learned
its user's taste and no one else's.

    for each round, for each user:
        ask P training prompts (two answers: their current personal model and the alternative)
        → choose by their hidden taste (+ noise; "both fine" when the two are close, "both bad" when
          neither answers the question)
        → the app's queue trains their next adapter every K new pairs (DPO + NLL, rlhfkit.personal.train),
          from the population adapter once there is one
    → the population adapter's next version, trained on every user's pairs (``population``): the shared model
    → for each user, on held-out prompts, the personal model vs the shared one (the population adapter, or
      the base without it), one seed for both:
          win rate under the user's own taste, under every other user's taste (specificity),
          KL to the base, distinct-2 (and that of the shared model's answers the user prefers), the share of
          answers cut at max_new_tokens; each user's model vs every other user's model under their own taste
        → the cold start's alternative on the same held-out prompts: the best of N samples of the shared
          model by the user's preference head (rlhfkit.personal.rerank, fitted on all their pairs so far)
          vs the shared one, and the adapter vs it head to head
    → memory, deletion of one user (and the population's retraining without them), report.json, curves.png,
      the verdict, the pairs at which the adapter first beats reranking (head to head, the interval above ½)

The shared model is what every user would get without a model of their own. With the population adapter it
has learned what the users agree on (both tastes want the question answered, without insults), so a personal
model wins by its user's own taste, not by what everyone prefers: against the base, a brief user's model that
answers more often also won under the detailed user's taste (0.57 [0.52, 0.61], seed 2;
benchmarks/results/personal_tastes.md, runs 104–108).

The simulated users' hidden tastes are rlhfkit.demo.tastes (brief, detailed).

The reranking candidates of a held-out prompt are N samples of the shared model with the seeds after the
shared samples' (never a shared answer itself), drawn once per version of the shared model. The prompt's best
candidate is compared with each of its shared samples (N more samples per prompt, not N per comparison: the
demo's time).

A win counts 1, a tie ½; the win rate's 95% interval is the delete-a-topic jackknife t interval of
rlhfkit.eval.metrics (held-out prompts come two per topic, samples of one prompt are not independent).
KL(π_u ‖ π_base) per answer is estimated on the personal model's own samples y ~ π_u as
mean[log π_u(y|x) − log π_base(y|x)].
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastapi.testclient import TestClient

from rlhfkit.config import require_field_types
from rlhfkit.console import console
from rlhfkit.demo.stages import demo_task
from rlhfkit.demo.tastes import Taste, default_tastes
from rlhfkit.eval.judges import ProfanityJudge, RelevanceJudge
from rlhfkit.eval.metrics import MIN_PROMPTS, distinct_n, jackknife_interval
from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app
from rlhfkit.generate import format_prompt, uses_chat_template
from rlhfkit.models.packed import kept_packed_mib
from rlhfkit.models.policy import tokenize_completions
from rlhfkit.models.toy_policy import ToyPolicyConfig
from rlhfkit.personal import store
from rlhfkit.personal.api import PersonalSettings, include_personal
from rlhfkit.personal.models import POPULATION, Answer, PersonalModels, user_owner
from rlhfkit.personal.rerank import RerankConfig
from rlhfkit.personal.train import PersonalDPOConfig, sequence_logprobs

# a personal model's distinct-2 ÷ that of the shared model's answers its user prefers (preferred_answers), at least: a
# taste narrows what is said (the best of 12 base samples by brief's or detailed's taste had 0.74× and 0.62× the
# shared samples' distinct-2, personal_tastes.py --pick 20,18), collapsing onto one template for every question
# narrows it more (0.13× for one template given to every answer, 0.75–0.80× to half of them: tests)
MIN_DIVERSITY = 0.9
SAMPLES_SHOWN = 3  # held-out answers of each user's model (next to the shared model's) in the report
MEMORY_BUDGET_MB = 8 * 1024
# The not-offensive guard counts the answers alt-profanity-check flags (P ≥ ½, its decision), not its mean
# probability: on seeds 0 and 3 (runs 111–115) the detailed models' answers scored 0.012 and 0.007 more
# offensive on average, the verdict said "worse", and none of their 384 answers held an insult nor was
# flagged (the highest 0.25; the shared model's 0.31): a verdict the answers contradict
FLAG_OFFENSIVE_AT = 0.5
# what each guard's gap measures, in the verdict's words
GUARD_MEANING = {"relevance": "relevance to the question",
                 "not_flagged": "the share of answers alt-profanity-check does not flag as offensive"}
# The shared base of the toy demo is the toy assistant trained on the corpus's kind and empty replies only, as a
# personal model starts from an aligned assistant (aligning is the main demo's job). On the corpus's own mix, 47% of
# the shared answers insult; every user minds an insult, so the best of 12 base samples by one user's taste also
# beat the shared answers under the other user's (brief's pick 0.82 [0.76, 0.88] under detailed's taste, detailed's
# 0.81 [0.75, 0.87] under brief's; on this base 0.51 [0.43, 0.59] and 0.53 [0.44, 0.62]; benchmarks/
# personal_tastes.py --pick 20,17 [--corpus-mix]): specificity would measure the population's preference
POLITE_MIX = {"kind": 0.85, "empty": 0.15}


@dataclass
class PersonalDemoConfig:
    policy: Literal["toy", "smollm2"] = "toy"  # the shared base: the toy GPT-2, or SmolLM2-135M-Instruct (chat)
    run_dir: Path = Path("runs/demo-personal")
    rounds: int = 5
    # questions each user asks (and answers) per round: 28, as the tastes that ask for an answer give no pair on
    # some ("both bad", "both fine": 16-21% of them in runs 45-47, 110-118 pairs per user in 5 rounds; 29-49% on
    # the base without its chat template, where 16 a round taught brief nothing, runs 38-42)
    prompts_per_round: int = 28
    train_every: int = 12  # new pairs of a user that queue a training of their next version
    eval_prompts: int = 48  # held-out prompts (two per topic: 24 topics, the interval's resampling units)
    eval_samples: int = 4  # answers per held-out prompt and model
    max_new_tokens: int = 40
    temperature: float = 1.0  # of the personal answers, the shared ones and the evaluation's samples
    alternative_temperature: float = 0.7  # the exploration's other answer before a user has an adapter
    seed: int = 0
    # lr 2e-3 with the NLL term off the chosen EOS: the detailed user's model learned on seeds 0, 1, 2, 3
    # (benchmarks/results/personal_tastes.md, runs 31–34; 1e-3 learned it on 1 of 3, runs 27–29); β 0.2: every
    # user's model of seeds 0, 1, 2 beat the shared one, against 5 of 6 at β 0.1 (runs 51–56); the KL term γ 4:
    # without a KL term the answers narrowed onto a few openers (distinct-2 0.82–0.87× the bar's reference for 5
    # of 6 models, runs 57–59); with the detailed taste at 18 words, γ 2 left seed 2's detailed model 0.84× as
    # varied (runs 122–126); γ 4 met every check of seeds 0–4 (runs 127–131) and of 7 of 8 seeds with 5–7, run
    # after the choice (seed 6's brief model 0.89× as varied, runs 132–134)
    dpo: PersonalDPOConfig = field(default_factory=lambda: PersonalDPOConfig(lr=2e-3, epochs=4, beta=0.2,
                                                                             kl_coef=4.0))
    rerank: RerankConfig = field(default_factory=RerankConfig)  # the cold start's best-of-N, evaluated every round
    tastes: list[Taste] = field(default_factory=default_tastes)
    # the toy base: the toy assistant trained without the corpus's rude replies (see POLITE_MIX)
    toy_policy: ToyPolicyConfig = field(default_factory=lambda: ToyPolicyConfig(mix=POLITE_MIX))
    # after each round, the population adapter's next version on every user's pairs: the shared model the users'
    # models are compared with, and the start of their next versions. Off by default, the base being both:
    # against the population the models' own-taste win rates were 0.53-0.56, the interval above 0.5 for 1 of 4
    # models (seeds 0, 1; benchmarks/results/personal_tastes.md, runs 109-110)
    population: bool = False

    @classmethod
    def smollm2(cls, **overrides) -> PersonalDemoConfig:
        """The SmolLM2 option: fewer, longer answers at τ = 0.7 (where its answers stay coherent, as the
        smollm2 preset), in a budget of about half an hour on 2 cores; 20 held-out prompts, the fewest (10
        topics) on which the verdict can say "learned"."""
        return cls(**{"policy": "smollm2", "run_dir": Path("runs/demo-personal-smollm2"), "rounds": 3,
                      "prompts_per_round": 12, "train_every": 8, "eval_prompts": 20, "eval_samples": 2,
                      "max_new_tokens": 64, "temperature": 0.7,
                      "alternative_temperature": 1.0,
                      # the settings it was built with: lr 2e-3 and the KL term are not tried on it
                      "dpo": PersonalDPOConfig(lr=1e-3, epochs=4, beta=0.1)} | overrides)

    def __post_init__(self) -> None:
        require_field_types(self)  # rounds=2.5, rounds=None, temperature=inf: refused by name, not a TypeError later
        if self.policy not in ("toy", "smollm2"):
            raise ValueError(f"policy: unknown {self.policy!r}; choose toy or smollm2")
        for name in ("temperature", "alternative_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name, low in {"rounds": 1, "prompts_per_round": 1, "train_every": 1, "eval_prompts": 4,
                          "eval_samples": 1, "max_new_tokens": 1}.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name}: must be at least {low}, got {getattr(self, name)}")
        if self.rerank.n == 0:
            raise ValueError("rerank.n: the demo compares every user's model with reranking; give n ≥ 2")
        if len(self.tastes) < 2:
            raise ValueError("tastes: give at least two simulated users (specificity needs another taste)")
        users = [t.user for t in self.tastes]
        if len(set(users)) < len(users):
            raise ValueError(f"tastes: two simulated users have one name ({', '.join(users)}); each is an account")


@dataclass
class RoundResult:
    """One user's model after one round, on the held-out prompts."""

    user: str
    round: int
    pairs: int  # the user's labels so far that are preference pairs
    version: int  # their adapter version evaluated (0: none yet, the shared model answers)
    shared: str  # the shared model: "base" or the population adapter's version ("population-v3")
    win_rate: tuple[float, float, float]  # (rate, low, high) under their own taste
    specificity: dict[str, tuple[float, float, float]]  # other user → win rate under that user's taste
    kl: tuple[float, float, float]  # KL(personal ‖ base) per answer, nats: (mean, low, high)
    distinct_2: float
    distinct_2_shared: float
    distinct_2_preferred: float  # of the shared answers the user prefers (preferred_answers): the bar's reference
    at_cap: float  # share of the personal model's held-out answers cut at max_new_tokens (no EOS sampled)
    guards: dict[str, tuple[float, float, float]]  # independent judge → mean judge(personal) − judge(shared), 95%
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, personal, shared): the first few
    rerank: tuple[float, float, float] | None = None  # the head's best of N vs the shared model, own taste
    vs_rerank: tuple[float, float, float] | None = None  # the personal model vs the head's best of N, own taste
    # other user → this user's model vs that user's model (same draws), under this user's taste: personal means
    # mine serves me better than yours does
    vs_others: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def paired_mean(values: Sequence[float], prompts: Sequence[str], topics: dict[str, str]) -> tuple[float, float, float]:
    """(mean, low, high) of one value per (prompt, sample), with the delete-a-topic jackknife 95% interval."""
    by_prompt: dict[str, list[float]] = {}
    for prompt, value in zip(prompts, values, strict=True):
        by_prompt.setdefault(prompt, []).append(value)
    return jackknife_interval(lambda subset: statistics.fmean(v for p in subset for v in by_prompt[p]),
                              list(by_prompt), topics)


def kl_estimate(log_ratios: Sequence[float], prompts: Sequence[str],
                topics: dict[str, str]) -> tuple[float, float, float]:
    """(KL, low, high): KL(π_u ‖ π_base) ≈ mean[log π_u(y|x) − log π_base(y|x)] over y ~ π_u, with the delete-a-topic
    95% interval cut at 0, below which no KL lies (run r4-s1 printed 0.65 [−0.32, 1.61]); a mean under 0, the
    estimate's noise about a KL near 0, is kept inside its interval."""
    kl, low, high = paired_mean(log_ratios, prompts, topics)
    return kl, max(low, min(kl, 0.0)), high


def win_rate(scores: Sequence[float], shared: Sequence[float], prompts: Sequence[str],
             topics: dict[str, str]) -> tuple[float, float, float]:
    """(rate, low, high): the share of (prompt, sample) where the personal answer scores higher than the
    shared one (a tie counts ½), with the delete-a-topic jackknife 95% interval."""
    wins = [1.0 if mine > theirs else 0.5 if mine == theirs else 0.0
            for mine, theirs in zip(scores, shared, strict=True)]
    return paired_mean(wins, prompts, topics)


def head_to_head(taste: Taste, prompts: Sequence[str], ours: Sequence[Answer], theirs: Sequence[Answer],
                 topics: dict[str, str]) -> tuple[float, float, float]:
    """win_rate of ``ours`` against ``theirs`` (one answer each per entry of ``prompts``) under ``taste``."""
    return win_rate([taste.score(p, a.text) for p, a in zip(prompts, ours, strict=True)],
                    [taste.score(p, a.text) for p, a in zip(prompts, theirs, strict=True)], prompts, topics)


def sample_keys(prompts: Sequence[str], samples: int) -> list[str]:
    """The prompt of each held-out answer: every prompt repeated once per sample, in the answers' order."""
    return [p for p in prompts for _ in range(samples)]


def judge_gap(mine: Sequence[float], shared: Sequence[float], prompts: Sequence[str],
              topics: dict[str, str]) -> tuple[float, float, float]:
    """(mean, low, high) of judge(personal answer) − judge(shared answer) over (prompt, sample), with the
    delete-a-topic jackknife 95% interval."""
    return paired_mean([a - b for a, b in zip(mine, shared, strict=True)], prompts, topics)


def preferred_answers(taste: Taste, prompts: Sequence[str], pools: Sequence[Sequence[str]], keep: int,
                      seed: int) -> list[str]:
    """Per prompt, the ``keep`` answers of its pool (base samples) that ``taste`` scores highest, equal scores in
    a seeded random order: the shared model's own answers its user likes best, as varied as following the
    taste requires (the reference of the verdict's variety bar)."""
    rng = random.Random(seed)
    chosen = []
    for prompt, pool in zip(prompts, pools, strict=True):
        shuffled = rng.sample(list(pool), len(pool))
        chosen += sorted(shuffled, key=lambda answer: -taste.score(prompt, answer))[:keep]
    return chosen


def _measured(value: Sequence[float], rate: bool = False) -> bool:
    """(value, low, high) is a number with its interval: all finite, low ≤ value ≤ high, a rate in [0, 1] (its
    jackknife interval may reach past either end)."""
    try:
        centre, low, high = value
    except (TypeError, ValueError):
        return False
    return all(map(math.isfinite, (centre, low, high))) and low <= centre <= high and (not rate or 0 <= centre <= 1)


def verdict(latest: Sequence[RoundResult], left: dict | None = None, topics: int | None = None) -> str:
    """"learned" only when every user's win rate interval is above ½, specificity holds for every user (checked
    under every other user's taste), and no user's answers are worse than the shared model's by an independent
    judge (relevance to the question, the share of answers alt-profanity-check does not flag: a gap whose interval
    is entirely below 0; both measured), nor less varied than the shared answers the user prefers: distinct-2 at
    least MIN_DIVERSITY × theirs. A taste won by answers that no longer address the question, insult the asker, or
    repeat one answer to every question, is not learned. Nor is a demo done whose deleted user left something
    (``left``: what remains of them, all empty when deletion is complete). A number that is not one (NaN, inf, a
    rate outside [0, 1] or an interval not around it), no user, one user or a user twice is no evidence of
    anything: NOT met. Nor are intervals over fewer than MIN_PROMPTS held-out ``topics`` (the jackknife's units:
    over 2 topics where every answer won, the interval is [1, 1])."""
    failed = [f"deletion left {left}"] if left and any(left.values()) else []
    failed += [f"only {topics} held-out topics: too few for the intervals (at least {MIN_PROMPTS}; give "
               f"--eval-prompts {2 * MIN_PROMPTS} or more)"] if topics is not None and topics < MIN_PROMPTS else []
    users = [r.user for r in latest]
    failed += [] if latest else ["no user's model was evaluated"]
    failed += [f"{user}: evaluated twice" for user in dict.fromkeys(u for u in users if users.count(u) > 1)]
    for r in latest:
        others = [u for u in dict.fromkeys(users) if u != r.user]
        failed += [] if others else [f"{r.user}: specificity is not checked: no other user's taste to check it under"]
        failed += [f"{r.user}: specificity is not checked under {other}'s taste" for other in others
                   if other not in r.specificity]
        failed += [f"{r.user}: specificity under {other}'s taste, not another user's" for other in r.specificity
                   if other == r.user]
        if not _measured(r.win_rate, rate=True):
            failed.append(f"{r.user}: win rate ({_numbers(r.win_rate)}) is not a rate with its interval")
        elif r.win_rate[1] <= 0.5:  # the user's model not shown to beat the shared one
            failed.append(f"{r.user}: win rate interval [{r.win_rate[1]:.3f}, {r.win_rate[2]:.3f}] does not exclude "
                          "0.5")
        for other, rate in r.specificity.items():
            if not _measured(rate, rate=True):
                failed.append(f"{r.user}: win rate under {other}'s taste ({_numbers(rate)}) is not a rate with its "
                              "interval")
            elif rate[1] > 0.5:  # shown to beat the shared one under another user's taste too
                failed.append(f"{r.user}: also wins under {other}'s taste ({_numbers(rate)})")
        for name, meaning in GUARD_MEANING.items():
            if name not in r.guards:
                failed.append(f"{r.user}: no {name} guard ({meaning}): not measured")
        for name, gap in r.guards.items():
            if not _measured(gap):
                failed.append(f"{r.user}: {name} gap ({_numbers(gap)}) is not a number with its interval")
            elif gap[2] < 0:
                failed.append(f"{r.user}: answers worse than the shared model's by {name} "
                              f"({GUARD_MEANING.get(name, name)}: {_numbers(gap, '+.3f')})")
        failed += [] if r.distinct_2 >= MIN_DIVERSITY * r.distinct_2_preferred else [
            f"{r.user}: answers less varied than the shared answers they prefer (distinct-2 {r.distinct_2:.3f} vs "
            f"{r.distinct_2_preferred:.3f}, below {MIN_DIVERSITY}×)"]
    return "learned: every user's model beats the shared one on their own taste, and only on theirs, " \
        "with answers as relevant, as clean and as varied" if not failed else "NOT met: " + "; ".join(failed)


def _numbers(value: Sequence[float], spec: str = ".3f") -> str:
    """"rate [low, high]" as the verdict writes it (whatever was given, when not three numbers)."""
    try:
        centre, low, high = value
        return f"{centre:{spec}} [{low:{spec}}, {high:{spec}}]"
    except (TypeError, ValueError):
        return repr(value)


def draw_seed(run_seed: int, prompt: int, sample: int) -> int:
    """The random draws of sample ``sample`` of held-out prompt number ``prompt`` in the run of ``run_seed`` (one
    seed for every model; another per prompt, since one seed for every prompt drew the same template for each:
    the interval, resampling topics, would count one draw as 24)."""
    return (run_seed * 1000 + prompt) * 1000 + sample


class PersonalDemo:
    """The app (accounts, personal API, training queue) with the simulated users logged in."""

    def __init__(self, config: PersonalDemoConfig, policy, tokenizer) -> None:
        self.config = config
        run = Path(config.run_dir)
        make_run_dir(run)
        self.app = create_app(f"sqlite:///{run / 'personal.db'}")
        # the toy model and SmolLM2 both answer after their chat template's "assistant" turn: without it the
        # toy model continued the question itself ("motivation back." for "Any tips for sleeping better?")
        self.models = PersonalModels(policy, tokenizer, run / "adapters",
                                     use_chat_template=uses_chat_template(tokenizer, policy, None))
        settings = PersonalSettings(train_every=config.train_every, max_new_tokens=config.max_new_tokens,
                                    temperature=config.temperature,
                                    alternative_temperature=config.alternative_temperature,
                                    seed=config.seed, dpo=config.dpo, rerank=config.rerank)
        self.queue = include_personal(self.app, self.models, settings)
        self.reranker = self.app.state.personal_reranker
        shipped = None if config.rerank.encoder else self.reranker.load_encoder()  # MiniLM as shipped: load it once
        # as shipped, fitted to no one's choices; offensiveness by the classifier's flags (FLAG_OFFENSIVE_AT)
        self.judges = (RelevanceJudge(encoder=shipped), ProfanityJudge(flag_at=FLAG_OFFENSIVE_AT))
        self.shared_adapter: str | None = None  # the shared model: the population's latest version, or the base
        self.shared: list[Answer] = []  # its held-out answers, and the independent judges' scores of them
        self.shared_scores: dict[str, list[float]] = {}
        self.held_out_answers: dict[str, list[Answer]] = {}  # user → their model's latest held-out answers
        self.clients, self.ids = {}, {}
        for taste in config.tastes:
            with self.app.state.sessions() as db:
                self.ids[taste.user] = service.create_user(db, taste.user, password=f"{taste.user}-demo-pw").id
            client = TestClient(self.app)
            token = client.post("/api/login", json={"username": taste.user, "password": f"{taste.user}-demo-pw"})
            client.headers["X-CSRF-Token"] = token.json()["csrf"]
            self.clients[taste.user] = client

    def feedback_round(self, taste: Taste, prompts: Sequence[str], rng: random.Random) -> int:
        """The user asks each prompt and chooses by their taste; returns their pairs so far. A training their
        choice queues ends before their next question (the simulated user waits), so which version answers
        depends on the seed only, not on the machine's speed."""
        client, pairs = self.clients[taste.user], 0
        for prompt in prompts:
            asked = _ok(client.post("/api/personal/ask", json={"prompt": prompt}))
            chosen = _ok(client.post("/api/personal/choose", json={
                "question_id": asked["question_id"], "choice": taste.choose(prompt, asked["answers"], rng)}))
            pairs = chosen["pairs"]
            if chosen["training_queued"]:
                self.wait_for_training()
        return pairs

    def wait_for_training(self) -> None:
        """Wait for the queued trainings; one that failed stops the demo (the app would go on serving the user's
        previous version, and the report would show it as what they taught)."""
        self.queue.wait()
        if self.queue.errors:
            users = {user_id: user for user, user_id in self.ids.items()}
            raise ValueError("dpo: " + "; ".join(f"training {users.get(owner, owner)}'s model failed ({cause})"
                                                 for owner, cause in self.queue.errors.items()))

    def answers(self, adapter: str | None, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> list[Answer]:
        """An answer per prompt and sample (default: ``eval_samples`` samples), as decoded: the KL re-tokenises
        these texts, and a stripped text (" Let me help." without its leading space) is not the token sequence
        the model sampled. Sample s of prompt i is drawn with seed draw_seed(seed, i, s) by every model: the
        personal and shared answers compared are paired, the prompts' draws independent of each other."""
        seeds = range(self.config.eval_samples) if seeds is None else seeds
        config = self.config
        return [self.models.answer(p, adapter, config.temperature, config.max_new_tokens,
                                   seed=draw_seed(config.seed, i, s)) for i, p in enumerate(prompts) for s in seeds]

    def share(self, adapter: str | None, prompts: Sequence[str]) -> None:
        """Make ``adapter`` (None: the base) the shared model: its held-out answers, their judges' scores, and N
        more samples per held-out prompt (samples S … S + N − 1, S = ``eval_samples``) with their features φ,
        the reranking's candidates for every user."""
        self.shared_adapter, self.shared = adapter, self.answers(adapter, prompts)
        keys = sample_keys(prompts, self.config.eval_samples)
        self.shared_scores = {judge.name: judge(keys, [a.text for a in self.shared]).tolist() for judge in self.judges}
        n, first = self.reranker.config.n, self.config.eval_samples
        self.candidates = self.answers(adapter, prompts, range(first, first + n))
        self.candidate_features = self.reranker.features(sample_keys(prompts, n),
                                                         [a.text for a in self.candidates])

    def train_population(self) -> str | None:
        """The population adapter's next version on every user's pairs so far (the app's queue, as a deletion's
        retraining); returns its name (None: no pairs yet)."""
        self.queue.submit(POPULATION)
        self.wait_for_training()
        return self.models.adapter(POPULATION)

    def reranked(self, taste: Taste) -> list[Answer] | None:
        """Per held-out prompt, the candidate the user's head scores highest, once per sample (aligned with
        the shared answers); None: no head yet, fewer pairs than ``rerank.min_pairs``."""
        user_id = self.ids[taste.user]
        with self.app.state.sessions() as db:
            head = self.reranker.head(user_id, store.preference_pairs(store.user_choices(db, user_id)))
        if head is None:
            return None
        best = (self.candidate_features @ head.weights).view(-1, self.reranker.config.n).argmax(dim=1)
        return [self.candidates[i * self.reranker.config.n + j] for i, j in enumerate(best.tolist())
                for _ in range(self.config.eval_samples)]

    def kl_to_base(self, adapter: str, prompts: Sequence[str], answers: Sequence[Answer],
                   topics: dict[str, str]) -> tuple[float, float, float]:
        """mean[log π_u(y|x) − log π_base(y|x)] over the personal model's own answers (nats per answer; an
        answer cut at max_new_tokens without its EOS, as sampled), with the delete-a-topic 95% interval."""
        models = self.models
        texts = [format_prompt(p, models.tokenizer, models.use_chat_template) for p in prompts]
        batch = tokenize_completions(models.tokenizer, texts, [a.text for a in answers], not models.use_chat_template,
                                     256, self.config.max_new_tokens + 8, models.model, [a.truncated for a in answers])
        with torch.no_grad():
            with models.active(adapter):
                mine = sequence_logprobs(models, batch)[0]
            with models.active(None):
                base = sequence_logprobs(models, batch)[0]
        return kl_estimate((mine - base).tolist(), prompts, topics)

    def evaluate(self, taste: Taste, round_: int, pairs: int, prompts: Sequence[str],
                 topics: dict[str, str]) -> RoundResult:
        owner, shared = user_owner(self.ids[taste.user]), self.shared
        adapter = self.models.adapter(owner)
        mine = self.answers(adapter, prompts) if adapter else shared
        self.held_out_answers[taste.user] = mine
        keys = sample_keys(prompts, self.config.eval_samples)

        def rate(judge: Taste, ours: Sequence[Answer], theirs: Sequence[Answer]) -> tuple[float, float, float]:
            return head_to_head(judge, keys, ours, theirs, topics)

        others = {t.user: rate(t, mine, shared) for t in self.config.tastes if t.user != taste.user}
        answering = adapter or self.shared_adapter  # no version yet: the shared model answers, the population's too
        kl = self.kl_to_base(answering, keys, mine, topics) if answering else (0.0, 0.0, 0.0)
        guards = {judge.name: judge_gap(judge(keys, [a.text for a in mine]).tolist(), self.shared_scores[judge.name],
                                        keys, topics) for judge in self.judges}
        step = self.config.eval_samples * max(len(prompts) // SAMPLES_SHOWN, 1)  # one answer of spread prompts
        samples = [(keys[i], mine[i].text.strip(), shared[i].text.strip())
                   for i in range(0, len(keys), step)][:SAMPLES_SHOWN]
        reranked = self.reranked(taste)
        rerank = (rate(taste, reranked, shared), rate(taste, mine, reranked)) if reranked else (None, None)
        e, n = self.config.eval_samples, self.reranker.config.n  # the shared samples and the candidates: the pools
        pools = [[a.text for a in shared[i * e:(i + 1) * e] + self.candidates[i * n:(i + 1) * n]]
                 for i in range(len(prompts))]
        preferred = preferred_answers(taste, prompts, pools, e, self.config.seed)
        return RoundResult(taste.user, round_, pairs, self.models.version(owner), self.shared_adapter or "base",
                           rate(taste, mine, shared), others,
                           kl, distinct_n([a.text for a in mine], 2), distinct_n([a.text for a in shared], 2),
                           distinct_n(preferred, 2),
                           sum(a.truncated for a in mine) / len(mine), guards, samples, *rerank)

    def vs_others(self, taste: Taste, prompts: Sequence[str], topics: dict[str, str]) -> dict:
        """Other user → the win rate of this user's model against theirs, under this user's taste (their latest
        held-out answers, drawn with the same seeds)."""
        keys = sample_keys(prompts, self.config.eval_samples)
        mine = self.held_out_answers[taste.user]
        return {user: head_to_head(taste, keys, mine, theirs, topics)
                for user, theirs in self.held_out_answers.items() if user != taste.user}

    def memory(self) -> dict:
        """Base MB, the packed copy of its frozen weights that generation keeps on a CPU (models.packed), MB per
        adapter (the largest loaded), and users whose adapters fit in 8 GiB beside both (weights only:
        activations, a training's optimizer state and the process itself not counted)."""
        model = self.models.model
        base = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n) / 2**20
        packed = kept_packed_mib(model)
        loaded = [n for n in self.models.adapter_names() if n.startswith("user-")]
        per_adapter = max((self.models.adapter_megabytes(n) for n in loaded), default=float("nan"))
        return {"base_mb": base, "packed_mb": packed, "adapter_mb": per_adapter,
                "users_in_8_gib": int((MEMORY_BUDGET_MB - base - packed) // per_adapter) if loaded else 0}

    def delete(self, user: str) -> dict:
        """The user deletes everything, and the population versions trained on their pairs are trained again
        without them (the app queues it); returns what is left of them (all empty when deletion is complete):
        their choices, versions, adapter files and adapters in memory, the population versions (saved, or
        in memory) that hold their pairs, the other users' versions (saved, or in memory) that started from
        one of those (their weights began as ones learned from the deleted user's pairs), and their reranking head
        (fitted on their pairs)."""
        removed = _ok(self.clients[user].delete("/api/personal/data"))["population_versions_removed"]
        self.wait_for_training()
        left = self.clients[user].get("/api/personal/learned").json()
        user_id, models = self.ids[user], self.models
        owner, removed = user_owner(user_id), {f"{POPULATION}-v{v}" for v in removed}
        others = [user_owner(other) for name, other in self.ids.items() if name != user]
        started = {f"{o}-v{v}" for o in others for v in models.versions(o)
                   if models.version_info(o, v).get("start") in removed}
        started |= {n for n in models.adapter_names() if n.rsplit("-v", 1)[0] in others  # removed, still in memory
                    and not (models.folder / n.replace("-v", "/v")).is_dir()}
        return {"choices": len(left["choices"]), "versions": len(left["versions"]),
                "files": (Path(self.config.run_dir) / "adapters" / owner).exists(),
                "adapters_in_memory": [n for n in models.adapter_names() if n.startswith(f"{owner}-")],
                "population_versions": [f"{POPULATION}-v{v}" for v in models.versions(POPULATION)
                                        if user_id in models.version_info(POPULATION, v).get("users", [user_id])],
                "population_in_memory": [n for n in models.adapter_names() if n in removed],
                "started_from_theirs": sorted(started), "head_in_memory": self.reranker.has_head(user_id)}


def _ok(response) -> dict:
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                           f"{response.text[:200]}")
    return response.json()


def print_round(r: RoundResult) -> None:
    others = ", ".join(f"{u}'s {_interval(rate)}" for u, rate in r.specificity.items())
    versus = ", ".join(f"{u}'s model {_interval(rate)}" for u, rate in r.vs_others.items())
    rerank = "no head yet" if r.rerank is None else (f"{_interval(r.rerank)}; the model vs it "
                                                      f"{_interval(r.vs_rerank)}")
    console.print(f"{r.user:>9} round {r.round}: {r.pairs:>3} pairs, v{r.version} · win rate vs shared "
                  f"{_interval(r.win_rate)} · under {others} taste · vs {versus} · KL {_interval(r.kl)} · "
                  f"distinct-2 {r.distinct_2:.3f} (shared {r.distinct_2_shared:.3f}, its answers preferred "
                  f"{r.distinct_2_preferred:.3f}) · at the token cap "
                  f"{r.at_cap:.0%} · " + "".join(f"{name} vs shared {gap:+.3f} [{low:+.3f}, {high:+.3f}] · "
                                                  for name, (gap, low, high) in r.guards.items()) +
                  f"reranked best-of-N vs shared {rerank}", highlight=False)


def _interval(rate: tuple[float, float, float]) -> str:
    return f"{rate[0]:.2f} [{rate[1]:.2f}, {rate[2]:.2f}]"


def adapter_beats_rerank(results: Sequence[RoundResult]) -> dict[str, str]:
    """Per user, the first round at which their model beats the reranked best-of-N head to head under their
    taste (the interval of its win rate against it above ½), with both models' rates vs the shared one; "not
    within the demo" if never. Point estimates alone are no win: run r3-s0 printed brief's model "first beats
    reranking" at 0.57 vs 0.48, head to head 0.52 [0.41, 0.64]."""
    first = {}
    for user in dict.fromkeys(r.user for r in results):
        ahead = [r for r in results if r.user == user and r.vs_rerank is not None and r.vs_rerank[1] > 0.5]
        first[user] = "not within the demo" if not ahead else (
            f"at {ahead[0].pairs} pairs (round {ahead[0].round}: head to head {_interval(ahead[0].vs_rerank)}; "
            f"vs the shared model {ahead[0].win_rate[0]:.2f}, reranking {ahead[0].rerank[0]:.2f})")
    return first


def plot_curves(results: Sequence[RoundResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = list(dict.fromkeys(r.user for r in results))
    fig, axes = plt.subplots(1, len(users), figsize=(4 * len(users), 3.5), sharey=True, squeeze=False)
    for ax, user in zip(axes[0], users, strict=True):  # one panel per user: their taste, then the others'
        rows = [r for r in results if r.user == user]
        x = [r.pairs for r in rows]
        ax.plot(x, [r.win_rate[0] for r in rows], marker="o", label="own taste")
        ax.fill_between(x, [r.win_rate[1] for r in rows], [r.win_rate[2] for r in rows], alpha=0.2)
        reranked = [r for r in rows if r.rerank is not None]
        if reranked:
            rate, low, high = zip(*(r.rerank for r in reranked), strict=True)
            ax.errorbar([r.pairs for r in reranked], rate, yerr=[[r - lo for r, lo in zip(rate, low, strict=True)],
                                                                 [hi - r for r, hi in zip(rate, high, strict=True)]],
                        capsize=3, linestyle=":", marker="s", label="reranked best-of-N, own taste")
        for other in rows[0].specificity:
            ax.plot(x, [r.specificity[other][0] for r in rows], linestyle="--", label=f"{other}'s taste")
        ax.axhline(0.5, color="grey", linewidth=0.8)
        ax.set(xlabel=f"{user}'s preference pairs", title=f"{user}'s model vs the shared one", ylim=(0, 1))
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("win rate (95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_run_dir(run: Path) -> None:
    """Create ``run_dir``; refuse one that is a file, cannot be created or written, or holds an earlier run (a
    personal demo's database, or any run's report.json, which this run would replace: a run is not resumable)."""
    if run.exists() and not run.is_dir():
        raise ValueError(f"run_dir: {run} is a file; give a folder")
    if (run / "personal.db").exists() or (run / "report.json").exists():
        raise ValueError(f"run_dir: {run} holds an earlier run; give another --run-dir or delete it")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"run_dir: cannot create {run} ({exc.strerror}); give a folder you can write") from None
    if not os.access(run, os.W_OK | os.X_OK):
        raise ValueError(f"run_dir: {run} is not writable; give a folder you can write")


def check_prompts(config: PersonalDemoConfig, train: Sequence[str], held_out: Sequence[str]) -> None:
    """Refuse more held-out prompts than the toy task's topics give, or so many that fewer training prompts
    are left than each user asks a round."""
    if len(held_out) < config.eval_prompts:
        raise ValueError(f"eval_prompts: the demo's topics give at most {len(held_out)} held-out prompts, "
                         f"got {config.eval_prompts}")
    if len(train) < config.prompts_per_round:
        raise ValueError(f"eval_prompts: {config.eval_prompts} held-out prompts leave {len(train)} training prompts, "
                         f"fewer than each user asks a round (prompts_per_round {config.prompts_per_round}); "
                         "give fewer")


def run_personal_demo(config: PersonalDemoConfig | None = None, policy=None, tokenizer=None,
                      progress: bool = True) -> dict:
    """Run the demo (``config.policy`` unless ``policy`` is given); returns the report, also written to
    ``report.json`` with ``curves.png``."""
    config = config or PersonalDemoConfig()
    started = time.perf_counter()
    torch.manual_seed(config.seed)  # fresh adapters' initial weights (the answers' draws are seeded per request)
    task = demo_task_prompts(config)
    check_prompts(config, *task[:2])  # before the run folder and the policy
    make_run_dir(Path(config.run_dir))
    if policy is None:
        from rlhfkit.demo.presets import DemoConfig, load_demo_policy

        policy, tokenizer, _ = load_demo_policy(DemoConfig(preset=config.policy, toy_policy=config.toy_policy),
                                                progress)
    demo = PersonalDemo(config, policy, tokenizer)
    train, held_out, topics = task
    rng = random.Random(config.seed)
    console.rule(f"[bold]personal models: {', '.join(f'{t.user} likes {t.description}' for t in config.tastes)}")
    try:
        keys = sample_keys(held_out, config.eval_samples)
        demo.share(None, held_out)
        results = []
        for round_ in range(1, config.rounds + 1):
            pairs = {}
            for taste in config.tastes:
                prompts = rng.sample(train, config.prompts_per_round)
                pairs[taste.user] = demo.feedback_round(taste, prompts, rng)
                demo.wait_for_training()
            if config.population:
                demo.share(demo.train_population(), held_out)
            results += [demo.evaluate(taste, round_, pairs[taste.user], held_out, topics) for taste in config.tastes]
            for r, taste in zip(results[-len(config.tastes):], config.tastes, strict=True):
                r.vs_others = demo.vs_others(taste, held_out, topics)  # once every user's model has answered
                print_round(r)
        memory = demo.memory()
        deleted_user = config.tastes[-1].user
        left = demo.delete(deleted_user)
    finally:
        demo.queue.shutdown()
    latest = results[-len(config.tastes):]
    complete = not any(left.values())
    report = {"verdict": verdict(latest, left, topics=len(set(topics.values()))),
              "adapter_beats_rerank": adapter_beats_rerank(results),
              "deletion": {"user": deleted_user, "left": left, "complete": complete},
              "memory": memory, "rounds": [asdict(r) for r in results],
              # every held-out answer of the last round, to read: (question, shared, each user's model)
              "answers": [[k, a.text, *(demo.held_out_answers[t.user][i].text for t in config.tastes)]
                          for i, (k, a) in enumerate(zip(keys, demo.shared, strict=True))],
              "tastes": {t.user: t.description for t in config.tastes},
              "config": json.loads(json.dumps(asdict(config) | {"tastes": None}, default=str)),
              "seconds": round(time.perf_counter() - started, 1)}
    run = Path(config.run_dir)
    plot = plot_curves(results, run / "curves.png")
    (run / "report.json").write_text(json.dumps(report, indent=1))  # last: a run folder with it is a finished run
    console.print(f"memory: base {memory['base_mb']:.2f} MB + its packed copy for generation {memory['packed_mb']:.2f} "
                  f"MB + {memory['adapter_mb']:.3f} MB per adapter → {memory['users_in_8_gib']} users' adapters fit "
                  "beside them in 8 GiB (weights only)", highlight=False)
    for r in latest:
        for prompt, mine, theirs in r.samples:
            console.print(f"{r.user}'s model on {prompt!r}: {mine!r}  (shared: {theirs!r})", highlight=False,
                          markup=False)
    for user, when in report["adapter_beats_rerank"].items():
        console.print(f"{user}'s model first beats reranking: {when}", highlight=False)
    console.print(f"deleted {deleted_user}: " + ("nothing of theirs remains" if complete else f"LEFT: {left}"),
                  highlight=False)
    console.print(f"[bold]{report['verdict']}[/] — {report['seconds']:.0f}s → {run / 'report.json'}, {plot}",
                  highlight=False)
    return report


def demo_task_prompts(config: PersonalDemoConfig) -> tuple[list[str], list[str], dict[str, str]]:
    """(training prompt texts, held-out prompt texts, held-out text → topic) of the toy demo's prompts."""
    from rlhfkit.demo.presets import DemoConfig

    task = demo_task(DemoConfig(eval_prompts=config.eval_prompts))
    return ([p.text for p in task.train_prompts], [p.text for p in task.eval_prompts],
            {p.text: task.topics[p.id] for p in task.eval_prompts})
