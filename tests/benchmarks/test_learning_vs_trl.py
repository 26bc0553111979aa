"""The learning comparison's statistics: per-seed last-5 rewards, the Welch interval of the difference, the verdict."""

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest
from scipy import stats

spec = importlib.util.spec_from_file_location("learning_vs_trl", Path(__file__).parents[2] / "benchmarks" /
                                              "learning_vs_trl.py")
learning_vs_trl = sys.modules["learning_vs_trl"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning_vs_trl)

# last-5 mean rewards of GRPO recorded on this workload (benchmarks/README.md, seeds 1234-1236)
TRL = [0.1451, 0.1391, 0.1369]
RLHFKIT = [0.1377, 0.1294, 0.1396]


def test_the_welch_interval_is_the_difference_of_means_plus_minus_t_times_the_unpooled_standard_error():
    interval = learning_vs_trl.welch_interval(RLHFKIT, TRL)
    var_r, var_t, n = statistics.variance(RLHFKIT), statistics.variance(TRL), 3
    se = math.sqrt(var_r / n + var_t / n)
    dof = se ** 4 / ((var_r / n) ** 2 / (n - 1) + (var_t / n) ** 2 / (n - 1))
    half = stats.t.ppf(0.975, dof) * se
    difference = statistics.mean(RLHFKIT) - statistics.mean(TRL)
    assert interval["difference"] == pytest.approx(difference)
    assert interval["low"] == pytest.approx(difference - half) and interval["high"] == pytest.approx(difference + half)
    assert interval["low"] < 0 < interval["high"]  # three seeds each: the recorded gap is not resolved


@pytest.mark.parametrize(("ours", "expected"), [
    ([0.10, 0.101, 0.099], "below TRL"),
    ([0.20, 0.201, 0.199], "above TRL"),
    (RLHFKIT, "no difference found"),
])
def test_the_verdict_reads_which_side_of_zero_the_interval_lies(ours, expected):
    assert learning_vs_trl.verdict(learning_vs_trl.welch_interval(ours, TRL)).startswith(expected)


def _result(series, key):
    return {"trends": {key: {"series": series}}}


def test_each_side_is_summarised_by_its_per_seed_last_five_rewards_under_its_own_key():
    trl = {1234: _result([0.1] * 45 + [0.2] * 5, "reward"), 1235: _result([0.1] * 50, "reward")}
    kit = {1234: _result([0.1] * 45 + [0.3] * 5, "reward/score"), 1235: _result([0.1] * 50, "reward/score")}
    result = learning_vs_trl.summary({"grpo": {"trl": trl, "rlhfkit": kit}})["grpo"]
    assert result["sides"]["trl"]["last5"] == pytest.approx([0.2, 0.1])
    assert result["sides"]["rlhfkit"]["last5"] == pytest.approx([0.3, 0.1])
    assert result["sides"]["rlhfkit"]["first5"] == pytest.approx([0.1, 0.1])
    assert result["against_trl"]["rlhfkit"]["difference"] == pytest.approx(0.05)
    assert "| 1234 | 0.1000 → 0.2000 | 0.1000 → 0.3000 |" in learning_vs_trl.table({"grpo": result})
