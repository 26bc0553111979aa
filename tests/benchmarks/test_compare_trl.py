"""The TRL comparison's table: ratios, targets, learning and reliability from recorded runner results."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("compare_trl", Path(__file__).parents[2] / "benchmarks" /
                                              "compare_trl.py")
compare_trl = sys.modules["compare_trl"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
spec.loader.exec_module(compare_trl)

# results as bench_common.finish writes them, trimmed to what the comparison reads (recorded DPO runs)
RECORDED = json.loads((Path(__file__).parent / "compare_trl_runs.json").read_text())


def result(median_step_s, peak_rss_mib, other_cpu_s=0.1, trends=None, gen=None):
    out = {"median_step_s": median_step_s, "peak_rss_mib": peak_rss_mib, "contention": {"other_cpu_s": other_cpu_s},
           "trends": {k: {"first_k_mean": a, "last_k_mean": b} for k, (a, b) in (trends or {}).items()}}
    return out | ({"gen_tokens_per_s_steady": gen} if gen else {})


def row(work, trl_runs, rlhfkit_runs):
    return compare_trl.compare(work, compare_trl.side_summary(trl_runs, work, "trl"),
                               compare_trl.side_summary(rlhfkit_runs, work, "rlhfkit"))


def test_recorded_dpo_runs_give_ratios_over_the_medians_and_largest_rss():
    r = row("dpo", RECORDED["dpo"]["trl"], RECORDED["dpo"]["rlhfkit"])
    trl_median = statistics.median(x["median_step_s"] for x in RECORDED["dpo"]["trl"])
    kit_median = statistics.median(x["median_step_s"] for x in RECORDED["dpo"]["rlhfkit"])
    assert r["step_ratio"] == kit_median / trl_median
    assert r["rss_ratio"] == (max(x["peak_rss_mib"] for x in RECORDED["dpo"]["rlhfkit"])
                              / max(x["peak_rss_mib"] for x in RECORDED["dpo"]["trl"]))
    assert set(r["learning_met"]) == {"margin", "accuracy"}


def test_half_of_trls_step_time_meets_the_target_and_more_does_not():
    assert row("grpo", [result(1.0, 1000)], [result(0.5, 900)])["step_met"]
    slower = row("grpo", [result(1.0, 1000)], [result(0.51, 900)])
    assert not slower["step_met"] and slower["rss_met"]
    assert not row("grpo", [result(1.0, 1000)], [result(0.4, 1001)])["rss_met"]


def test_learning_is_met_when_rlhfkit_ends_as_high_as_trl_over_the_seeds():
    trl = [result(1, 1, trends={"reward": (0.10, 0.15)}), result(1, 1, trends={"reward": (0.10, 0.13)})]  # ends 0.14
    assert row("grpo", trl, [result(1, 1, trends={"reward/score": (0.12, 0.14)})])["learning_met"] == {"reward": True}
    assert row("grpo", trl, [result(1, 1, trends={"reward/score": (0.09, 0.139)})])["learning_met"] == {
        "reward": False}


def test_a_pair_with_another_process_on_the_cpu_is_flagged_unreliable():
    busy = row("ppo", [result(2.0, 1400, other_cpu_s=0.5)], [result(1.0, 1100, other_cpu_s=2.5)])
    assert not busy["reliable"]
    assert "unreliable" in compare_trl.table([busy])
    assert row("ppo", [result(2.0, 1400, other_cpu_s=2.0)], [result(1.0, 1100)])["reliable"]


def test_a_failed_runner_leaves_its_row_incomplete_and_names_the_side():
    failed = row("rloo", [result(1.0, 1000)], [{"failed": "exit 1"}])
    assert not failed["complete"]
    assert "| rloo | rlhfkit runner failed |" in compare_trl.table([failed])


def test_the_table_has_a_target_column_and_marks_what_is_not_met():
    text = compare_trl.table([row("reward", [result(0.2, 700, trends={"accuracy": (0.4, 0.9)})],
                                  [result(0.17, 800, trends={"accuracy": (0.6, 1.0)}, gen=None)])])
    header, _, line = text.splitlines()
    assert "target" in header and "| ≤ 0.5 | **no** |" in line
    assert "0.85" in line and "1.14" in line  # 0.17 / 0.2 and 800 / 700
    assert "accuracy 0.400 → 0.900" in line and "accuracy 0.600 → 1.000" in line


def test_a_result_file_is_never_overwritten(tmp_path):
    first = compare_trl.new_result_path(tmp_path)
    first.write_text("{}")
    second = compare_trl.new_result_path(tmp_path)
    assert second != first and not second.exists()
