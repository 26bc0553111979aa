"""The generation benchmark's interleaved A/B timing: tokens/s per side and ratios to the first side."""

import importlib.util
import sys
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("generation_speed", Path(__file__).parents[2] / "benchmarks" /
                                              "generation_speed.py")
generation_speed = sys.modules["generation_speed"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generation_speed)


def busy(iterations: int):
    """A side that computes for a time proportional to ``iterations`` and returns 8 'tokens'."""
    def run():
        total = 0
        for i in range(iterations):
            total += i * i
        return torch.zeros(2, 4)
    return run


def test_a_side_doing_half_the_work_is_about_twice_as_fast_in_cpu_seconds():
    result = generation_speed.interleaved({"slow": busy(400_000), "fast": busy(200_000)}, rounds=5)
    assert result["tokens_per_call"] == {"slow": 8, "fast": 8}
    assert set(result["ratio"]) == set(result["cpu_ratio"]) == {"fast"}  # ratios are to the first side
    assert 1.5 < result["cpu_ratio"]["fast"] < 2.7
    assert result["tokens_per_s"]["fast"] > result["tokens_per_s"]["slow"]
    assert len(result["seconds_per_call"]["slow"]) == len(result["cpu_seconds_per_call"]["fast"]) == 5
    assert set(result["first_call_s"]) == {"slow", "fast"}
