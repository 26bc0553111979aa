"""The benchmark's DPO trains in TRL's pair order with no option: the trainer's own order is TRL's sampler's."""

import importlib.util
import sys
from pathlib import Path

import pytest

from rlhfkit.data.order import epoch_order

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))  # it reads compare_trl's code digest
spec = importlib.util.spec_from_file_location("rl_workload", Path(__file__).parents[2] / "benchmarks" /
                                              "rl_workload.py")
rl_workload = sys.modules["rl_workload"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rl_workload)


def test_the_trainers_first_epoch_at_seed_1234_starts_with_trls_first_batch():
    assert epoch_order(512, 1234, 0)[:5] == [303, 47, 398, 219, 108]  # TRL 1.16's first batch (data_order_vs_trl.py)


def test_the_removed_pair_order_option_is_one_usage_line_not_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rl_workload.py", "dpo", "--seed", "1235", "--pair-order", "trl"])
    with pytest.raises(SystemExit) as exit_:
        rl_workload.main()
    assert exit_.value.code == 2
    assert "unrecognized arguments: --pair-order trl" in capsys.readouterr().err


def test_a_bench_dir_without_the_workload_is_one_usage_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    """The default --bench-dir is ../shared/bench next to the checkout: from another folder (a git worktree)
    it is not there, and `import bench_common` raised ModuleNotFoundError."""
    monkeypatch.setattr(sys, "argv", ["rl_workload.py", "dpo", "--bench-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        rl_workload.main()
    assert exit_.value.code == 2
    assert "--bench-dir" in capsys.readouterr().err
