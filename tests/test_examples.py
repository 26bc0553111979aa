"""The example configs must stay valid as the config classes change."""

import importlib.util
from pathlib import Path

import pytest

from rlhfkit.cli import RUN_INPUTS
from rlhfkit.config import config_from_mapping, read_yaml
from rlhfkit.rl.ppo import PPOConfig

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.mark.parametrize("path", ["course_lab/ppo.yaml", "ppo_smollm2_lora.yaml"])
def test_example_ppo_configs_load(path):
    data = read_yaml(EXAMPLES / path)
    assert {"policy", "prompts", "reward"} <= data.keys()
    config = config_from_mapping(PPOConfig, {k: v for k, v in data.items() if k not in RUN_INPUTS}, path)
    assert config.lora and config.steps > 0


def test_course_lab_prompts_follow_the_lab_filter_and_template():
    spec = importlib.util.spec_from_file_location("prepare", EXAMPLES / "course_lab" / "prepare_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [{"id": "a", "dialogue": "#Person1#: hi " * 30}, {"id": "b", "dialogue": "too short"},
            {"id": "c", "dialogue": "#Person2#: hello " * 20}]
    prompts = module.dialogue_prompts(rows, "test", limit=5)
    assert [p.id for p in prompts] == ["dialogsum-test-a", "dialogsum-test-c"]
    assert prompts[0].text.startswith("Summarize the following conversation.\n\n#Person1#")
    assert prompts[0].text.endswith("\n\nSummary:\n")
