"""The learning comparison's statistics: per-seed last-5 means of each metric, the Welch interval of the
difference, the verdict."""

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))  # it reads compare_trl's metrics
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


def _result(series_by_key):
    return {"trends": {key: {"series": series} for key, series in series_by_key.items()}}


def test_each_side_is_summarised_by_its_per_seed_last_five_rewards_under_its_own_key():
    trl = {1234: _result({"reward": [0.1] * 45 + [0.2] * 5}), 1235: _result({"reward": [0.1] * 50})}
    kit = {1234: _result({"reward/score": [0.1] * 45 + [0.3] * 5}), 1235: _result({"reward/score": [0.1] * 50})}
    result = learning_vs_trl.summary({"grpo": {"trl": trl, "rlhfkit": kit}})["grpo"]
    reward = result["reward"]
    assert reward["sides"]["trl"]["last5"] == pytest.approx([0.2, 0.1])
    assert reward["sides"]["rlhfkit"]["last5"] == pytest.approx([0.3, 0.1])
    assert reward["sides"]["rlhfkit"]["first5"] == pytest.approx([0.1, 0.1])
    assert reward["against_trl"]["rlhfkit"]["difference"] == pytest.approx(0.05)
    assert "| 1234 | 0.1000 → 0.2000 | 0.1000 → 0.3000 |" in learning_vs_trl.table({"grpo": result})


def test_one_seed_a_side_gets_its_difference_and_largest_step_difference_and_says_why_there_is_no_interval():
    trl = {1234: _result({"reward": [0.1] * 45 + [0.2] * 5})}
    kit = {1234: _result({"reward/score": [0.1] * 45 + [0.25] * 5})}
    result = learning_vs_trl.summary({"grpo": {"trl": trl, "rlhfkit": kit}})["grpo"]
    assert "rlhfkit − trl: no interval: fewer than 2 seeds a side (Δ +0.0500); largest difference at one step " \
           "0.0500" in learning_vs_trl.table({"grpo": result})


def test_dpo_is_compared_on_its_margin_and_its_accuracy_each_under_its_sides_key():
    trl = {s: _result({"rewards/margins": [0.0] * 45 + [m] * 5, "rewards/accuracies": [0.5] * 45 + [a] * 5})
           for s, m, a in [(1234, 0.5, 1.0), (1235, 0.4, 0.875)]}
    kit = {s: _result({"margin": [0.0] * 45 + [m] * 5, "accuracy": [0.5] * 45 + [a] * 5})
           for s, m, a in [(1234, 0.3, 0.75), (1235, 0.25, 0.875)]}
    result = learning_vs_trl.summary({"dpo": {"trl": trl, "rlhfkit": kit}})["dpo"]
    assert set(result) == {"margin", "accuracy"}
    assert result["margin"]["sides"]["rlhfkit"]["last5"] == pytest.approx([0.3, 0.25])
    assert result["margin"]["against_trl"]["rlhfkit"]["difference"] == pytest.approx(-0.175)
    assert result["accuracy"]["sides"]["trl"]["mean_last5"] == pytest.approx(0.9375)
    text = learning_vs_trl.table({"dpo": result})
    assert "DPO margin" in text and "DPO accuracy" in text


def test_the_paired_interval_is_the_t_interval_of_the_per_seed_differences_over_the_seeds_both_ran():
    ours, theirs = {1: 0.12, 2: 0.15, 3: 0.11, 9: 5.0}, {1: 0.10, 2: 0.14, 3: 0.12}
    interval = learning_vs_trl.paired_interval(ours, theirs)
    differences = [0.02, 0.01, -0.01]
    half = stats.t.ppf(0.975, 2) * statistics.stdev(differences) / math.sqrt(3)
    assert interval["seeds"] == 3 and interval["difference"] == pytest.approx(statistics.mean(differences))
    assert interval["low"] == pytest.approx(interval["difference"] - half)
    assert interval["high"] == pytest.approx(interval["difference"] + half)


def test_the_largest_step_difference_is_zero_only_where_every_common_seed_trained_the_same():
    trl = {1: [0.1, 0.2, 0.3], 2: [0.1, 0.1, 0.1]}
    assert learning_vs_trl.max_step_difference({1: [0.1, 0.2, 0.3], 3: [9.0] * 3}, trl) == 0.0
    assert learning_vs_trl.max_step_difference({1: [0.1, 0.2, 0.3], 2: [0.1, 0.15, 0.1]}, trl) == pytest.approx(0.05)


def test_a_bench_dir_without_the_workload_is_one_usage_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["learning_vs_trl.py", "--algos", "dpo", "--bench-dir", str(tmp_path),
                                      "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    with pytest.raises(SystemExit) as exit_:
        learning_vs_trl.main()
    assert exit_.value.code == 2
    assert "--bench-dir" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def fake_result(margin: float, code: str | None = None) -> dict:
    series = [margin] * 10
    return {"trends": {"margin": {"series": series}, "accuracy": {"series": series}},
            "code": code or learning_vs_trl.code_digest()}


def run_main(monkeypatch, tmp_path, *args: str) -> int:
    bench = tmp_path / "bench"
    bench.mkdir(exist_ok=True)
    (bench / "workload.py").write_text("SEED = 1234\n")
    monkeypatch.setattr(sys, "argv", ["learning_vs_trl.py", "--algos", "dpo", "--sides", "trl,rlhfkit",
                                      "--bench-dir", str(bench), "--runs", str(tmp_path / "runs"),
                                      "--results", str(tmp_path / "results"), *args])
    monkeypatch.delitem(sys.modules, "workload", raising=False)
    return learning_vs_trl.main()


def kept_run(tmp_path, side: str, text: str) -> None:
    """A result left in the runs folder by an earlier invocation, for DPO at seed 1234."""
    (tmp_path / "runs" / "dpo" / side / "1234").mkdir(parents=True)
    (tmp_path / "runs" / "dpo" / side / "1234" / "result.json").write_text(text)


def recorded_runs(monkeypatch) -> list[Path]:
    """The folders main runs rlhfkit in, each run writing a whole result of margin 0.4 of this code."""
    ran = []

    def run_one(command, folder, log):
        ran.append(folder)
        folder.mkdir(parents=True)
        (folder / "rlhfkit_dpo.json").write_text(json.dumps(fake_result(0.4)))
        return fake_result(0.4)

    monkeypatch.setattr(learning_vs_trl, "run_one", run_one)
    return ran


def test_a_result_cut_short_while_it_was_written_is_run_again_not_read_as_done(monkeypatch, tmp_path):
    """A run killed inside bench_common.finish's json.dump leaves half a JSON file: it was skipped as finished,
    then json.loads raised JSONDecodeError in collect."""
    kept_run(tmp_path, "trl", json.dumps(fake_result(0.5)))
    kept_run(tmp_path, "rlhfkit", '{"name": "rlhfkit_dpo", "trends": {"mar')
    ran = recorded_runs(monkeypatch)
    assert run_main(monkeypatch, tmp_path, "--seeds", "1") == 0
    assert ran == [tmp_path / "runs" / "dpo" / "rlhfkit" / "1234"]
    [written] = (tmp_path / "results").glob("*.json")
    sides = json.loads(written.read_text())["summary"]["dpo"]["margin"]["sides"]
    assert sides["rlhfkit"]["last5"] == [0.4] and sides["trl"]["last5"] == [0.5]


def test_a_failed_run_is_not_read_as_done_by_the_next_invocation(monkeypatch, tmp_path):
    def run_one(command, folder, log):  # exits non-zero after writing its result
        folder.mkdir(parents=True)
        (folder / "rlhfkit_dpo.json").write_text(json.dumps(fake_result(0.4)))
        return {"failed": "exit 1, 1 result files"}

    monkeypatch.setattr(learning_vs_trl, "run_one", run_one)
    assert run_main(monkeypatch, tmp_path, "--seeds", "1") == 1
    code = learning_vs_trl.code_digest()
    assert learning_vs_trl.collect(tmp_path / "runs", ["dpo"], ["trl", "rlhfkit"], code) == {"dpo": {"trl": {},
                                                                                                   "rlhfkit": {}}}


def test_an_rlhfkit_run_of_other_code_is_run_again_and_left_out_of_a_collection(monkeypatch, tmp_path, capsys):
    """Runs were reused by workload, side and seed alone: a runs folder from before a change to rlhfkit was read
    as this code's learning."""
    for side in ("trl", "rlhfkit"):
        kept_run(tmp_path, side, json.dumps(fake_result(0.5, "older")))
    assert run_main(monkeypatch, tmp_path, "--collect-only") == 0  # a table of TRL's run alone
    assert "dpo rlhfkit: left out seeds 1234, run by other code than this checkout's" in capsys.readouterr().out
    ran = recorded_runs(monkeypatch)
    assert run_main(monkeypatch, tmp_path, "--seeds", "1") == 0
    assert ran == [tmp_path / "runs" / "dpo" / "rlhfkit" / "1234"]  # TRL's kept: its code is not ours


def test_the_code_digest_changes_with_rlhfkits_source(monkeypatch, tmp_path):
    compare_trl = sys.modules["compare_trl"]
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "src" / "rlhfkit").mkdir(parents=True)
    (tmp_path / "src" / "rlhfkit" / "trainer.py").write_text("LR = 1e-3\n")
    monkeypatch.setattr(compare_trl, "HERE", tmp_path / "benchmarks")
    before = compare_trl.code_digest()
    (tmp_path / "src" / "rlhfkit" / "trainer.py").write_text("LR = 1e-4\n")
    assert compare_trl.code_digest() != before


@pytest.mark.parametrize("args", [["--seeds", "0"], ["--seeds", "-3"]])
def test_no_seeds_is_a_usage_error(monkeypatch, tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exit_:
        run_main(monkeypatch, tmp_path, *args)
    assert exit_.value.code == 2 and "--seeds: must be at least 1" in capsys.readouterr().err


def test_collecting_an_empty_runs_folder_says_so_and_writes_no_result(monkeypatch, tmp_path, capsys):
    """It printed a table with no rows and no columns, wrote an empty result file, and exited 0."""
    assert run_main(monkeypatch, tmp_path, "--collect-only") == 1
    assert "no finished run of dpo (trl, rlhfkit) under" in capsys.readouterr().err
    assert not list((tmp_path / "results").glob("*.json"))
