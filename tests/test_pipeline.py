"""The main job end to end: the default toy demo must show the independent judge improving with a
confidence interval that excludes zero, with bounded KL, and a rerun must resume instead of redoing."""

import json
import os
import shutil

import pytest
import torch

from rlhfkit.data.io import read_records
from rlhfkit.data.records import Completion, PreferencePair, Ranking
from rlhfkit.pipeline import DemoConfig, NotToxicOnTopic, on_topic, run_demo


def test_labelers_hidden_criterion_prefers_kind_on_topic_replies():
    quality = NotToxicOnTopic(["stupid", "idiot"])
    prompt = "Any tips for baking bread?"
    scores = quality([prompt] * 4, ["For baking bread, be patient.", "Thank you! Have a nice day.",
                                    "For baking cookies, be patient.", "Baking bread? Stupid idiot."])
    assert scores.tolist() == [1.0, 0.0, 0.5, -1.0]
    assert on_topic("What should I do?", "anything") == 1.0  # no content words: nothing to miss


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The default demo, run once (about 2 minutes on 2 CPU cores, toy model training included)."""
    root = tmp_path_factory.mktemp("demo")
    previous = os.environ.get("RLHFKIT_CACHE")
    os.environ["RLHFKIT_CACHE"] = str(root / "cache")
    try:
        config = DemoConfig(run_dir=root / "run")
        yield config, run_demo(config, progress=False)
    finally:
        if previous is None:
            os.environ.pop("RLHFKIT_CACHE")
        else:
            os.environ["RLHFKIT_CACHE"] = previous


@pytest.mark.slow
def test_default_demo_improves_the_independent_judge_with_bounded_kl(demo_run):
    config, summary = demo_run
    print({k: v for k, v in summary.items() if k != "seconds"}, summary["seconds"])
    assert summary["not_offensive_significant"] and summary["not_offensive_ci_low"] > 0.1
    assert summary["sentiment_ci_low"] > 0
    assert 0 < summary["kl_to_reference_after"] < 10
    assert summary["reward_model_held_out_accuracy"] > 0.65
    assert summary["poor_labelers"] == "dave"
    assert summary["ppo_steps"] == config.ppo_steps


@pytest.mark.slow
def test_demo_keeps_every_stage_and_writes_a_self_contained_report(demo_run):
    config, summary = demo_run
    run = config.run_dir
    n_prompts = summary["prompts_labeled"]
    assert len(read_records(run / "completions.jsonl", Completion)) == n_prompts * config.n
    assert len(read_records(run / "rankings.jsonl", Ranking)) == n_prompts * len(config.labelers)
    pairs = read_records(run / "pairs.jsonl", PreferencePair)
    assert len(pairs) == summary["pairs"] and all("dave" not in p.provenance["labelers"] for p in pairs)
    before = read_records(run / "eval" / "before.jsonl", Completion)
    assert len(before) == summary["prompts_held_out"] * config.eval_samples * len(config.eval_seeds)
    assert all(c.scores["kl"] == 0.0 for c in before)  # the initial policy is the reference
    assert json.loads((run / "agreement.json").read_text())["poor_labelers"] == ["dave"]
    assert (run / "feedback.db").exists()  # the labelers ranked through the feedback app
    assert list((run / "ppo" / "tensorboard").glob("events.out.tfevents.*"))
    report = (run / "report.html").read_text()
    for heading in ("independent judges", "Training curves", "Judge scores before vs after", "Labelers",
                    "Samples before and after", "Configuration"):
        assert heading in report
    assert report.count("data:image/png;base64,") == 2 and "http" not in report.replace("https://", "")


@pytest.mark.slow
def test_rerun_resumes_and_an_interrupted_ppo_continues_from_its_checkpoint(demo_run):
    config, summary = demo_run
    run = config.run_dir
    stamps = {f: (run / f).stat().st_mtime_ns for f in ("completions.jsonl", "eval/before.jsonl",
                                                        "reward_model/model.safetensors")}
    again = run_demo(config, progress=False)
    assert {f: (run / f).stat().st_mtime_ns for f in stamps} == stamps
    assert again["not_offensive_difference"] == summary["not_offensive_difference"]
    # a crash after the last checkpoint: the policy folder is gone, the checkpoints remain
    shutil.rmtree(run / "ppo" / "policy")
    (run / "eval" / "after.jsonl").unlink()
    resumed = run_demo(config, progress=False)
    assert resumed["ppo_steps"] == config.ppo_steps
    assert resumed["seconds"]["ppo_s"] < summary["seconds"]["ppo_s"] / 3  # no step was redone


@pytest.mark.slow
def test_smollm2_preset_runs_with_lora_end_to_end(tmp_path):
    """The real-model preset, shortened: SmolLM2-135M-Instruct, LoRA PPO with the shared reference."""
    config = DemoConfig.preset_defaults("smollm2", run_dir=tmp_path / "run", label_prompts=4, eval_prompts=3, n=3,
                                        max_new_tokens=16, reward_epochs=1, ppo_steps=2, ppo_batch_size=4,
                                        ppo_minibatch_size=2, ppo_epochs=1, eval_samples=1, eval_seeds=(0,))
    summary = run_demo(config, progress=False)
    assert summary["policy"] == "SmolLM2-135M-Instruct" and summary["ppo_steps"] == 2
    assert (tmp_path / "run" / "ppo" / "policy" / "adapter_config.json").exists()
    after = read_records(tmp_path / "run" / "eval" / "after.jsonl", Completion)
    assert len(after) == 3 and all(torch.isfinite(torch.tensor(c.scores["kl"])) for c in after)
    assert (tmp_path / "run" / "report.html").exists()
