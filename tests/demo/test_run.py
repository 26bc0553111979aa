"""A run folder resumes only the run that made it (demo/run.py)."""

import pytest
import torch

from conftest import invoke
from rlhfkit.demo import DemoConfig
from rlhfkit.demo.run import check_run_settings


def test_a_rerun_with_other_settings_stops_instead_of_reusing_stale_stage_files(tmp_path):
    policy = torch.nn.Linear(2, 2)
    check_run_settings(tmp_path, DemoConfig(run_dir=tmp_path), policy)
    (tmp_path / "seed-0").mkdir()
    check_run_settings(tmp_path, DemoConfig(run_dir=tmp_path, seeds=(0, 1)), policy)  # more seeds: resumes
    with pytest.raises(ValueError, match=r"other settings \(kl_coef, ppo_steps differ"):
        check_run_settings(tmp_path, DemoConfig(run_dir=tmp_path, kl_coef=0.5, ppo_steps=3), policy)
    with torch.no_grad():
        policy.weight.add_(1.0)
    with pytest.raises(ValueError, match=r"other settings \(initial_policy differ"):
        check_run_settings(tmp_path, DemoConfig(run_dir=tmp_path), policy)


def test_stage_files_without_a_settings_record_are_not_resumed(tmp_path):
    (tmp_path / "seed-0").mkdir()
    with pytest.raises(ValueError, match=r"no settings\.json"):
        check_run_settings(tmp_path, DemoConfig(run_dir=tmp_path), torch.nn.Linear(2, 2))


@pytest.mark.parametrize(("flags", "expected"), [
    (["--kl-coef", "nan"], "field 'kl_coef': must be a finite number, got nan"),
    (["--kl-coef", "-1"], "field 'kl_coef': must be at least 0 (β weighs a penalty)"),
    (["--eval-prompts", "2"], "eval_prompts: 2 held-out prompts are about one topic; an interval needs two "
                                "(give --eval-prompts 3 or more)"),
    (["--seeds", "0"], "--seeds: must be at least 1, got 0"),
    (["--ppo-steps", "0"], "ppo_steps: must be at least 1, got 0"),
])
def test_a_demo_that_cannot_finish_stops_at_once_with_one_line(tmp_path, flags, expected):
    """Before any model is loaded or file written, not after minutes of labeling and training."""
    result = invoke("demo", "--run-dir", tmp_path / "run", *flags)
    assert result.exit_code == 1 and result.output.strip().splitlines() == [f"error: {expected}"]
    assert not (tmp_path / "run").exists()


def test_a_run_folder_that_is_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "run").write_text("notes")
    result = invoke("demo", "--run-dir", tmp_path / "run")
    assert result.exit_code == 1
    expected = f"error: run_dir: {tmp_path / 'run'} is a file; give a folder for the run"
    assert result.output.strip().splitlines() == [expected]
    assert (tmp_path / "run").read_text() == "notes"


def test_a_folder_rerun_with_another_algorithm_is_refused_in_one_line_before_any_model_loads(tmp_path):
    """`rlhfkit demo --algorithm ppo` on a GRPO run's folder printed the stage header and the models' loading bars,
    then the error: settings but the initial policy are compared before anything loads."""
    check_run_settings(tmp_path, DemoConfig(run_dir=tmp_path, algorithm="grpo"), torch.nn.Linear(2, 2))
    (tmp_path / "seed-0").mkdir()
    recorded = (tmp_path / "settings.json").read_text()
    result = invoke("demo", "--run-dir", tmp_path, "--algorithm", "ppo")
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"error: {tmp_path}: made with other settings (algorithm differ from {tmp_path / 'settings.json'}); give "
        "another --run-dir, or delete that folder to start again"]
    assert (tmp_path / "settings.json").read_text() == recorded and sorted(tmp_path.iterdir()) == [
        tmp_path / "seed-0", tmp_path / "settings.json"]
    check_run_settings(tmp_path, DemoConfig(run_dir=tmp_path, algorithm="grpo"), None)  # the same: no error


def test_a_ppo_folder_resumes_when_only_a_setting_ppo_does_not_read_changed(tmp_path):
    """group_size is GRPO's and RLOO's: a PPO run's folder resumes after it changes (it was refused), also when
    the folder's record holds it (written before it was left out); a GRPO folder still refuses it."""
    policy = torch.nn.Linear(2, 2)
    check_run_settings(tmp_path, DemoConfig(run_dir=tmp_path), policy)
    check_run_settings(tmp_path, DemoConfig(run_dir=tmp_path, group_size=8), policy)
    recorded = tmp_path / "settings.json"
    recorded.write_text(recorded.read_text().replace("{", '{"group_size": 4,', 1))
    check_run_settings(tmp_path, DemoConfig(run_dir=tmp_path, group_size=8), policy)
    grpo = tmp_path / "grpo"
    grpo.mkdir()
    check_run_settings(grpo, DemoConfig(run_dir=grpo, algorithm="grpo"), policy)
    with pytest.raises(ValueError, match=r"other settings \(group_size differ"):
        check_run_settings(grpo, DemoConfig(run_dir=grpo, algorithm="grpo", group_size=2), policy)
