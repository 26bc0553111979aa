"""The orchestrator of `rlhfkit demo`: it reads like the pipeline diagram in the package docstring."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from rlhfkit.console import console
from rlhfkit.data.io import write_records
from rlhfkit.data.records import Completion
from rlhfkit.demo.presets import DemoConfig, load_demo_policy
from rlhfkit.demo.seeds import SeedResult, accuracy_interval, distinct_ratio, honest_criteria, pooled_verdict
from rlhfkit.demo.stages import (
    DemoTask,
    completions_to_label,
    demo_task,
    evaluate_stage,
    evaluation_judges,
    label_in_app,
    preference_pairs,
    reward_model_stage,
    rl_settings,
    rl_stage,
)
from rlhfkit.eval.evaluate import compare, compare_distinct_2, scores_by_prompt, text_stats, weights_digest
from rlhfkit.eval.metrics import Comparison, paired_comparison
from rlhfkit.models.reference import Reference

HEADLINE = ("gold", "relevance", "distinct_2", "kl")
SETTINGS_FILE = "settings.json"


def _rule(title: str) -> None:
    console.rule(f"[bold]{title}")


def train_and_evaluate_seed(config: DemoConfig, task: DemoTask, seed: int, before: list[Completion],
                            reference_model, progress: bool) -> tuple[SeedResult, list[Completion], dict]:
    """One training seed: sample → label in the app → pairs → reward model → PPO (or GRPO) → evaluate after.
    Returns the seed's result, its "after" samples and the labelers' agreement."""
    folder = Path(config.run_dir) / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    policy, tokenizer, model_name = load_demo_policy(config, progress)

    _rule(f"seed {seed} · 1. sample {config.n} completions per prompt (+{config.off_topic} off-topic to contrast)")
    completions = completions_to_label(policy, tokenizer, task, config, seed, folder, model_name, progress)

    _rule(f"seed {seed} · 2. simulated labelers rank by “{task.criterion}” in the feedback app")
    rankings, agreed = label_in_app(folder / "feedback.db", completions, task, config, seed)
    write_records(folder / "rankings.jsonl", rankings)
    (folder / "agreement.json").write_text(json.dumps(agreed.as_dict(), indent=1))
    console.print(f"{len(rankings)} rankings; Krippendorff α {agreed.krippendorff_alpha:.2f}; poor labelers: "
                  f"{', '.join(agreed.poor_labelers) or 'none'}")

    _rule(f"seed {seed} · 3. {config.consensus} consensus of the trusted labelers → pairs → reward model")
    pairs = preference_pairs(rankings, completions, agreed.poor_labelers, config, folder)
    reward_model = reward_model_stage(pairs, config, seed, folder, progress)
    accuracy = reward_model.metrics.get("eval", {}).get("eval_accuracy", float("nan"))
    console.print(f"{len(pairs)} pairs; reward model held-out accuracy {accuracy:.3f} on "
                  f"{reward_model.metrics.get('eval_pairs', 0)} pairs of unseen prompts")

    _rule(f"seed {seed} · 4. {config.algorithm.upper()} against the reward model, KL to the reference, monitors")
    trained, tokenizer, history, events, stop_reason = rl_stage(policy, tokenizer, reward_model, reference_model,
                                                                task, config, seed, folder, progress)

    _rule(f"seed {seed} · 5. evaluate the trained policy on the held-out prompts")
    reference = Reference(trained) if config.lora else Reference.frozen(reference_model)
    after = evaluate_stage(trained, tokenizer, task, config, evaluation_judges(task, config, reference, tokenizer),
                           reference, f"after {config.algorithm.upper()} (seed {seed})", folder / "after.jsonl",
                           progress)
    proxy = _proxy_comparison(reward_model, before, after, task)
    comparisons = _comparisons(before, [after], task)
    result = SeedResult(seed, comparisons, proxy, accuracy, int(reward_model.metrics.get("eval_pairs", 0)),
                        len(pairs), len(history), stop_reason, history, [{**e, "run": f"seed {seed}"} for e in events])
    return result, after, agreed.as_dict()


def _proxy_comparison(reward_model, before: list[Completion], after: list[Completion], task: DemoTask) -> Comparison:
    """The seed's reward model on the before and after samples."""
    def scored(samples: list[Completion]) -> dict[str, list[float]]:
        values = reward_model([c.prompt for c in samples], [c.text for c in samples]).tolist()
        return scores_by_prompt([c.model_copy(update={"scores": {"proxy": v}}) for c, v in
                                 zip(samples, values, strict=True)], "proxy")

    return paired_comparison(scored(before), scored(after), task.topics)


def _comparisons(before: list[Completion], afters: list[list[Completion]], task: DemoTask) -> dict[str, Comparison]:
    """Every judge, distinct-2 and KL, after (pooled over the given seeds' samples) vs before."""
    pooled = [c for after in afters for c in after]
    result = {name: compare(before, pooled, name, task.topics, getattr(judge, "higher_is_better", True))
              for name, judge in task.judges.items()}
    if all("fluency" in c.scores for c in [*before, *pooled]):
        result["fluency"] = compare(before, pooled, "fluency", task.topics)
    result["distinct_2"] = compare_distinct_2(before, afters, task.topics)
    result["kl"] = compare(before, pooled, "kl", task.topics, higher_is_better=False)
    return result


def run_demo(config: DemoConfig | None = None, progress: bool = True) -> dict:
    """Run (or resume) the demo on every training seed; returns its summary, also written to
    ``summary.yaml``, and writes ``report.html``."""
    config = config or DemoConfig()
    run = Path(config.run_dir)
    if run.exists() and not run.is_dir():
        raise ValueError(f"run_dir: {run} is a file; give a folder for the run")
    rl_settings(config, config.seeds[0], run)  # the RL stage's checks now, not after the labeling
    check_run_settings(run, config, None)  # other settings (another --algorithm): one line, before loading models
    task = demo_task(config)
    run.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    _rule(f"prompts, judges and the initial policy (preset {config.preset})")
    reference_model, tokenizer, model_name = load_demo_policy(config, progress)
    check_run_settings(run, config, reference_model)  # before writing anything into an earlier run's folder
    write_records(run / "prompts.jsonl", task.train_prompts)
    write_records(run / "eval_prompts.jsonl", task.eval_prompts)
    console.print(f"{len(task.train_prompts)} prompts to label and train on, {len(task.eval_prompts)} held out; "
                  f"policy {model_name}; training seeds {list(config.seeds)}")

    _rule("evaluate the initial policy on the held-out prompts")
    reference = Reference.frozen(reference_model)
    before = evaluate_stage(reference_model, tokenizer, task, config,
                            evaluation_judges(task, config, reference, tokenizer), None, "before",
                            run / "before.jsonl", progress)

    results, afters, agreements = [], [], {}
    for seed in config.seeds:
        result, after, agreements[seed] = train_and_evaluate_seed(
            config, task, seed, before, None if config.lora else reference_model, progress)
        results.append(result)
        afters.append(after)

    pooled = _comparisons(before, afters, task)
    verdicts = {name: pooled_verdict([r.comparisons[name] for r in results], c) for name, c in pooled.items()}
    criteria = honest_criteria(pooled, verdicts, [r.comparisons for r in results])
    summary = demo_summary(config, task, model_name, results, pooled, verdicts, criteria,
                           round(time.perf_counter() - started, 1))
    (run / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False, allow_unicode=True))
    report = demo_report(run / "report.html", config, task, summary, results, pooled, verdicts, before, afters,
                         agreements[config.seeds[0]])
    print_summary(results, pooled, verdicts, summary, report)
    return summary


# Settings an algorithm does not read: a rerun that changes only these resumes its folder.
UNREAD_SETTINGS = {"ppo": ("group_size",)}


def run_settings(config: DemoConfig, initial_policy) -> dict:
    """What every stage file of a run folder depends on: the settings (but the folder, the training seeds, each
    of which has a folder of its own, and those the algorithm does not read) and the initial policy's weights
    (left out when None)."""
    unread = ("run_dir", "seeds", *UNREAD_SETTINGS.get(config.algorithm, ()))
    settings = json.loads(json.dumps({k: v for k, v in asdict(config).items() if k not in unread}, default=str))
    return settings if initial_policy is None else {**settings, "initial_policy": weights_digest(initial_policy)}


def check_run_settings(run: Path, config: DemoConfig, initial_policy) -> None:
    """A run folder resumes only the run that made it: the first run records :func:`run_settings` in
    ``settings.json``; a rerun with other settings, or on a folder with stage files and no record,
    stops with one line instead of reusing samples, labels, reward models or policies made otherwise. Without
    ``initial_policy`` (None) it compares the other settings only and records nothing: a check before the models
    are loaded."""
    recorded = run / SETTINGS_FILE
    settings = run_settings(config, initial_policy)
    if recorded.exists():
        earlier = json.loads(recorded.read_text())
        for key in ("initial_policy",) * (initial_policy is None) + UNREAD_SETTINGS.get(config.algorithm, ()):
            earlier.pop(key, None)  # a folder recorded before a setting was known to be unread still resumes
        if changed := sorted(k for k in {*earlier, *settings} if earlier.get(k) != settings.get(k)):
            raise ValueError(f"{run}: made with other settings ({', '.join(changed)} differ from {recorded}); "
                             "give another --run-dir, or delete that folder to start again")
        return
    if any(run.glob("seed-*")):
        raise ValueError(f"{run}: holds stage files but no {SETTINGS_FILE} (made by an earlier rlhfkit?); "
                         "give another --run-dir, or delete that folder to start again")
    if initial_policy is not None:
        recorded.write_text(json.dumps(settings, indent=1))


def headline_line(name: str, c: Comparison, verdict: str) -> str:
    """One line of the printed result."""
    if name == "kl":
        return f"KL to reference {c.after:.2f} nats/answer (95% CI [{c.ci_low:.2f}, {c.ci_high:.2f}])"
    ratio = f", after/before {distinct_ratio(c):.3f}" if name == "distinct_2" else ""  # 0.896 is not 0.90
    return (f"{name} {c.before:.3f} → {c.after:.3f}: {c.difference:+.3f} (95% CI [{c.ci_low:+.3f}, "
            f"{c.ci_high:+.3f}]{ratio}; win rate {c.win_rate:.2f}) — {verdict}")


def demo_summary(config: DemoConfig, task: DemoTask, model_name: str, results: list[SeedResult],
                 pooled: dict[str, Comparison], verdicts: dict[str, str], criteria: dict[str, bool],
                 seconds: float) -> dict:
    met = all(criteria.values())
    return {
        "preset": config.preset, "policy": model_name, "criterion": task.criterion,
        "training_seeds": list(config.seeds), "prompts_labeled": len(task.train_prompts),
        "prompts_held_out": len(task.eval_prompts),
        "result": "the labelers' criterion improved honestly" if met else
                  "NOT an honest improvement: " + ", ".join(k for k, ok in criteria.items() if not ok) + " failed",
        "criteria": criteria,
        "pooled": {name: {**c.as_dict(), "verdict": verdicts[name]} for name, c in pooled.items()},
        "per_seed": [r.row() for r in results],
        "proxy_per_seed": [r.proxy.as_dict() for r in results],
        "config": {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                   for k, v in asdict(config).items() if k not in ("labelers", "toy_policy")},
        "seconds": seconds,
    }


def demo_report(path: Path, config: DemoConfig, task: DemoTask, summary: dict, results: list[SeedResult],
                pooled: dict[str, Comparison], verdicts: dict[str, str], before: list[Completion],
                afters: list[list[Completion]], agreement: dict) -> Path:
    from rlhfkit.eval.judges import FluencyJudge
    from rlhfkit.eval.report import write_report

    independent = {name: getattr(judge, "independent", True) for name, judge in task.judges.items()}
    independent["fluency"] = FluencyJudge.independent
    conclusions = [f"Verdict: {summary['result']} (training seeds {list(config.seeds)}; pooled over seeds, "
                   "'improved' only when every seed agrees and the pooled interval excludes zero)."]
    conclusions += [f"{'✓' if ok else '✗'} {name}" for name, ok in summary["criteria"].items()]
    conclusions.append(f"The labelers' criterion “{task.criterion}” is the gold judge; the reward model was trained "
                       "to predict it, so it is not independent — relevance, and the judges marked independent, are.")
    if config.preset == "smollm2":
        conclusions.append("Sentiment and not-offensive are part of this preset's criterion: they measure what the "
                           "reward model was trained on, not a second opinion.")
    rm_rows = [{"seed": r.seed, "held-out pairs": r.reward_model_pairs, "accuracy": r.reward_model_accuracy,
                "95% CI": "[{:.3f}, {:.3f}]".format(*accuracy_interval(r.reward_model_accuracy,
                                                                        r.reward_model_pairs)),
                "training pairs": r.pairs} for r in results]
    return write_report(
        path, f"rlhfkit demo ({config.preset}): {task.criterion}",
        {k: pooled[k] for k in HEADLINE}, before, afters[0], config=summary["config"], verdicts=verdicts,
        independent=independent, conclusions=conclusions,
        others={k: c for k, c in pooled.items() if k not in HEADLINE},
        proxy={f"seed {r.seed}": r.proxy for r in results}, seed_rows=[r.row() for r in results],
        reward_model=rm_rows, text_stats={"before": text_stats(before),
                                          **{f"after (seed {r.seed})": text_stats(a) for r, a in
                                             zip(results, afters, strict=True)}},
        histories={f"seed {r.seed}": r.history for r in results}, agreement=agreement,
        monitor_events=[e for r in results for e in r.monitor_events])


def print_summary(results: list[SeedResult], pooled: dict[str, Comparison], verdicts: dict[str, str], summary: dict,
                  report: Path) -> None:
    _rule("per training seed (after − before on the held-out prompts)")
    console.print(f"{'seed':>4} {'gold':>8} {'relevance':>10} {'distinct-2':>11} {'KL':>6} {'proxy':>8} "
                  f"{'RM acc':>7} {'steps':>5}  stop", highlight=False)
    for r in results:
        c = r.comparisons
        console.print(f"{r.seed:>4} {c['gold'].difference:>+8.3f} {c['relevance'].difference:>+10.3f} "
                      f"{distinct_ratio(c['distinct_2']):>10.3f}× {c['kl'].after:>6.2f} {r.proxy.difference:>+8.3f} "
                      f"{r.reward_model_accuracy:>7.3f} {r.ppo_steps:>5}  {r.stop_reason}", highlight=False)
    _rule("pooled over the training seeds")
    for name in (*HEADLINE, *(k for k in pooled if k not in HEADLINE)):
        console.print(headline_line(name, pooled[name], verdicts[name]), highlight=False)
    console.print(f"[bold]{summary['result']}[/] — done in {summary['seconds']:.0f}s → {report}", highlight=False)
