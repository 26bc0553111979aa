import json

import pytest
from typer.testing import CliRunner

from conftest import (
    TOPICS,
    build_tiny_causal,
    build_tiny_reward_backbone,
    minilm_tokenizer,
    synthetic_pairs,
    word_tokenizer,
)
from rlhfkit.cli import app
from rlhfkit.data.io import read_records, write_records
from rlhfkit.data.records import Completion, PreferencePair, Ranking

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def policy_dir(tmp_path):
    path = tmp_path / "policy"
    build_tiny_causal().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("command", [[], ["generate"], ["pairs"], ["import-pairs"], ["reward", "train"],
                                     ["reward", "eval"], ["reward", "score"], ["demo"]])
def test_every_command_explains_itself(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_generate_rank_pairs_from_the_command_line(tmp_path, policy_dir):
    (tmp_path / "prompts.txt").write_text("how do i fix bike\n\nhow do i bake cake\n")
    out = tmp_path / "completions.jsonl"
    result = invoke("generate", tmp_path / "prompts.txt", "-o", out, "--model", policy_dir, "-n", 4,
                    "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    completions = read_records(out, Completion)
    assert [c.prompt_id for c in completions[::4]] == ["line-1", "line-3"]
    assert "0 new completions" in invoke("generate", tmp_path / "prompts.txt", "-o", out, "--model", policy_dir,
                                         "-n", 4).output
    rankings = [Ranking(prompt_id=pid, labeler_id="l1", groups=[[f"{pid}-0"], [f"{pid}-1", f"{pid}-2"], [f"{pid}-3"]])
                for pid in ("line-1", "line-3")]
    write_records(tmp_path / "rankings.jsonl", rankings)
    result = invoke("pairs", tmp_path / "rankings.jsonl", "--completions", out, "-o", tmp_path / "pairs.jsonl")
    assert result.exit_code == 0, result.output
    assert len(read_records(tmp_path / "pairs.jsonl", PreferencePair)) == 10  # 5 per prompt: one tie


def test_bad_input_is_one_located_line_not_a_traceback(tmp_path):
    (tmp_path / "rankings.jsonl").write_text('{"prompt_id": "p", "labeler_id": "l", "groups": [["a"]]}\n{oops\n')
    write_records(tmp_path / "completions.jsonl", [Completion(id="a", prompt_id="p", prompt="q", text="t", index=0)])
    result = invoke("pairs", tmp_path / "rankings.jsonl", "--completions", tmp_path / "completions.jsonl",
                    "-o", tmp_path / "pairs.jsonl")
    assert result.exit_code == 1
    assert "rankings.jsonl:2: malformed JSON" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "pairs.jsonl").exists()


def test_import_then_train_eval_and_score_a_reward_model(tmp_path):
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in synthetic_pairs(TOPICS[:12])]
    (tmp_path / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("import-pairs", tmp_path / "trl.jsonl", "--format", "trl", "-o", tmp_path / "pairs.jsonl")
    assert result.exit_code == 0, result.output
    backbone = tmp_path / "backbone"
    build_tiny_reward_backbone().save_pretrained(backbone)
    minilm_tokenizer().save_pretrained(backbone)
    (tmp_path / "rm.yaml").write_text("max_length: 48\nlr: 0.002\neval_fraction: 0.25\n")
    result = invoke("reward", "train", tmp_path / "pairs.jsonl", "-o", tmp_path / "rm",
                    "--config", tmp_path / "rm.yaml", "--backbone", backbone, "--epochs", 4, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.output
    result = invoke("reward", "eval", tmp_path / "rm", tmp_path / "pairs.jsonl")
    assert result.exit_code == 0 and "accuracy=" in result.output
    completions = [Completion(id=f"c{i}", prompt_id="p", prompt="q", text=t, index=i)
                   for i, t in enumerate(["happy to help, lovely idea", "shut up you idiot"])]
    write_records(tmp_path / "c.jsonl", completions)
    for spec, key in ((tmp_path / "rm", "reward_model"), ("judge:profanity", "not_offensive")):
        result = invoke("reward", "score", tmp_path / "c.jsonl", "--reward", spec, "-o", tmp_path / "s.jsonl")
        assert result.exit_code == 0, result.output
        assert all(key in c.scores for c in read_records(tmp_path / "s.jsonl", Completion))


def test_unknown_config_field_is_reported(tmp_path):
    write_records(tmp_path / "pairs.jsonl", synthetic_pairs(TOPICS[:2]))
    (tmp_path / "rm.yaml").write_text("learning_rate: 0.1\n")
    result = invoke("reward", "train", tmp_path / "pairs.jsonl", "-o", tmp_path / "rm",
                    "--config", tmp_path / "rm.yaml")
    assert result.exit_code == 1 and "unknown RewardModelConfig fields ['learning_rate']" in result.output


def test_unknown_reward_spec_is_reported(tmp_path):
    write_records(tmp_path / "c.jsonl", [Completion(id="a", prompt_id="p", prompt="q", text="t", index=0)])
    result = invoke("reward", "score", tmp_path / "c.jsonl", "--reward", "judge:vibes", "-o", tmp_path / "s.jsonl")
    assert result.exit_code == 1 and "unknown judge 'vibes'" in result.output
