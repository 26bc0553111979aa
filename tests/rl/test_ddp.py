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
