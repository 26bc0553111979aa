"""Files written before answers carried whether they were cut (``truncated``, ``chosen_truncated``,
``rejected_truncated``) still go through `rlhfkit pairs` and `rlhfkit dpo`: their answers read as whole."""

import json

from conftest import invoke, save_tiny_policy
from rlhfkit.data.io import read_records, write_records
from rlhfkit.data.records import Completion, PreferencePair, Ranking


def without(path, *fields) -> None:
    """Rewrite the JSONL file at ``path`` as an older version wrote it: without ``fields``."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(any(f in row for f in fields) for row in rows)  # they were there to remove
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if k not in fields}) + "\n" for row in rows))


def test_old_completions_give_pairs_of_whole_answers_and_old_pairs_train_by_dpo(tmp_path):
    completions = [Completion(id=f"p-{i}", prompt_id="p", prompt="how do i fix bike", text=text, index=i,
                              truncated=True)
                   for i, text in enumerate(["happy kind nice", "stupid dumb idiot"])]
    write_records(tmp_path / "completions.jsonl", completions)
    without(tmp_path / "completions.jsonl", "truncated")
    write_records(tmp_path / "rankings.jsonl", [Ranking(prompt_id="p", labeler_id="l", groups=[["p-0"], ["p-1"]])])
    made = invoke("pairs", tmp_path / "rankings.jsonl", "--completions", tmp_path / "completions.jsonl",
                  "-o", tmp_path / "pairs.jsonl")
    assert made.exit_code == 0, made.output
    [pair] = read_records(tmp_path / "pairs.jsonl", PreferencePair)
    assert (pair.chosen, pair.chosen_truncated, pair.rejected_truncated) == ("happy kind nice", False, False)
    write_records(tmp_path / "pairs.jsonl", [pair.model_copy(update={"prompt_id": f"p{i}", "chosen_truncated": True})
                                             for i in range(4)])
    without(tmp_path / "pairs.jsonl", "chosen_truncated", "rejected_truncated")
    trained = invoke("dpo", "--policy", save_tiny_policy(tmp_path / "policy"), "--pairs", tmp_path / "pairs.jsonl",
                     "--epochs", 1, "--output-dir", tmp_path / "dpo")
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "dpo" / "policy" / "config.json").exists()
