"""The benchmark's DPO on TRL's pair order: the order TRL's sampler gives for a seed."""

import importlib.util
import sys
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("rl_workload", Path(__file__).parents[2] / "benchmarks" /
                                              "rl_workload.py")
rl_workload = sys.modules["rl_workload"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rl_workload)


def test_trls_pair_order_is_the_permutation_of_a_generator_seeded_with_the_seed():
    pairs = [f"pair {i}" for i in range(512)]
    rl_workload.TRLPairOrder(1234).shuffle(pairs)
    expected = torch.randperm(512, generator=torch.Generator().manual_seed(1234)).tolist()
    assert pairs == [f"pair {i}" for i in expected]
    assert expected[:5] == [303, 47, 398, 219, 108]  # TRL 1.16's first batch at seed 1234 (data_order_vs_trl.py)
