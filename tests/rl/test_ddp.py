import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_two_process_ddp_on_cpu_sees_different_prompts_and_keeps_weights_and_beta_identical(tmp_path):
    """2-process DDP with the gloo backend, launched like `accelerate launch` does (torchrun)."""
    worker = Path(__file__).with_name("ddp_worker.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    for step in range(3):
        assert not set(ranks[0]["prompts"][step]) & set(ranks[1]["prompts"][step])  # each rank its own slice
    assert ranks[0]["initial"] != ranks[0]["weights"]  # training changed the weights ...
    assert ranks[0]["weights"] == ranks[1]["weights"]  # ... identically on both ranks
    # logged numbers are means over both ranks (the wall time is each rank's own)
    logged = [[{k: v for k, v in h.items() if k != "time/step_s"} for h in r["history"]] for r in ranks]
    assert logged[0] == logged[1]
    assert [h["monitor/answers"] for h in logged[0]] == [8.0, 8.0, 8.0]  # a count: 4 answers on each rank, summed
    # the adaptive β follows the KL of both ranks' rollouts: the same on both, and a resumed run matches
    assert ranks[0]["beta"] == ranks[1]["beta"] != 0.05
    assert [r["resumed_weights"] for r in ranks] == [r["weights"] for r in ranks]
    assert [r["resumed_beta"] for r in ranks] == [r["beta"] for r in ranks]


@pytest.mark.slow
def test_two_processes_of_one_prompt_each_log_the_spread_of_both_prompts(tmp_path):
    """Each process measures its own prompts: one prompt a process has std 0 by convention, and the mean of the
    processes' stds read as 2 prompts with a spread of 0 (z of any relevance change ~ 10⁵). The logged std is the
    one of every process's prompts."""
    worker = Path(__file__).with_name("ddp_monitor_worker.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    differed = False
    for step, row in enumerate(ranks[0]["history"]):
        [first], [second] = ranks[0]["prompts"][step], ranks[1]["prompts"][step]
        values = [{"bike": 0.9, "code": 0.7, "day": 0.3, "cake": 0.1}[p.split()[-1]] for p in (first, second)]
        differed |= values[0] != values[1]
        assert row["monitor/prompts"] == 2.0 and row["monitor/answers"] == 4.0
        assert row["monitor/relevance_prompt_std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5, abs=1e-5)
        assert row["monitor/relevance_std"] == pytest.approx(abs(values[0] - values[1]) / 3**0.5, abs=1e-5)
        assert not any(key.endswith((".sum", ".sumsq")) for key in row)
    assert differed  # a step whose two prompts differ, where the mean of the processes' stds read 0


@pytest.mark.slow
def test_two_process_dpo_runs_the_same_steps_on_disjoint_pairs(tmp_path):
    """7 pairs over 2 processes of 2 pairs a step, 2 epochs: each process its own 3 (the seventh is left out),
    both the same number of steps (DDP would hang on a step one process skips), each epoch all of its pairs."""
    worker = Path(__file__).with_name("ddp_dpo_worker.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"dpo_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # batches: the reference's pass (2), the eval before (1), 2 epochs × 2 steps, the eval after (1)
    trained = [r["batches"][3:-1] for r in ranks]
    assert [len(t) for t in trained] == [4, 4]
    assert [[h["step"] for h in r["history"] if "loss" in h] for r in ranks] == [[1, 2, 3, 4]] * 2
    # each step's loss, margin and accuracy are over both processes' pairs: the same numbers on both
    assert ranks[0]["history"] == ranks[1]["history"]
    assert "dpo: the last 1 of 7 pairs are not trained on: each of the 2 processes takes 3" in result.stderr
    mine = [{w for batch in t for w in batch} for t in trained]
    assert not mine[0] & mine[1] and len(mine[0]) == len(mine[1]) == 3
    for t, own in zip(trained, mine, strict=True):
        assert sorted(w for batch in t[:2] for w in batch) == sorted(own) == sorted(w for batch in t[2:] for w in batch)
