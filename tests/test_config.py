"""Every trainer config from YAML is type-checked and range-checked; errors are one line: file:line: field."""

import re
from pathlib import Path

import pytest

from conftest import invoke
from rlhfkit.cai.sft import SFTConfig
from rlhfkit.config import config_from_yaml
from rlhfkit.data.io import DataError
from rlhfkit.demo.presets import DemoConfig
from rlhfkit.eval.evaluate import EvalConfig
from rlhfkit.personal.train import PersonalDPOConfig
from rlhfkit.reward.model import RewardModelConfig
from rlhfkit.rl.dpo import DPOConfig
from rlhfkit.rl.grpo import GRPOConfig
from rlhfkit.rl.ppo import PPOConfig


def written(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_numbers_and_booleans_written_as_text_are_read_as_what_they_say(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string, and a quoted 'no' is a non-empty (truthy) string
    config = config_from_yaml(PPOConfig, written(tmp_path, "lr: 1e-3\nwhiten_advantages: 'no'\nsteps: '7'\n"))
    assert config.lr == 0.001 and config.whiten_advantages is False and config.steps == 7


@pytest.mark.parametrize(("cls", "yaml_text", "expected"), [
    (PPOConfig, "steps: 3\nlr: fast\n", r"run.yaml:2: field 'lr': Input should be a valid number.*'fast'"),
    (PPOConfig, "whiten_advantages: maybe\n", r"run.yaml:1: field 'whiten_advantages': Input should be a valid "
                                              r"boolean"),
    (PPOConfig, "kl_estimator: k9\n", r"run.yaml:1: field 'kl_estimator': Input should be 'k1', 'k2' or 'k3'"),
    (PPOConfig, "batch_size: 16\nminibatch_size: 5\n", r"run.yaml:2: field 'minibatch_size': 5 does not divide "
                                                        r"batch_size 16"),
    (PPOConfig, "minibatch_size: 0\n", r"run.yaml:1: field 'minibatch_size': must be between 1 and batch_size"),
    (PPOConfig, "kl_target: 1.0\nkl_horizon: 2\n", r"run.yaml:2: field 'kl_horizon': must exceed 0.2 × batch_size"),
    (PPOConfig, "lr: -1.0\n", r"run.yaml:1: field 'lr': must be positive"),
    (PPOConfig, "steps: 0\n", r"run.yaml:1: field 'steps': must be at least 1"),
    (GRPOConfig, "group_size: 1\n", r"run.yaml:1: field 'group_size': must be at least 2"),
    (GRPOConfig, "batch_size: 4\ngroup_size: 3\nminibatch_size: 5\n", r"run.yaml:3: field 'minibatch_size': 5 "
                                                                      r"does not divide"),
    (DPOConfig, "beta: 0\n", r"run.yaml:1: field 'beta': must be positive"),
    (DPOConfig, "epochs: 1\nlearning_rate: 0.1\n", r"run.yaml:2: unknown DPOConfig fields \['learning_rate'\]; "
                                                   r"known: .*'lr'"),
    (DPOConfig, "epochs: 1\n  beta: [\n", r"run.yaml:2: not valid YAML"),
    (DPOConfig, "beta: " + "[" * 5000 + "]" * 5000 + "\n", r"run.yaml: not valid YAML: nested too deeply"),
    (PPOConfig, "steps: 1\ntemperature: .inf\n", r"run.yaml:2: field 'temperature': must be a finite number"),
    (PPOConfig, "clip_eps: .inf\n", r"run.yaml:1: field 'clip_eps': must be a finite number"),
    (PPOConfig, "reward_threshold: .nan\n", r"run.yaml:1: field 'reward_threshold': must be a finite number"),
    (GRPOConfig, "max_grad_norm: inf\n", r"run.yaml:1: field 'max_grad_norm': must be a finite number"),
    (DPOConfig, "beta: .inf\n", r"run.yaml:1: field 'beta': must be a finite number"),
    (RewardModelConfig, "lr: .inf\n", r"run.yaml:1: field 'lr': must be a finite number"),
    # torch.manual_seed raised "Overflow when unpacking long long" (no field named) at 2**64 (at 2**64 - 1 in the
    # second epoch, when its order was seeded seed + epoch); it reads 32 bits of a seed, so 2**32 + s was s
    (DPOConfig, "epochs: 2\nseed: 18446744073709551616\n", r"run.yaml:2: field 'seed': must be in \[0, 2\*\*32\)"),
    (DPOConfig, "seed: 18446744073709551615\n", r"run.yaml:1: field 'seed': must be in \[0, 2\*\*32\)"),
    (PPOConfig, "seed: -1\n", r"run.yaml:1: field 'seed': must be in \[0, 2\*\*32\), got -1"),
    (GRPOConfig, "seed: 4294967296\n", r"run.yaml:1: field 'seed': must be in \[0, 2\*\*32\)"),
])
def test_a_bad_field_is_refused_with_file_line_field_and_reason(tmp_path, cls, yaml_text, expected):
    with pytest.raises(DataError, match=expected):
        config_from_yaml(cls, written(tmp_path, yaml_text))


def test_rules_hold_for_configs_built_in_python_too():
    with pytest.raises(ValueError, match="field 'minibatch_size'"):
        PPOConfig(batch_size=8, minibatch_size=3)
    with pytest.raises(ValueError, match="field 'temperature': must be a finite number"):
        GRPOConfig(temperature=float("inf"))


@pytest.mark.parametrize(("build", "expected"), [
    (lambda: PPOConfig(lr=None), r"field 'lr': Input should be a valid number \(got None\)"),
    (lambda: GRPOConfig(group_size=2.5), r"field 'group_size': Input should be a valid integer, got a number with "
                                         r"a fractional part"),
    (lambda: DPOConfig(beta="strong"), r"field 'beta': Input should be a valid number"),
    (lambda: RewardModelConfig(batching="prompts"), r"field 'batching': Input should be 'prompt' or 'pairs'"),
])
def test_a_config_built_in_python_with_a_value_of_the_wrong_type_names_the_field(build, expected):
    with pytest.raises(ValueError, match=expected):
        build()


def test_a_config_built_in_python_reads_text_as_yaml_would():
    config = PPOConfig(lr="1e-3", whiten_advantages="no", steps="7", output_dir=Path("runs/x"))
    assert config.lr == 0.001 and config.whiten_advantages is False and config.steps == 7
    assert config.output_dir == "runs/x"


@pytest.mark.parametrize("command", ["ppo", "grpo", "rloo", "dpo"])
@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("policy: p\nprompts: p.txt\npairs: x.jsonl\nreward: judge:sentiment\nlrr: 0.1\n",
     r"run.yaml:5: unknown \w+Config fields \['lrr'\]"),
    ("policy: p\nlr: [1\n", r"run.yaml:3: not valid YAML"),
])
def test_trainer_commands_end_bad_configs_with_one_located_line(tmp_path, command, yaml_text, expected):
    result = invoke(command, "--config", written(tmp_path, yaml_text))
    assert result.exit_code == 1
    assert re.search(expected, result.output) and "Traceback" not in result.output


@pytest.mark.parametrize("build", [
    lambda: RewardModelConfig(seed=2**64),
    lambda: SFTConfig(seed=-1),
    lambda: PersonalDPOConfig(seed=2**32),
    lambda: EvalConfig(seeds=(0, 2**64)),
    lambda: DemoConfig(eval_seeds=(2**64,)),
])
def test_every_seeded_config_refuses_a_seed_torch_cannot_take_before_any_work(build):
    """torch.manual_seed raised "Overflow when unpacking long long" mid-run; a seed is refused by name at once."""
    with pytest.raises(ValueError, match=r"seeds?'?: must be in \[0, 2\*\*32\)"):
        build()
