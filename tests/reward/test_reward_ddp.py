from pathlib import Path

import pytest
import torch

from conftest import (
    TOPICS,
    assert_each_rank_took_its_share,
    build_tiny_reward_backbone,
    minilm_tokenizer,
    run_cli_in_two_processes,
    run_ddp_worker,
    synthetic_pairs,
)
from rlhfkit.data.io import write_records
from rlhfkit.reward.model import RewardModel

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
def test_two_process_reward_model_training_matches_one_process_with_the_same_global_batch(tmp_path):
    """2-process DDP with the gloo backend, launched like `accelerate launch` does (torchrun)."""
    ranks = run_ddp_worker(WORKER, tmp_path / "ddp", "ddp")
    [single] = run_ddp_worker(WORKER, tmp_path / "single", "single")
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo" and single["world"] == 1
    assert_each_rank_took_its_share(ranks, single)  # batches of 3, 3, 1 prompts
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
    printed = run_cli_in_two_processes("reward", "train", tmp_path / "pairs.jsonl", "-o", tmp_path / "rm",
                                       "--backbone", tmp_path / "backbone", "--epochs", 1, "--batch-size", 2)
    assert printed.count("reward model →") == 1 and printed.count("epoch 1: train loss") == 1
    assert RewardModel.load(tmp_path / "rm").metrics["eval_pairs"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["backbone", "rm"]
