from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_each_rank_took_its_share, run_cli_in_two_processes, run_ddp_worker, save_tiny_policy
from rlhfkit.data.io import write_records
from rlhfkit.data.records import Revision

WORKER = Path(__file__).with_name("ddp_worker.py")
EXAMPLES = [("how do i fix bike", "you are doing great thanks for asking"), ("plan day", "happy to help"),
            ("bake cake", "great question glad you asked"), ("write code", "kind regards"), ("garden", "glad to help")]


@pytest.mark.slow
def test_two_process_sft_matches_one_process_with_the_same_global_batch(tmp_path):
    """2-process DDP with the gloo backend, launched like `accelerate launch` does (torchrun)."""
    ranks = run_ddp_worker(WORKER, tmp_path / "ddp", "ddp")
    [single] = run_ddp_worker(WORKER, tmp_path / "single", "single")
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo" and single["world"] == 1
    assert_each_rank_took_its_share(ranks, single)  # batches of 3, 3, 1 examples
    assert ranks[0]["initial"] != ranks[0]["weights"] == ranks[1]["weights"]
    # losses are the whole batch's (weighted by each rank's response tokens), the same on both ranks, and the
    # one-process run's; so is each step's gradient norm
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["norms"] == ranks[1]["norms"]
    two_metrics, one_metrics = ranks[0]["metrics"], single["metrics"]
    assert [h["train_loss"] for h in two_metrics.pop("history")] == pytest.approx(
        [h["train_loss"] for h in one_metrics.pop("history")], rel=1e-5)
    assert two_metrics == pytest.approx(one_metrics, rel=1e-5)
    assert ranks[0]["norms"] == pytest.approx(single["norms"], rel=1e-4)
    assert [r["saves"] for r in ranks] == [1, 0] and not (tmp_path / "ddp" / "sft" / "checkpoint.pt").exists()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "sft").state_dict()
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "sft").state_dict()
    for name, tensor in two.items():
        torch.testing.assert_close(tensor, one[name], atol=1e-4, rtol=0, msg=name)
    # a NaN on rank 1 only stops both ranks at the same step, without a deadlock, and nothing is saved
    assert all(r["nan_error"].startswith("SFT stopped in epoch 1: ") for r in ranks)
    assert not (tmp_path / "ddp" / "nan" / "config.json").exists()


@pytest.mark.slow
def test_cai_sft_command_runs_unchanged_under_two_processes(tmp_path):
    """`rlhfkit cai sft` under torchrun (what `accelerate launch` runs on CPUs): one model, one report."""
    save_tiny_policy(tmp_path / "model")
    write_records(tmp_path / "revisions.jsonl", [Revision(id=f"r{i}", prompt=prompt, initial="bad", final=final)
                                                 for i, (prompt, final) in enumerate(EXAMPLES)])
    printed = run_cli_in_two_processes("cai", "sft", "--model", tmp_path / "model", "--revisions",
                                       tmp_path / "revisions.jsonl", "--no-chat-template", "--epochs", 1,
                                       "--batch-size", 3, "--output-dir", tmp_path / "sft")
    assert printed.count("SFT loss on the revisions") == printed.count("helpful examples;") == 1
    assert (tmp_path / "sft" / "config.json").exists() and not (tmp_path / "sft" / "checkpoint.pt").exists()
