"""The demo's stages, one function each; every stage writes its files into the run folder and is
skipped when they are there, so a rerun resumes (PPO from its latest checkpoint)."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from rlhfkit.console import console
from rlhfkit.data.io import read_prompts, read_records, write_records
from rlhfkit.data.pairs import rankings_to_pairs
from rlhfkit.data.records import Completion, PreferencePair, Prompt, Ranking, SamplingParams
from rlhfkit.demo.criteria import KindPositiveOnTopic, NotToxicOnTopic, instructions
from rlhfkit.demo.presets import DemoConfig, load_ppo_policy
from rlhfkit.eval.judges import ProfanityJudge, RelevanceJudge, SentimentJudge
from rlhfkit.models.toy_policy import toy_corpus, toy_prompts
from rlhfkit.reward.base import RewardFn


@dataclass
class DemoTask:
    """What the demo asks for: prompts (labeling/PPO and held out), the topic of every prompt (held-out
    prompts about one topic are one cluster for the intervals), the labelers' criterion and its gold
    judge, the evaluation judges, and the judge the monitor compares the reward with."""

    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    topics: dict[str, str]  # prompt id → topic
    criterion: str
    gold: RewardFn
    judges: dict[str, RewardFn]  # gold first, then relevance, then the rest
    monitor_judge: str


def demo_task(config: DemoConfig) -> DemoTask:
    if config.preset == "toy":
        corpus = toy_corpus()
        topics = corpus["topics"]
        held_out = max(1, -(-config.eval_prompts // 2))
        train = toy_prompts(topics[:-held_out], corpus, seed=0)[: config.label_prompts]
        test = toy_prompts(topics[-held_out:], corpus, seed=1)[: config.eval_prompts]
        gold = NotToxicOnTopic(corpus["rude_words"])
        topic_of = {p.id: p.id.rsplit("-", 1)[0] for p in train + test}
        if len({topic_of[p.id] for p in test}) < 2:  # the intervals resample topics
            raise ValueError(f"eval_prompts: {len(test)} held-out prompts are about one topic; an interval needs "
                             "two (give --eval-prompts 3 or more)")
        judges = {"gold": gold, "relevance": RelevanceJudge(), "not_offensive": ProfanityJudge(),
                  "sentiment": SentimentJudge()}
        return DemoTask(train, test, topic_of, "not toxic, still on topic", gold, judges, "not_offensive")
    prompts = read_prompts(files("rlhfkit") / "resources" / "demo_prompts.txt")
    test, train = prompts[: config.eval_prompts], prompts[config.eval_prompts:][: config.label_prompts]
    gold = KindPositiveOnTopic()
    sentiment, not_offensive = SentimentJudge(), ProfanityJudge()
    sentiment.independent = not_offensive.independent = False  # both are part of this criterion
    judges = {"gold": gold, "relevance": RelevanceJudge(), "sentiment": sentiment, "not_offensive": not_offensive}
    return DemoTask(train, test, {p.id: p.id for p in train + test}, "kind and positive, still on topic", gold,
                    judges, "sentiment")


def completions_to_label(policy, tokenizer, task: DemoTask, config: DemoConfig, seed: int, folder: Path,
                         model_name: str, progress: bool) -> list[Completion]:
    """``n`` sampled completions per prompt, plus ``off_topic`` answers borrowed from prompts about
    other topics: the labelers rank those below on-topic answers, which gives the reward model pairs
    that differ only in topicality (a policy's own samples rarely do)."""
    from rlhfkit.generate import generate_completions

    output = folder / "completions.jsonl"
    if not output.exists():
        sampling = SamplingParams(temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=seed)
        sampled = folder / "sampled.jsonl"
        generate_completions(policy, tokenizer, task.train_prompts, n=config.n, sampling=sampling, batch_size=16,
                             output=sampled, model_name=model_name, progress=progress)
        own = read_records(sampled, Completion)
        rng = random.Random(seed)
        borrowed = []
        for prompt in task.train_prompts:
            others = [c for c in own if task.topics[c.prompt_id] != task.topics[prompt.id]]
            for k, other in enumerate(rng.sample(others, min(config.off_topic, len(others)))):
                borrowed.append(Completion(id=f"{prompt.id}-offtopic-{k}", prompt_id=prompt.id, prompt=prompt.text,
                                           text=other.text, index=config.n + k, sampling=other.sampling,
                                           truncated=other.truncated,
                                           model=f"{model_name} (an answer to {other.prompt_id})"))
        write_records(output, own + borrowed)
    return read_records(output, Completion)


def label_in_app(db: Path, completions: list[Completion], task: DemoTask, config: DemoConfig, seed: int):
    """The labeling stage as people would do it, with simulated labelers: a project in the feedback app
    (a SQLite file in the run folder), each labeler logging in and ranking through the JSON API.
    Returns the rankings (by prompt, then labeler) and the agreement figures. A rerun continues where
    the labelers stopped; the same database can be served to real labelers (`rlhfkit feedback serve
    --db FOLDER/feedback.db`)."""
    from fastapi.testclient import TestClient

    from rlhfkit.feedback import service
    from rlhfkit.feedback.app import create_app
    from rlhfkit.feedback.client import FeedbackClient, SimulatedSession

    app = create_app(str(db))
    password = "demo-labeler-password"
    with app.state.sessions() as session:
        try:
            project = service.get_project(session, "demo")
        except service.FeedbackError:
            for labeler in config.labelers:
                if service.authenticate(session, labeler.id, password) is None:  # (a crash may have made some)
                    service.create_user(session, labeler.id, password=password)
            project = service.create_project(session, "demo", task.criterion, completions,
                                             instructions=instructions(task.criterion),
                                             overlap=len(config.labelers), consensus=config.consensus)
    for i, labeler in enumerate(config.labelers):
        client = FeedbackClient("http://demo", labeler.id, password, http=TestClient(app, base_url="http://demo"))
        SimulatedSession(client, labeler, task.gold, task.criterion).run("demo", seed=seed * 100 + i)
    with app.state.sessions() as session:  # in a fixed order (the app's is the order of labeling)
        rankings = sorted(service.rankings(session, project), key=lambda r: (r.prompt_id, r.labeler_id))
        return rankings, service.project_agreement(session, project)


def preference_pairs(rankings: list[Ranking], completions: list[Completion], poor: list[str], config: DemoConfig,
                     folder: Path) -> list[PreferencePair]:
    """The consensus ranking of the trusted labelers → all N-choose-2 pairs."""
    trusted = [r for r in rankings if r.labeler_id not in poor]
    pairs = rankings_to_pairs(trusted, completions, consensus=config.consensus)
    write_records(folder / "pairs.jsonl", pairs)
    return pairs


def reward_model_stage(pairs: list[PreferencePair], config: DemoConfig, seed: int, folder: Path, progress: bool):
    """A Bradley-Terry reward model on prompt + answer (MiniLM-L6 cross-encoding both)."""
    from rlhfkit.reward.model import STATE_FILE, RewardModel, RewardModelConfig, train_reward_model

    rm_dir = folder / "reward_model"
    if (rm_dir / STATE_FILE).exists():
        return RewardModel.load(rm_dir)
    rm_config = RewardModelConfig(max_length=128, epochs=config.reward_epochs, batch_size=4, lr=config.reward_lr,
                                  eval_fraction=config.reward_eval_fraction, seed=seed, dropout=config.reward_dropout,
                                  precision=config.precision)
    return train_reward_model(pairs, rm_config, output_dir=rm_dir, progress=progress)


def rl_stage(policy, tokenizer, reward_model, reference_model, task: DemoTask, config: DemoConfig, seed: int,
             folder: Path, progress: bool):
    """PPO (or GRPO / RLOO: ``config.algorithm``) against the reward model with a KL term to the reference; the
    monitor watches every step (independent judge, relevance, KL, diversity, template share) and logs the gold
    judge next to the proxy for the over-optimisation plot. Returns (trained policy, tokenizer, history, monitor
    events, stop reason)."""
    from rlhfkit.models.reference import Reference
    from rlhfkit.rl.grpo import GRPOTrainer
    from rlhfkit.rl.monitors import MonitorConfig, RewardHackingMonitor
    from rlhfkit.rl.ppo import PPOTrainer

    rl_dir = folder / config.algorithm
    saved = rl_dir / "policy" / "history.json"
    if saved.exists():
        trained, tokenizer = load_ppo_policy(config, rl_dir / "policy", progress)
        state = json.loads(saved.read_text())
        return trained, tokenizer, state["history"], state["monitor_events"], state["stop_reason"]
    monitor = RewardHackingMonitor(task.judges[task.monitor_judge], MonitorConfig(stop_on=config.monitor_stop_on),
                                   relevance=task.judges["relevance"], logged={"gold": task.gold})
    trainer_class = PPOTrainer if config.algorithm == "ppo" else GRPOTrainer
    trainer = trainer_class(rl_settings(config, seed, rl_dir), policy, tokenizer, reward_model,
                            [p.text for p in task.train_prompts],
                            reference=Reference.frozen(reference_model) if reference_model is not None else None,
                            monitor=monitor)
    checkpoints = sorted(rl_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if checkpoints:
        console.print(f"resuming {config.algorithm.upper()} from {checkpoints[-1]}")
        trainer.load_checkpoint(checkpoints[-1])
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.actor).model
    saved.write_text(json.dumps({"history": trainer.history, "monitor_events": monitor.events,
                                 "stop_reason": trainer.stop_reason}, indent=1))
    return trained, tokenizer, trainer.history, monitor.events, trainer.stop_reason


def rl_settings(config: DemoConfig, seed: int, rl_dir: Path):
    """The seed's PPOConfig (or GRPOConfig); building it checks the algorithm's fields (kl_coef ≥ 0, not NaN, …),
    and a precision of bf16 is refused here on hardware without a bf16 unit, not after the labeling."""
    import torch

    from rlhfkit.precision import resolve_precision
    from rlhfkit.rl.grpo import RLOO_DEFAULTS, GRPOConfig
    from rlhfkit.rl.ppo import PPOConfig

    common = dict(steps=config.ppo_steps, lr=config.ppo_lr, max_new_tokens=config.max_new_tokens,
                  temperature=config.temperature, kl_coef=config.kl_coef, use_chat_template=True, lora=config.lora,
                  precision=config.precision, seed=seed, output_dir=str(rl_dir), save_every=10)
    if config.algorithm == "ppo":
        settings = PPOConfig(batch_size=config.ppo_batch_size, minibatch_size=config.ppo_minibatch_size,
                             ppo_epochs=config.ppo_epochs, **common)
    else:  # RLOO: its leave-one-out baseline and k1 KL in the reward (rl/grpo.py), at the demo's β
        rloo = {k: v for k, v in RLOO_DEFAULTS.items() if k != "kl_coef"} if config.algorithm == "rloo" else {}
        settings = GRPOConfig(batch_size=config.ppo_batch_size // config.group_size, group_size=config.group_size,
                              minibatch_size=config.ppo_minibatch_size, epochs=config.ppo_epochs, **rloo, **common)
    resolve_precision(settings.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return settings


def evaluation_judges(task: DemoTask, config: DemoConfig, reference, tokenizer) -> dict[str, RewardFn]:
    """The task's judges, plus fluency under the reference for the real-model preset."""
    if config.preset == "toy":
        return task.judges
    from rlhfkit.eval.judges import FluencyJudge

    return {**task.judges, "fluency": FluencyJudge(reference, tokenizer)}


def evaluate_stage(model, tokenizer, task: DemoTask, config: DemoConfig, judges: Mapping[str, RewardFn],
                   reference, name: str, output: Path, progress: bool) -> list[Completion]:
    """Samples on the held-out prompts, scored by every judge, with the KL to the reference."""
    from rlhfkit.eval.evaluate import EvalConfig, evaluate_policy

    eval_config = EvalConfig(samples=config.eval_samples, seeds=config.eval_seeds,
                             max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    return evaluate_policy(model, tokenizer, task.eval_prompts, dict(judges), eval_config, reference=reference,
                           model_name=name, output=output, progress=progress)
