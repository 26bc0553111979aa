"""RLAIF, the whole of Constitutional AI's stage 2, one stage per file in the run folder:

    prompts → ``responses`` completions each from the policy (completions.jsonl)
            → AI feedback under the constitution, soft labels (ai_pairs.jsonl)
            → Bradley-Terry reward model on the soft labels (reward_model/)
            → PPO against it with a KL penalty to the policy it started from (ppo/policy)

A stage whose output exists is skipped (generation and labelling also resume mid-way), so a rerun
continues where the last one stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path

import yaml

from rlhfkit.cai.constitution import load_constitution
from rlhfkit.cai.feedback import FeedbackConfig, ModelOptionScorer, label_pairs
from rlhfkit.console import console
from rlhfkit.data.io import read_prompts, read_records
from rlhfkit.data.records import Completion, PreferencePair, SamplingParams
from rlhfkit.generate import uses_chat_template


@dataclass
class RLAIFConfig:
    policy: str = ""  # the model to align, e.g. the SFT model of stage 1 (folder or hub id)
    gguf_file: str | None = None
    feedback_model: str | None = None  # the model that compares responses (default: the policy)
    prompts: str | None = None  # red-team prompts, JSONL or .txt (default: rlhfkit's own)
    constitution: str | None = None  # YAML (default: rlhfkit's own)
    responses: int = 2  # per prompt; every two of them are compared
    max_new_tokens: int = 64
    temperature: float = 1.0
    chain_of_thought: bool = False
    reward_backbone: str = ""  # default: the offline MiniLM-L6 encoder
    reward_epochs: int = 2
    reward_lr: float = 5e-5
    ppo_steps: int = 20
    ppo_batch_size: int = 8
    ppo_lr: float = 1e-5
    kl_coef: float = 0.05
    lora: bool = False
    seed: int = 0
    output_dir: str = "runs/cai/rlaif"


def default_red_team_prompts() -> Path:
    return Path(str(files("rlhfkit") / "resources" / "red_team_prompts.txt"))


def run_rlaif(config: RLAIFConfig, policy=None, tokenizer=None, feedback=None, reward_model=None,
              progress: bool = True) -> dict:
    """Run (or resume) RLAIF. ``policy``/``tokenizer``, ``feedback`` (model, tokenizer) and
    ``reward_model`` (an untrained RewardModel) override what the config names, e.g. in tests."""
    from rlhfkit.generate import generate_completions
    from rlhfkit.models.policy import load_policy
    from rlhfkit.reward.model import STATE_FILE, RewardModel, RewardModelConfig, train_reward_model
    from rlhfkit.rl.ppo import PPOConfig, PPOTrainer

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rlaif_config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    constitution = load_constitution(config.constitution)
    prompts = read_prompts(config.prompts or default_red_team_prompts())
    if policy is None:
        if not config.policy:
            raise ValueError("missing policy: pass --policy or set `policy:` in the --config YAML")
        policy, tokenizer = load_policy(config.policy, gguf_file=config.gguf_file)

    console.rule(f"[bold]1. {config.responses} responses per prompt from the policy")
    sampling = SamplingParams(temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=config.seed)
    generate_completions(policy, tokenizer, prompts, n=config.responses, sampling=sampling,
                         output=out / "completions.jsonl", model_name=config.policy or "policy", progress=progress)
    completions = read_records(out / "completions.jsonl", Completion)

    console.rule(f"[bold]2. AI feedback under the constitution “{constitution.name}”")
    if feedback is None:
        feedback = (policy, tokenizer) if not config.feedback_model else load_policy(config.feedback_model)
    scorer = ModelOptionScorer(*feedback, constitution.templates.options)
    label_pairs(completions, constitution, scorer, FeedbackConfig(chain_of_thought=config.chain_of_thought,
                                                                           seed=config.seed),
                        model=feedback[0], tokenizer=feedback[1], output=out / "ai_pairs.jsonl",
                        feedback_model=config.feedback_model or config.policy, progress=progress)
    pairs = read_records(out / "ai_pairs.jsonl", PreferencePair)
    bias = [p.provenance["p_a_first"] - p.provenance["p_a_second"] for p in pairs]
    console.print(f"{len(pairs)} soft-labelled pairs; mean label {sum(p.label for p in pairs) / len(pairs):.3f}; "
                  f"mean position bias P(first) − P(second) {sum(bias) / len(bias):+.3f} (cancelled by asking "
                  "in both orders)")

    console.rule("[bold]3. reward model on the soft labels")
    rm_dir = out / "reward_model"
    if (rm_dir / STATE_FILE).exists():
        rm = RewardModel.load(rm_dir)
    else:
        rm = train_reward_model(pairs, RewardModelConfig(backbone=config.reward_backbone, epochs=config.reward_epochs,
                                                         lr=config.reward_lr, seed=config.seed),
                                output_dir=rm_dir, reward_model=reward_model, progress=progress)

    console.rule("[bold]4. PPO against the AI-feedback reward model")
    ppo_dir = out / "ppo"
    history_file = ppo_dir / "history.json"
    if history_file.exists():
        history = json.loads(history_file.read_text())
    else:
        ppo = PPOConfig(steps=config.ppo_steps, batch_size=config.ppo_batch_size,
                        minibatch_size=max(1, config.ppo_batch_size // 2), lr=config.ppo_lr,
                        max_new_tokens=config.max_new_tokens, temperature=config.temperature, kl_coef=config.kl_coef,
                        lora=config.lora, seed=config.seed, output_dir=str(ppo_dir),
                        use_chat_template=uses_chat_template(tokenizer, policy, None))
        trainer = PPOTrainer(ppo, policy, tokenizer, rm, [p.text for p in prompts])
        history = trainer.train()
        history_file.write_text(json.dumps(history, indent=1))
    summary = {
        "prompts": len(prompts), "completions": len(completions), "pairs": len(pairs),
        "mean_label": sum(p.label for p in pairs) / len(pairs),
        "mean_position_bias": sum(bias) / len(bias),
        "reward_model_held_out_accuracy": rm.metrics.get("eval", {}).get("eval_accuracy"),
        "ppo_steps": len(history),
        "ppo_reward_first": history[0]["reward/score"] if history else None,
        "ppo_reward_last": history[-1]["reward/score"] if history else None,
        "policy": str(ppo_dir / "policy"),
    }
    (out / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    console.print(f"RLAIF done: policy → {ppo_dir / 'policy'}; summary → {out / 'summary.yaml'}")
    return summary
