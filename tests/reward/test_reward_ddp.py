import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TOPICS, build_tiny_reward_backbone, minilm_tokenizer, synthetic_pairs
from rlhfkit.data.io import write_records
from rlhfkit.reward.model import RewardModel

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_worker(out: Path, mode: str) -> list[dict]:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2"] if mode == "ddp" else []
    out.mkdir()
    result = subprocess.run([sys.executable, *launcher, str(WORKER), str(out), mode], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(f.read_text()) for f in sorted(out.glob(f"{mode}-rank*.json"))]


@pytest.mark.slow
def test_two_process_reward_model_training_matches_one_process_with_the_same_global_batch(tmp_path):
    """2-process DDP with the gloo backend, launched like `accelerate launch` does (torchrun)."""
    ranks = run_worker(tmp_path / "ddp", "ddp")
    [single] = run_worker(tmp_path / "single", "single")
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo" and single["world"] == 1
    # batches of 3, 3, 1 prompts per epoch: each rank scores its own prompts, together the whole batch; in the
    # batch of 1, rank 1 scores rank 0's prompt with weight 0 (DDP needs it in the backward pass)
    for step, whole in enumerate(single["seen"]):
        first, second = ranks[0]["seen"][step], ranks[1]["seen"][step]
        if len(whole) > 1:
            assert not set(first) & set(second) and sorted(first + second) == whole
        else:
            assert first == second == whole
    assert ranks[0]["initial"] != ranks[0]["weights"] == ranks[1]["weights"]
    # logged numbers are the whole batch's, the same on both ranks, and the one-process run's
    assert ranks[0]["logged"] == ranks[1]["logged"] and ranks[0]["metrics"] == ranks[1]["metrics"]
    assert [r["mean"] for r in ranks] == [ranks[0]["mean"]] * 2
    for two, one in zip(ranks[0]["logged"], single["logged"], strict=True):
        assert two == pytest.approx(one, rel=1e-4, abs=1e-6)
    assert ranks[0]["norms"] == ranks[1]["norms"] == pytest.approx(single["norms"], rel=1e-4)
    assert [r["saves"] for r in ranks] == [1, 0]  # only rank 0 saves, and only the model is left
    assert [p.name for p in (tmp_path / "ddp").iterdir() if p.is_dir()] == ["rm"]
    two, one = RewardModel.load(tmp_path / "ddp" / "rm"), RewardModel.load(tmp_path / "single" / "rm")
    # the head's bias is left out: its Bradley-Terry gradient is 0 up to rounding, which Adam's normalised
    # step turns into moves of either sign (the normalisation's mean absorbs them)
    one_weights = one.model.state_dict()
    for name, tensor in two.model.state_dict().items():
        if name != "classifier.bias":
            torch.testing.assert_close(tensor, one_weights[name], atol=2e-4, rtol=0, msg=name)
    held_out = synthetic_pairs(TOPICS[20:24], seed=1)
    prompts = [p.prompt for p in held_out] * 2
    completions = [p.chosen for p in held_out] + [p.rejected for p in held_out]
    torch.testing.assert_close(two(prompts, completions), one(prompts, completions), atol=1e-3, rtol=0)
    # a NaN on rank 1 only stops both ranks at the same step, without a deadlock
    assert all(r["nan_error"].startswith("reward-model training stopped at step 2: ") for r in ranks)
    assert not (tmp_path / "ddp" / "nan").exists()


@pytest.mark.slow
def test_reward_train_command_runs_unchanged_under_two_processes(tmp_path):
    """`rlhfkit reward train` under torchrun (what `accelerate launch` runs on CPUs): one model, one report."""
    write_records(tmp_path / "pairs.jsonl", synthetic_pairs(TOPICS[:6]))
    build_tiny_reward_backbone().save_pretrained(tmp_path / "backbone")
    minilm_tokenizer().save_pretrained(tmp_path / "backbone")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rlhfkit.cli"]
    result = subprocess.run([*launcher, "reward", "train", str(tmp_path / "pairs.jsonl"), "-o", str(tmp_path / "rm"),
                             "--backbone", str(tmp_path / "backbone"), "--epochs", "1", "--batch-size", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert printed.count("reward model →") == 1 and printed.count("epoch 1: train loss") == 1
    assert RewardModel.load(tmp_path / "rm").metrics["eval_pairs"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["backbone", "rm"]
