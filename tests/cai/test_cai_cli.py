import pytest

from conftest import invoke, save_tiny_policy
from rlhfkit.data.io import read_records, write_records
from rlhfkit.data.records import Completion, PreferencePair, Revision


@pytest.fixture
def setup(tmp_path):
    model = save_tiny_policy(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("how do i fix bike\nplan day\n")
    (tmp_path / "c.yaml").write_text(
        "principles:\n  - {name: kind, critique: is it bad, revision: make it nice, choose: which is kind}\n"
        "templates: {options: [a, i]}\n")
    return tmp_path, model


@pytest.mark.parametrize("command", ["revise", "sft", "label", "rlaif"])
def test_cai_commands_explain_themselves(command):
    result = invoke("cai", command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_revise_then_sft_then_label_from_the_command_line(setup):
    tmp, model = setup
    common = ["--model", model, "--no-chat-template"]
    dry = invoke("cai", "revise", *common, "--prompts", tmp / "prompts.txt", "--constitution", tmp / "c.yaml",
                 "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "CritiqueRequest: is it bad" in dry.output and "<initial response>" in dry.output
    assert not (tmp / "revisions.jsonl").exists()

    result = invoke("cai", "revise", *common, "--prompts", tmp / "prompts.txt", "--constitution", tmp / "c.yaml",
                    "--rounds", 2, "--max-new-tokens", 4, "-o", tmp / "revisions.jsonl")
    assert result.exit_code == 0, result.output
    revisions = read_records(tmp / "revisions.jsonl", Revision)
    assert len(revisions) == 2 and all(len(r.steps) == 2 for r in revisions)

    result = invoke("cai", "sft", *common, "--revisions", tmp / "revisions.jsonl", "--epochs", 1,
                    "--output-dir", tmp / "sft")
    assert result.exit_code == 0, result.output
    assert "loss on the revisions" in result.output and (tmp / "sft" / "config.json").exists()

    write_records(tmp / "completions.jsonl", [
        Completion(id=f"p{i}-{j}", prompt_id=f"p{i}", prompt="help me", text=t, index=j)
        for i in range(2) for j, t in enumerate(["nice reply", "bad reply"])])
    dry = invoke("cai", "label", *common, "--completions", tmp / "completions.jsonl", "--constitution",
                 tmp / "c.yaml", "--dry-run")
    assert dry.exit_code == 0 and "(A) nice reply" in dry.output and "(A) bad reply" in dry.output
    result = invoke("cai", "label", *common, "--completions", tmp / "completions.jsonl", "--constitution",
                    tmp / "c.yaml", "-o", tmp / "ai_pairs.jsonl")
    assert result.exit_code == 0, result.output
    pairs = read_records(tmp / "ai_pairs.jsonl", PreferencePair)
    assert len(pairs) == 2 and all(0.5 <= p.label <= 1 for p in pairs)


def test_rlaif_dry_run_and_a_bad_constitution_are_one_line_each(setup):
    tmp, model = setup
    result = invoke("cai", "rlaif", "--policy", model, "--constitution", tmp / "c.yaml", "--prompts",
                    tmp / "prompts.txt", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "which is kind" in result.output and "<response 2 from the policy>" in result.output
    (tmp / "bad.yaml").write_text("principles:\n  - {name: kind}\n")
    result = invoke("cai", "rlaif", "--policy", model, "--constitution", tmp / "bad.yaml", "--dry-run")
    assert result.exit_code == 1 and "bad.yaml: field 'principles.0.critique'" in result.output
