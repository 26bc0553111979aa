import pytest

from rlhfkit.reward.base import FunctionReward
from rlhfkit.reward.spec import load_reward


def test_python_spec_loads_the_named_function():
    reward = load_reward("python:os.path:exists")
    assert isinstance(reward, FunctionReward) and reward.name == "exists"


@pytest.mark.parametrize(("spec", "message"), [
    ("python:no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz' \(No module named"),
    ("python:os.path:no_such_function", r"module 'os.path' \(.*\) has no function 'no_such_function'"),
    ("python:os.path:sep", "has no function 'sep'"),  # an attribute, not a function
    ("python:sys:nope", r"module 'sys' \(built in\) has no function 'nope'"),
    ("python:os.path", "must be python:MODULE:FUNCTION"),
    ("classifier:some-model:", "must be classifier:NAME_OR_PATH:LABEL"),
])
def test_a_spec_that_cannot_be_resolved_is_a_value_error(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward(spec)


@pytest.mark.parametrize("spec", ["./missing-rm", "runs/missing/rm", "classifier:./missing-clf:0",
                                  "classifier:/missing/clf:nothate"])
def test_a_missing_local_folder_is_reported_as_missing_not_as_a_hub_id(tmp_path, spec):
    with pytest.raises(FileNotFoundError, match=r"no such .*folder"):
        load_reward(spec)
