"""Every command on broken inputs: a non-zero exit, one `error:` line that names the file, line or field,
no traceback, and no output file left behind that looks complete."""

import json

import pytest

from conftest import invoke, save_tiny_policy

COMPLETION = {"schema": "rlhfkit.completion/1", "prompt": "q", "text": "t", "prompt_id": "p"}
COMPLETIONS = "".join(json.dumps({**COMPLETION, "id": f"c{i}", "index": i, "text": f"answer {i}"}) + "\n"
                      for i in range(2))
PAIR = '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
RANKING = '{"prompt_id": "p", "labeler_id": "l", "groups": [["c0"], ["c1"]]}\n'

# id: (input files, command line, what the error line must say). {d} is the test's folder, {policy} a tiny
# policy folder; every command writes to {d}/out (a file or folder) and must not leave it behind.
CASES = {
    "generate: blank prompt": ({"p.jsonl": '{"id": "a", "text": "hi"}\n{"id": "b", "text": "  "}\n'},
                               "generate {d}/p.jsonl -o {d}/out --model {policy}",
                               "p.jsonl:2: field 'text': the prompt is empty or blank"),
    "generate: empty prompts file": ({"p.txt": "\n \n"}, "generate {d}/p.txt -o {d}/out --model {policy}",
                                     "p.txt: no prompts"),
    "generate: non-UTF-8 prompts": ({"p.txt": b"hello\ncaf\xe9\n"}, "generate {d}/p.txt -o {d}/out --model {policy}",
                                    "p.txt:2: not UTF-8 text (byte 0xe9 at column 4)"),
    "generate: malformed JSON": ({"p.jsonl": '{"id": "a", "text": "hi"}\n{"id": "b" "text": "x"}\n'},
                                 "generate {d}/p.jsonl -o {d}/out --model {policy}",
                                 "p.jsonl:2: malformed JSON (Expecting ',' delimiter at column 12)"),
    "generate: missing prompts file": ({}, "generate {d}/p.jsonl -o {d}/out --model {policy}",
                                       "p.jsonl: file not found"),
    "generate: missing local model": ({"p.txt": "hello\n"}, "generate {d}/p.txt -o {d}/out --model {d}/nope",
                                      "nope: no such model folder"),
    "generate: --temperature 0": ({"p.txt": "hello\n"},
                                  "generate {d}/p.txt -o {d}/out --model {policy} --temperature 0",
                                  "SamplingParams: field 'temperature': Input should be greater than 0"),
    "pairs: empty rankings": ({"r.jsonl": "", "c.jsonl": COMPLETIONS},
                              "pairs {d}/r.jsonl --completions {d}/c.jsonl -o {d}/out",
                              "r.jsonl: no ranking records: the file is empty"),
    "pairs: every ranking a tie": ({"r.jsonl": RANKING.replace('["c0"], ["c1"]', '["c0", "c1"]'),
                                    "c.jsonl": COMPLETIONS},
                                   "pairs {d}/r.jsonl --completions {d}/c.jsonl -o {d}/out",
                                   "r.jsonl: no pairs: every ranking ties all its completions"),
    "pairs: empty completions": ({"r.jsonl": RANKING, "c.jsonl": ""},
                                 "pairs {d}/r.jsonl --completions {d}/c.jsonl -o {d}/out",
                                 "c.jsonl: no completion records"),
    "pairs: unknown prompt": ({"r.jsonl": RANKING.replace('"p"', '"x"'), "c.jsonl": COMPLETIONS},
                              "pairs {d}/r.jsonl --completions {d}/c.jsonl -o {d}/out",
                              "r.jsonl:1: field 'groups': unknown prompt_id 'x'"),
    "pairs: completions given as rankings": ({"r.jsonl": RANKING, "c.jsonl": COMPLETIONS},
                                             "pairs {d}/c.jsonl --completions {d}/c.jsonl -o {d}/out",
                                             "c.jsonl:1: field 'schema': schema 'rlhfkit.completion/1'"),
    "import-pairs: .json list row without a column": (
        {"t.json": '[\n {"prompt": "q", "chosen": "a", "rejected": "b"},\n {"prompt": "q", "chosen": "a"}\n]'},
        "import-pairs {d}/t.json --format trl -o {d}/out",
        "t.json:3: field 'rejected': required field is missing (columns with values: ['chosen', 'prompt'])"),
    "import-pairs: malformed .json": ({"t.json": '[\n {"prompt": "q",\n  "chosen": }\n]'},
                                      "import-pairs {d}/t.json --format trl -o {d}/out",
                                      "t.json:3: malformed JSON (Expecting value at column 13)"),
    "import-pairs: empty input": ({"t.jsonl": ""}, "import-pairs {d}/t.jsonl --format trl -o {d}/out",
                                  "t.jsonl: no pairs: the input has no rows"),
    "import-pairs: not Parquet": ({"t.parquet": "x"}, "import-pairs {d}/t.parquet --format trl -o {d}/out",
                                  "t.parquet: cannot be read as a Parquet file"),
    "import-pairs: non-UTF-8": ({"t.jsonl": b'{"prompt": "\xff"}\n'},
                                "import-pairs {d}/t.jsonl --format trl -o {d}/out",
                                "t.jsonl:1: not UTF-8 text (byte 0xff at column 13)"),
    "import-pairs: unknown format": ({"t.jsonl": PAIR}, "import-pairs {d}/t.jsonl --format tlr -o {d}/out",
                                     "unknown format 'tlr'"),
    "reward train: --epochs 0": ({"p.jsonl": PAIR}, "reward train {d}/p.jsonl -o {d}/out --epochs 0",
                                 "field 'epochs': must be at least 1, got 0"),
    "reward train: empty pairs": ({"p.jsonl": ""}, "reward train {d}/p.jsonl -o {d}/out",
                                  "p.jsonl: no pair records"),
    "reward train: missing local backbone": ({"p.jsonl": PAIR},
                                             "reward train {d}/p.jsonl -o {d}/out --backbone {d}/nope",
                                             "nope: no such backbone folder"),
    "reward train: bad label": ({"p.jsonl": PAIR.replace("}", ', "label": 2}')}, "reward train {d}/p.jsonl -o {d}/out",
                                "p.jsonl:1: field 'label': Input should be less than or equal to 1"),
    "reward train: unknown config field": ({"p.jsonl": PAIR, "rm.yaml": "learning_rate: 0.1\n"},
                                           "reward train {d}/p.jsonl -o {d}/out --config {d}/rm.yaml",
                                           "unknown RewardModelConfig fields ['learning_rate']"),
    "reward eval: not a reward model": ({"p.jsonl": PAIR}, "reward eval {d} {d}/p.jsonl",
                                        "is not an rlhfkit reward model (no rlhfkit_reward.json)"),
    "reward score: missing python module": ({"c.jsonl": COMPLETIONS},
                                            "reward score {d}/c.jsonl --reward python:no_such_mod:f -o {d}/out",
                                            "cannot import module 'no_such_mod'"),
    "reward score: missing python function": ({"c.jsonl": COMPLETIONS},
                                              "reward score {d}/c.jsonl --reward python:os.path:nope -o {d}/out",
                                              "has no function 'nope'"),
    "reward score: missing local classifier": ({"c.jsonl": COMPLETIONS},
                                               "reward score {d}/c.jsonl --reward classifier:{d}/clf:0 -o {d}/out",
                                               "clf: no such classifier folder"),
    "reward score: missing reward-model folder": ({"c.jsonl": COMPLETIONS},
                                                  "reward score {d}/c.jsonl --reward {d}/rm -o {d}/out",
                                                  "rm: no such folder"),
    "reward score: empty completions": ({"c.jsonl": ""}, "reward score {d}/c.jsonl --reward judge:sentiment -o {d}/out",
                                        "c.jsonl: no completion records"),
    "ppo: blank prompt": ({"p.jsonl": '{"id": "a", "text": ""}\n'},
                          "ppo --policy {policy} --prompts {d}/p.jsonl --reward judge:sentiment --output-dir {d}/out",
                          "p.jsonl:1: field 'text': the prompt is empty or blank"),
    "ppo: reward in the config is a list": ({"p.txt": "hi\n", "run.yaml": "policy: x\nreward: [judge:sentiment]\n"},
                                            "ppo --config {d}/run.yaml --prompts {d}/p.txt --output-dir {d}/out",
                                            "run.yaml:2: field 'reward': must be text"),
    "grpo: policy in the config is a number": ({"run.yaml": "policy: 5\nprompts: p.txt\nreward: judge:sentiment\n"},
                                               "grpo --config {d}/run.yaml --output-dir {d}/out",
                                               "run.yaml:1: field 'policy': must be text"),
    "dpo: pairs in the config is a mapping": ({"run.yaml": "policy: x\npairs: {a: 1}\n"},
                                              "dpo --config {d}/run.yaml --output-dir {d}/out",
                                              "run.yaml:2: field 'pairs': must be text"),
    "ppo: missing prompts file": ({}, "ppo --policy {policy} --prompts {d}/p.txt --reward judge:sentiment "
                                      "--output-dir {d}/out", "p.txt: file not found"),
    "dpo: empty pairs": ({"p.jsonl": ""}, "dpo --policy {policy} --pairs {d}/p.jsonl --output-dir {d}/out",
                         "p.jsonl: no pair records"),
    "feedback project: empty completions": ({"c.jsonl": ""},
                                            "feedback project --name x --completions {d}/c.jsonl --criterion k "
                                            "--db {d}/f.db", "c.jsonl: no completion records"),
    "feedback export: no such database": ({}, "feedback export --project nope --db {d}/out/f.db --pairs {d}/p",
                                          "f.db: no such database file"),
    "feedback serve: unreachable PostgreSQL": ({}, "feedback serve --db postgresql://u@127.0.0.1:9/db",
                                               "postgresql://u@127.0.0.1:9/db: cannot use the database"),
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("policy"))


def run(command: str, folder, policy_dir):
    return invoke(*command.format(d=folder, policy=policy_dir).split())


def assert_one_located_error(result, expected: str) -> None:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES)
def test_broken_input_is_one_located_error(tmp_path, policy, case):
    files, command, expected = CASES[case]
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    assert_one_located_error(run(command, tmp_path, policy), expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("setup", "command", "expected"), [
    ("feedback user --name bob --db {d}/f.db", "feedback user --name bob --db {d}/f.db", "f.db: user 'bob' exists"),
    ("feedback project --name x --completions {d}/c.jsonl --criterion k --db {d}/f.db",
     "feedback project --name x --completions {d}/c.jsonl --criterion k --db {d}/f.db", "f.db: project 'x' exists"),
    ("feedback project --name x --completions {d}/c.jsonl --criterion k --db {d}/f.db",
     "feedback export --project x --db {d}/f.db --rankings {d}/out", "f.db: project 'x' has no rankings to export"),
    ("feedback user --name bob --db {d}/f.db", "feedback export --project nope --db {d}/f.db --pairs {d}/out",
     "f.db: no project 'nope'"),
])
def test_a_feedback_request_that_is_refused_is_one_located_error(tmp_path, setup, command, expected):
    (tmp_path / "c.jsonl").write_text(COMPLETIONS)
    assert run(setup, tmp_path, None).exit_code == 0
    assert_one_located_error(run(command, tmp_path, None), expected)
    assert not (tmp_path / "out").exists()


def test_rows_left_out_of_an_import_are_one_warning_line_each(tmp_path):
    (tmp_path / "t.jsonl").write_text(PAIR + '{"prompt": "q", "chosen": "same", "rejected": "same"}\n')
    result = run("import-pairs {d}/t.jsonl --format trl -o {d}/out", tmp_path, None)
    assert result.exit_code == 0, result.output
    warning = result.output.splitlines()[0]
    assert warning.startswith("warning: ")
    assert "t.jsonl:2: field 'rejected': chosen and rejected are the same" in warning
    assert result.output.count("warning:") == 1 and "1 pairs imported" in result.output


def test_pairs_flagged_last_works_on_rankings_without_flags(tmp_path):
    (tmp_path / "r.jsonl").write_text(RANKING)
    (tmp_path / "c.jsonl").write_text(COMPLETIONS)
    result = run("pairs {d}/r.jsonl --completions {d}/c.jsonl -o {d}/out --flagged last", tmp_path, None)
    assert result.exit_code == 0 and "1 pairs from 1 rankings" in result.output, result.output



@pytest.mark.parametrize(("returned", "expected"), [
    ("float('nan')", "reward 'score' gave nan for completion 0 of 2"),
    ("1e39", "reward 'score' gave inf for completion 0 of 2"),  # beyond float32
    ("{}['x']", ".py:2: reward 'score' raised KeyError: 'x' (scoring completion 0 ('answer 0'))"),
])
def test_reward_score_refuses_a_reward_that_breaks_the_contract(tmp_path, monkeypatch, returned, expected):
    module = f"reward_{tmp_path.name}"  # one module per case: imported modules are cached
    (tmp_path / "c.jsonl").write_text(COMPLETIONS)
    (tmp_path / f"{module}.py").write_text(f"def score(prompt, completion):\n    return {returned}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run(f"reward score {{d}}/c.jsonl --reward python:{module}:score -o {{d}}/out", tmp_path, None)
    assert_one_located_error(result, expected)
    assert not (tmp_path / "out").exists()


def test_pairs_written_over_the_rankings_they_come_from_is_refused_and_the_rankings_kept(tmp_path):
    (tmp_path / "r.jsonl").write_text(RANKING)
    (tmp_path / "c.jsonl").write_text(COMPLETIONS)
    result = run("pairs {d}/r.jsonl --completions {d}/c.jsonl -o {d}/r.jsonl", tmp_path, None)
    assert_one_located_error(result, "r.jsonl: holds data without an rlhfkit schema, not rlhfkit.pair/1; it is not "
                                     "overwritten")
    assert (tmp_path / "r.jsonl").read_text() == RANKING
