"""The `rlhfkit` command line: one typer app, a sub-command per pipeline stage."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from rlhfkit.cai.cli import PrecisionOption, cai_app
from rlhfkit.config import read_yaml
from rlhfkit.console import console, friendly_errors
from rlhfkit.feedback.cli import feedback_app
from rlhfkit.personal.cli import personal_app

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(help="RLHF end to end: generate → rank → pairs → reward model → RL → evaluate.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
reward_app = typer.Typer(help="Train, evaluate and apply reward models.", no_args_is_help=True)
app.add_typer(reward_app, name="reward")
app.add_typer(cai_app, name="cai")
app.add_typer(feedback_app, name="feedback")
app.add_typer(personal_app, name="personal")


@app.command()
@friendly_errors
def generate(
    prompts: Annotated[Path, typer.Argument(help="Prompts: JSONL of {id, text} records, or .txt with one per line.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Completions JSONL (appended to; rerun resumes).")],
    model: Annotated[str, typer.Option(help="Hub id or folder of a causal or seq2seq LM.")],
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file inside --model to load (dequantised).")] = None,
    n: Annotated[int, typer.Option("-n", help="Completions per prompt.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate call.")] = 8,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: Annotated[int, typer.Option(help="0 = no top-k truncation.")] = 0,
    greedy: Annotated[bool, typer.Option(help="Greedy decoding instead of sampling.")] = False,
    seed: int = 0,
    chat_template: Annotated[bool | None, typer.Option(
        help="Apply the tokenizer's chat template (default: when it has one and the model is causal).")] = None,
    compiled: Annotated[bool, typer.Option("--compile", help=(
        "Compile the decode step with the weights folded in: about a minute per batch shape, then fewer seconds "
        "per token (SmolLM2-135M in fp32 on 2 CPU cores: 1.5x the default engine's tokens/s); for long runs."
    ))] = False,
) -> None:
    """Sample N completions per prompt → completions JSONL ({id, prompt_id, prompt, text, index, model,
    sampling}). Resumable: prompts already in OUTPUT are skipped."""
    from rlhfkit.data.io import read_prompts
    from rlhfkit.data.records import SamplingParams
    from rlhfkit.generate import generate_completions
    from rlhfkit.models.policy import load_policy

    prompt_records = read_prompts(prompts)
    sampling = SamplingParams(do_sample=not greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                              max_new_tokens=max_new_tokens, seed=seed)
    policy, tokenizer = load_policy(model, gguf_file=gguf_file)
    started = time.perf_counter()
    created = generate_completions(policy, tokenizer, prompt_records, n=n, sampling=sampling, batch_size=batch_size,
                                   output=output, model_name=model, use_chat_template=chat_template,
                                   compiled=compiled)
    console.print(f"{len(created)} new completions for {len(created) // n} prompts in "
                  f"{time.perf_counter() - started:.1f}s → {output} "
                  f"({len(prompt_records) - len(created) // n} prompts were already done)")


@app.command()
@friendly_errors
def pairs(
    rankings: Annotated[Path, typer.Argument(help="Rankings JSONL ({prompt_id, labeler_id, groups, flagged}).")],
    completions: Annotated[Path, typer.Option(help="The completions JSONL the rankings refer to.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Preference pairs JSONL.")],
    consensus: Annotated[str, typer.Option(
        help="Combine several labelers' rankings of a prompt: a method name (borda, ranked_pairs), or 'none' for "
             "every labeler's pairs on their own.")] = "borda",
    flagged: Annotated[str, typer.Option(
        help="Completions flagged as nonsense: drop, keep (pair by rank) or last (below all others).")] = "drop",
) -> None:
    """Rankings → preference pairs: all N-choose-2 pairs per prompt, preferred first; ties give none."""
    from rlhfkit.data.io import DataError, read_records, write_records
    from rlhfkit.data.pairs import load_rankings, rankings_to_pairs
    from rlhfkit.data.records import Completion

    completion_records = read_records(completions, Completion, allow_empty=False)
    ranking_records = load_rankings(rankings, completion_records)
    if not ranking_records:
        raise DataError("no ranking records: the file is empty", rankings)
    result = rankings_to_pairs(ranking_records, completion_records,
                               consensus=None if consensus == "none" else consensus, flagged=flagged)
    if not result:
        raise DataError(f"no pairs: every ranking ties all its completions (with --flagged {flagged})", rankings)
    write_records(output, result)
    console.print(f"{len(result)} pairs from {len(ranking_records)} rankings → {output}")


@app.command("import-pairs")
@friendly_errors
def import_pairs_command(
    source: Annotated[Path, typer.Argument(help="JSONL, JSON, Parquet or a datasets save_to_disk folder.")],
    fmt: Annotated[str, typer.Option("--format", help="trl (prompt/chosen/rejected, text or messages) or hh "
                                                      "(Anthropic HH-RLHF transcripts).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Preference pairs JSONL.")],
) -> None:
    """Preference data from TRL or HH-RLHF format → rlhfkit pairs JSONL."""
    from rlhfkit.data.importers import import_pairs
    from rlhfkit.data.io import write_records

    result = import_pairs(source, fmt)
    write_records(output, result)
    console.print(f"{len(result)} pairs imported from {source} → {output}")


@reward_app.command("train")
@friendly_errors
def reward_train(
    pairs_file: Annotated[Path, typer.Argument(metavar="PAIRS", help="Preference pairs JSONL.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the trained reward model.")],
    config: Annotated[Path | None, typer.Option(help="YAML with RewardModelConfig fields.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Sequence-classification backbone (default: offline "
                                                      "MiniLM-L6).")] = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    lora: Annotated[bool | None, typer.Option(help="Train LoRA adapters (merged on save).")] = None,
    eval_pairs: Annotated[Path | None, typer.Option(help="Held-out pairs JSONL (default: hold out a share "
                                                         "of the prompts).")] = None,
    precision: PrecisionOption = None,
) -> None:
    """Train a Bradley-Terry reward model (loss −log σ(r_chosen − r_rejected)) → a save_pretrained folder
    with its config, normalisation and held-out accuracy."""
    import torch
    from accelerate import Accelerator

    from rlhfkit.data.io import read_records
    from rlhfkit.data.records import PreferencePair
    from rlhfkit.reward.model import RewardModelConfig, train_reward_model

    cfg = RewardModelConfig.from_yaml(config, backbone=backbone, epochs=epochs, batch_size=batch_size, lr=lr,
                                      lora=lora, precision=precision)
    held_out = read_records(eval_pairs, PreferencePair, allow_empty=False) if eval_pairs else None
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rm = train_reward_model(read_records(pairs_file, PreferencePair, allow_empty=False), cfg, output_dir=output,
                            eval_pairs=held_out, accelerator=accelerator)
    if not accelerator.is_main_process:
        return
    if rm.metrics["eval_pairs"]:
        measured = f"held-out accuracy {rm.metrics['eval']['eval_accuracy']:.3f} on {rm.metrics['eval_pairs']} pairs"
    else:
        measured = "no held-out pairs (a single prompt, or eval_fraction: 0), so no held-out accuracy"
    console.print(f"reward model → {output}; {measured}")


@reward_app.command("eval")
@friendly_errors
def reward_eval(
    model: Annotated[Path, typer.Argument(help="Reward model folder.")],
    pairs_file: Annotated[Path, typer.Argument(metavar="PAIRS", help="Preference pairs JSONL.")],
) -> None:
    """Pairwise accuracy P(r_chosen > r_rejected), mean margin and loss of a reward model on pairs."""
    from rlhfkit.data.io import read_records
    from rlhfkit.data.records import PreferencePair
    from rlhfkit.reward.model import RewardModel

    metrics = RewardModel.load(model).evaluate(read_records(pairs_file, PreferencePair, allow_empty=False))
    typer.echo(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


@reward_app.command("score")
@friendly_errors
def reward_score(
    completions: Annotated[Path, typer.Argument(help="Completions JSONL.")],
    reward: Annotated[str, typer.Option(help="A reward model folder, judge:profanity, judge:sentiment, "
                                             "classifier:NAME_OR_PATH:LABEL or python:MODULE:FUNCTION.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Completions JSONL with the score added.")],
    name: Annotated[str | None, typer.Option(help="Key of the score in each record's scores.")] = None,
) -> None:
    """Score completions with any reward → the same records with scores[NAME] set."""
    from rlhfkit.data.io import read_records, write_records
    from rlhfkit.data.records import Completion, render_text
    from rlhfkit.reward.base import score_completions
    from rlhfkit.reward.spec import load_reward

    records = read_records(completions, Completion, allow_empty=False)
    reward_fn = load_reward(reward)
    values = score_completions(reward_fn, [render_text(c.prompt) for c in records], [c.text for c in records]).tolist()
    key = name or getattr(reward_fn, "name", reward)
    write_records(output, [c.model_copy(update={"scores": {**c.scores, key: v}}) for c, v in
                           zip(records, values, strict=True)])
    console.print(f"scored {len(records)} completions, mean {key} = {sum(values) / len(values):.4f} → {output}")


RUN_INPUTS = ("policy", "gguf_file", "prompts", "reward", "pairs", "eval_pairs")
ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML: trainer fields, plus policy, prompts, "
                                                                    "reward (or pairs for DPO).")]
PolicyOption = Annotated[str | None, typer.Option(help="Hub id or folder of the causal/seq2seq policy.")]
StepsOption = Annotated[int | None, typer.Option(help="Maximum number of rollouts.")]
OutputOption = Annotated[str | None, typer.Option(help="Folder for checkpoints, TensorBoard logs and the policy.")]
LoraOption = Annotated[bool | None, typer.Option(help="LoRA adapters; the reference is the base with them off.")]


def _run_inputs(config_file: Path | None, given: dict) -> tuple[dict, dict]:
    """(run inputs: policy, prompts, reward, pairs...; the trainer's config fields) from the YAML and flags.
    A run input in the YAML is a path, hub id or spec: text, else a DataError at its line."""
    from rlhfkit.config import key_lines
    from rlhfkit.data.io import DataError

    data = read_yaml(config_file) if config_file else {}
    inputs = {key: data.pop(key, None) for key in RUN_INPUTS}
    for key, value in inputs.items():
        if value is not None and not isinstance(value, str):
            raise DataError(f"must be text (a path, hub id or reward spec), got {type(value).__name__} {value!r}",
                            config_file, key_lines(config_file).get(key), key)
    inputs |= {k: v for k, v in given.items() if k in RUN_INPUTS and v is not None}
    data |= {k: v for k, v in given.items() if k not in RUN_INPUTS and v is not None}
    return inputs, data


def _need(inputs: dict, *keys: str) -> None:
    for key in keys:
        if not inputs.get(key):
            raise ValueError(f"missing {key}: pass --{key.replace('_', '-')} or set `{key}:` in the --config YAML")


def _on_policy(algorithm: str, config_file: Path | None, resume: Path | None, **given) -> None:
    from rlhfkit.config import config_from_mapping
    from rlhfkit.data.io import read_prompts
    from rlhfkit.models.policy import load_policy
    from rlhfkit.reward.spec import load_reward
    from rlhfkit.rl.grpo import RLOO_DEFAULTS, GRPOConfig, GRPOTrainer
    from rlhfkit.rl.ppo import PPOConfig, PPOTrainer

    inputs, fields = _run_inputs(config_file, given)
    _need(inputs, "policy", "prompts", "reward")
    source = str(config_file or "flags")
    if algorithm == "ppo":
        trainer_cls, config = PPOTrainer, config_from_mapping(PPOConfig, fields, source)
    elif algorithm == "grpo":
        trainer_cls, config = GRPOTrainer, config_from_mapping(GRPOConfig, fields, source)
    else:
        trainer_cls, config = GRPOTrainer, config_from_mapping(GRPOConfig, RLOO_DEFAULTS | fields, source)
    prompts = [p.text for p in read_prompts(inputs["prompts"])]
    policy, tokenizer = load_policy(inputs["policy"], gguf_file=inputs["gguf_file"])
    trainer = trainer_cls(config, policy, tokenizer, load_reward(inputs["reward"]), prompts)
    if resume is not None:
        trainer.load_checkpoint(resume)
        console.print(f"resumed from {resume} at step {trainer.step}")
    trainer.train()
    if trainer.accelerator.is_main_process:
        console.print(f"policy → {Path(config.output_dir) / 'policy'}")


PromptsOption = Annotated[Path | None, typer.Option(help="Prompts JSONL or .txt.")]
RewardOption = Annotated[str | None, typer.Option(help="Reward spec (see `rlhfkit reward score --help`).")]
ResumeOption = Annotated[Path | None, typer.Option(help="Checkpoint folder to continue from.")]


def _register_on_policy(algorithm: str, summary: str) -> None:
    def command(config: ConfigOption = None, policy: PolicyOption = None, prompts: PromptsOption = None,
                reward: RewardOption = None, steps: StepsOption = None, output_dir: OutputOption = None,
                lora: LoraOption = None, precision: PrecisionOption = None, resume: ResumeOption = None) -> None:
        _on_policy(algorithm, config, resume, policy=policy, prompts=prompts, reward=reward, steps=steps,
                   output_dir=output_dir, lora=lora, precision=precision)

    command.__doc__ = summary
    app.command(algorithm)(friendly_errors(command))


_register_on_policy("ppo", "PPO with a value head, GAE, clipped objective and a KL penalty to the reference "
                           "(see rl/ppo.py).")
_register_on_policy("grpo", "GRPO: G completions per prompt, group-normalised advantages, k3 KL in the loss "
                            "(see rl/grpo.py).")
_register_on_policy("rloo", "RLOO: G completions per prompt, leave-one-out baseline, KL folded into the reward "
                            "(see rl/grpo.py).")


@app.command()
@friendly_errors
def dpo(config: ConfigOption = None, policy: PolicyOption = None,
        pairs: Annotated[Path | None, typer.Option(help="Preference pairs JSONL (from `rlhfkit pairs`).")] = None,
        eval_pairs: Annotated[Path | None, typer.Option(help="Held-out pairs (default: hold out prompts).")] = None,
        epochs: int | None = None, output_dir: OutputOption = None, lora: LoraOption = None,
        precision: PrecisionOption = None) -> None:
    """DPO from preference pairs: sigmoid loss with β against the reference (see rl/dpo.py)."""
    from rlhfkit.config import config_from_mapping
    from rlhfkit.data.io import read_records
    from rlhfkit.data.records import PreferencePair
    from rlhfkit.models.policy import load_policy
    from rlhfkit.rl.dpo import DPOConfig, DPOTrainer

    inputs, fields = _run_inputs(config, {"policy": policy, "pairs": pairs, "eval_pairs": eval_pairs,
                                          "epochs": epochs, "output_dir": output_dir, "lora": lora,
                                          "precision": precision})
    _need(inputs, "policy", "pairs")
    cfg = config_from_mapping(DPOConfig, fields, str(config or "flags"))
    train_pairs = read_records(inputs["pairs"], PreferencePair, allow_empty=False)
    held_out = read_records(inputs["eval_pairs"], PreferencePair, allow_empty=False) if inputs["eval_pairs"] else None
    model, tokenizer = load_policy(inputs["policy"], gguf_file=inputs["gguf_file"])
    trainer = DPOTrainer(cfg, model, tokenizer)
    trainer.train(train_pairs, held_out)
    trainer.save_policy()
    console.print(f"policy → {Path(cfg.output_dir) / 'policy'}")


@app.command()
@friendly_errors
def demo(
    preset: Annotated[str, typer.Option(help="toy (a small GPT-2 trained here; minutes), smollm2 "
                                             "(SmolLM2-135M-Instruct with LoRA; slower), personal (simulated "
                                             "users teach their personal models; minutes) or personal-smollm2 "
                                             "(the same on SmolLM2; about half an hour).")] = "toy",
    run_dir: Annotated[Path | None, typer.Option(help="Folder for every stage's files; a rerun resumes (the "
                                                      "personal presets refuse a folder with a run) [default: "
                                                      "runs/demo, runs/demo-smollm2 or runs/demo-personal].")] = None,
    seeds: Annotated[int | None, typer.Option(help="Training seeds: labeling, reward model and PPO run once per "
                                                   "seed [default: 3 for toy, 1 for smollm2].")] = None,
    label_prompts: Annotated[int | None, typer.Option(help="Prompts to label and train on.")] = None,
    eval_prompts: Annotated[int | None, typer.Option(help="Held-out prompts for the evaluation.")] = None,
    algorithm: Annotated[str | None, typer.Option(help="The RL stage: ppo, grpo or rloo [default: ppo for toy, "
                                                       "grpo for smollm2].")] = None,
    ppo_steps: Annotated[int | None, typer.Option(help="RL steps (at most; the monitors may stop earlier).")] = None,
    kl_coef: Annotated[float | None, typer.Option(help="β of the RL stage's KL term to the reference.")] = None,
    stop_on: Annotated[list[str] | None, typer.Option(
        help="Stop the RL stage when the monitor warns of this (hacking, relevance, kl, kl_spike, length, diversity, "
             "collapse); repeatable [default: relevance, kl, kl_spike, collapse].")] = None,
    precision: PrecisionOption = None,
) -> None:
    """The whole RLHF loop offline, once per training seed: generate → simulated labelers → agreement →
    pairs → reward model → PPO (or GRPO, RLOO) with KL and reward-hacking monitors → evaluation (the labelers'
    criterion, relevance, diversity, KL; the proxy apart) → per-seed and pooled results → report.html.

    On your own model, prompts and people, run the same stages one by one: `rlhfkit generate --model M
    --prompts P`, have people rank the completions (the feedback app) or bring rankings, `rlhfkit pairs`,
    `rlhfkit reward train`, `rlhfkit ppo --policy M --reward RM_DIR`, then `rlhfkit evaluate`.
    """
    from rlhfkit.demo import DemoConfig, run_demo

    if preset in ("personal", "personal-smollm2"):
        from rlhfkit.demo.personal import PersonalDemoConfig, run_personal_demo

        if any(v is not None for v in (seeds, label_prompts, algorithm, ppo_steps, kl_coef, stop_on, precision)):
            raise ValueError(f"--preset {preset}: takes --run-dir and --eval-prompts only (no RL stage, no seeds)")
        overrides = {k: v for k, v in {"run_dir": run_dir, "eval_prompts": eval_prompts}.items() if v is not None}
        run_personal_demo(PersonalDemoConfig.smollm2(**overrides) if preset == "personal-smollm2"
                          else PersonalDemoConfig(**overrides))
        return
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds: must be at least 1, got {seeds}")
    run_demo(DemoConfig.preset_defaults(
        preset, run_dir=run_dir, seeds=tuple(range(seeds)) if seeds else None, label_prompts=label_prompts,
        eval_prompts=eval_prompts, algorithm=algorithm, ppo_steps=ppo_steps, kl_coef=kl_coef,
        monitor_stop_on=tuple(stop_on) if stop_on else None, precision=precision))


@app.command()
@friendly_errors
def evaluate(
    policy: Annotated[str, typer.Option(help="The trained policy (folder or hub id; a LoRA adapter folder "
                                             "needs --reference as its base).")],
    reference: Annotated[str, typer.Option(help="The policy before training (the KL reference).")],
    prompts: Annotated[Path, typer.Option(help="Held-out prompts, JSONL or .txt.")],
    judge: Annotated[list[str], typer.Option(help="Judges: relevance, profanity, sentiment, or any reward spec "
                                                  "(repeatable; relevance is always added).")] = [  # noqa: B006
        "relevance", "profanity", "sentiment"],
    samples: Annotated[int, typer.Option(help="Completions per prompt and seed.")] = 4,
    seeds: Annotated[int, typer.Option(help="Number of sampling seeds.")] = 3,
    max_new_tokens: int = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (use the one the policy was trained "
                                                    "at).")] = 1.0,
    chat_template: Annotated[bool, typer.Option(help="Format prompts with the chat template.")] = True,
    output_dir: Annotated[Path, typer.Option(help="Where the scored samples, results and report go; earlier "
                                                  "results there are reused only if made with the same policy, "
                                                  "reference, judges and settings.")] = Path("runs/eval"),
) -> None:
    """Judge a policy before and after training on held-out prompts: relevance to the request and the other
    judges (mean, 95% interval over prompts, per-prompt win rate), distinct-2 and KL to the reference;
    writes results.yaml and report.html."""
    import yaml

    from rlhfkit.data.io import read_prompts
    from rlhfkit.eval.evaluate import EvalConfig, compare, compare_distinct_2, evaluate_policy, text_stats
    from rlhfkit.eval.judges import JUDGES
    from rlhfkit.eval.report import write_report
    from rlhfkit.models.policy import load_policy
    from rlhfkit.models.reference import Reference
    from rlhfkit.reward.spec import load_reward

    if samples < 1 or seeds < 1 or max_new_tokens < 1 or not temperature > 0:
        raise ValueError("--samples, --seeds and --max-new-tokens must be at least 1 and --temperature positive")
    held_out = read_prompts(prompts)
    judges = {name: JUDGES[name]() if name in JUDGES else load_reward(name) for name in dict.fromkeys(
        ["relevance", *judge])}
    judges = {getattr(fn, "name", name): fn for name, fn in judges.items()}
    config = EvalConfig(samples=samples, seeds=tuple(range(seeds)), max_new_tokens=max_new_tokens,
                        temperature=temperature, use_chat_template=chat_template)
    output_dir.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_policy(reference)
    before = evaluate_policy(base, tokenizer, held_out, judges, config, model_name="before",
                             output=output_dir / "before.jsonl")
    if (Path(policy) / "adapter_config.json").exists():
        from peft import PeftModel

        trained = PeftModel.from_pretrained(base, policy)
        ref = Reference(trained)  # the base with the adapter switched off
    else:
        trained, _ = load_policy(policy)
        ref = Reference.frozen(base)
    after = evaluate_policy(trained, tokenizer, held_out, judges, config, reference=ref, model_name="after",
                            output=output_dir / "after.jsonl")
    comparisons = {name: compare(before, after, name, higher_is_better=getattr(fn, "higher_is_better", True))
                   for name, fn in judges.items()}
    comparisons["distinct_2"] = compare_distinct_2(before, [after])
    comparisons["kl"] = compare(before, after, "kl", higher_is_better=False)
    stats = {"before": text_stats(before), "after": text_stats(after)}
    results = {"policy": policy, "reference": reference,
               "judges": {name: comparisons[name].as_dict() for name in judges},
               "distinct_2": comparisons["distinct_2"].as_dict(), "kl": comparisons["kl"].as_dict(), "text": stats}
    (output_dir / "results.yaml").write_text(yaml.safe_dump(results, sort_keys=False))
    write_report(output_dir / "report.html", f"evaluation of {policy}", comparisons, before, after,
                 config={"policy": policy, "reference": reference, "prompts": str(prompts), "samples": samples,
                         "seeds": seeds, "temperature": temperature},
                 independent={name: getattr(fn, "independent", True) for name, fn in judges.items()},
                 text_stats=stats)
    for name, c in comparisons.items():
        console.print(f"{name}: {c.before:.3f} → {c.after:.3f}, {c.difference:+.3f} (95% CI [{c.ci_low:+.3f}, "
                      f"{c.ci_high:+.3f}], {c.prompts} prompts, win rate {c.win_rate:.2f}) — {c.verdict}",
                      highlight=False)
    console.print(f"→ {output_dir / 'report.html'}")


if __name__ == "__main__":
    app()
