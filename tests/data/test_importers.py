import json

import pytest

from rlhfkit.data.importers import export_hh, export_trl, import_pairs, trl_pair
from rlhfkit.data.io import DataError, DataWarning
from rlhfkit.data.records import Message

HH_ROW = {
    "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Flour, water.\n\nHuman: And then?"
              "\n\nAssistant: Knead it, let it rise, bake at 230C.",
    "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Flour, water.\n\nHuman: And then?"
                "\n\nAssistant: Figure it out yourself.",
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hh_shared_prefix_becomes_prompt_and_round_trips(tmp_path):
    [pair] = import_pairs(write_jsonl(tmp_path / "hh.jsonl", [HH_ROW]), "hh")
    assert pair.prompt.endswith("\n\nHuman: And then?\n\nAssistant:")
    assert pair.chosen == " Knead it, let it rise, bake at 230C."
    assert pair.rejected == " Figure it out yourself."
    assert pair.provenance["format"] == "hh-rlhf" and pair.provenance["line"] == 1
    assert export_hh([pair]) == [HH_ROW]


def test_trl_plain_text_round_trips(tmp_path):
    rows = [{"prompt": "Sky colour?", "chosen": " Blue.", "rejected": " Green."}]
    pairs = import_pairs(write_jsonl(tmp_path / "trl.jsonl", rows), "trl")
    assert export_trl(pairs) == rows


def test_trl_conversational_round_trips():
    row = {"prompt": [{"role": "user", "content": "Sky colour?"}],
           "chosen": [{"role": "assistant", "content": "Blue."}],
           "rejected": [{"role": "assistant", "content": "Green."}]}
    pairs = import_pairs([(0, row)], "trl")
    assert pairs[0].prompt == [Message(role="user", content="Sky colour?")]
    assert export_trl(pairs) == [row]


def test_trl_implicit_prompt_is_the_shared_turns():
    user = {"role": "user", "content": "Sky colour?"}
    row = {"chosen": [user, {"role": "assistant", "content": "Blue."}],
           "rejected": [user, {"role": "assistant", "content": "Green."}]}
    pair = trl_pair(row)
    assert pair.prompt == [Message(**user)]
    assert pair.chosen == [Message(role="assistant", content="Blue.")]


def test_trl_from_a_datasets_folder(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}]).save_to_disk(str(tmp_path / "ds"))
    assert import_pairs(tmp_path / "ds", "trl")[0].chosen == "a"


@pytest.mark.parametrize(("fmt", "row", "field", "message"), [
    ("trl", {"prompt": "q", "chosen": "a"}, "rejected", "required field is missing"),
    ("trl", {"chosen": "a", "rejected": "b"}, "prompt", "plain-text rows need one"),
    ("trl", {"prompt": "q", "chosen": [{"role": "robot", "content": "x"}], "rejected": "b"}, "chosen.0.role",
     "Input should be"),
    ("trl", {"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "expected a string or a list"),
    ("hh", {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: ho"}, "chosen", "no '\\\\n\\\\nAssistant:' turn"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, fmt, row, field, message):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}
                                               if fmt == "trl" else HH_ROW, row])
    with pytest.raises(DataError, match=message) as err:
        import_pairs(path, fmt)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 2, field)


def test_a_json_list_names_rows_by_their_line_and_lists_only_present_columns(tmp_path):
    path = tmp_path / "trl.json"
    path.write_text('[\n  {"prompt": "q", "chosen": "a", "rejected": "b"},\n  {"prompt": "q",\n   "chosen": "a"}\n]\n')
    with pytest.raises(DataError) as err:
        import_pairs(path, "trl")
    assert (err.value.line, err.value.field) == (3, "rejected")
    assert "required field is missing (columns with values: ['chosen', 'prompt'])" in str(err.value)
    path.write_text('[{"prompt": "q", "chosen": "a", "rejected": null}]')
    with pytest.raises(DataError, match=r"trl.json:1: field 'rejected': required field is null"):
        import_pairs(path, "trl")


def test_a_json_list_imports_with_line_provenance_and_json_lines_in_a_json_file_too(tmp_path):
    (tmp_path / "list.json").write_text('[{"prompt": "q", "chosen": "a", "rejected": "b"},\n'
                                        ' {"prompt": "r", "chosen": "c", "rejected": "d"}]')
    pairs = import_pairs(tmp_path / "list.json", "trl")
    assert [(p.prompt, p.provenance["line"]) for p in pairs] == [("q", 1), ("r", 2)]
    lines = write_jsonl(tmp_path / "lines.json", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert import_pairs(lines, "trl")[0].chosen == "a"


def test_malformed_json_list_names_the_line_and_column(tmp_path):
    path = tmp_path / "trl.json"
    path.write_text('[\n  {"prompt": "q", "chosen": "a", "rejected": "b"},\n  {"prompt": "q" "chosen": "a"}\n]\n')
    with pytest.raises(DataError, match=r"trl.json:3: malformed JSON \(Expecting ',' delimiter at column 18\)"):
        import_pairs(path, "trl")


def test_a_json_list_nested_too_deeply_is_one_located_error(tmp_path):
    path = tmp_path / "trl.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"trl\.json: JSON nested too deeply"):
        import_pairs(path, "trl")


def test_a_file_that_is_not_parquet_is_one_located_error(tmp_path):
    (tmp_path / "pairs.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"pairs\.parquet: cannot be read as a Parquet file"):
        import_pairs(tmp_path / "pairs.parquet", "trl")


def test_table_rows_are_named_by_index_not_line(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"},
                       {"prompt": "q", "chosen": "a", "rejected": None}]).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(DataError, match=r"p.parquet: row 1: field 'rejected': required field is null") as err:
        import_pairs(tmp_path / "p.parquet", "trl")
    assert err.value.line is None


def test_empty_input_is_refused(tmp_path):
    for name, content in (("empty.jsonl", ""), ("empty.json", "[]")):
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match="no pairs: the input has no rows"):
            import_pairs(tmp_path / name, "trl")


def test_pairs_whose_chosen_equals_rejected_are_left_out_with_a_located_warning(tmp_path):
    path = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                {"prompt": "q", "chosen": "same", "rejected": "same"}])
    with pytest.warns(DataWarning, match=r"trl.jsonl:2: field 'rejected': chosen and rejected are the same"):
        pairs = import_pairs(path, "trl")
    assert [p.chosen for p in pairs] == ["a"]
    write_jsonl(path, [{"prompt": "q", "chosen": "same", "rejected": "same"}])
    with pytest.warns(DataWarning), pytest.raises(DataError, match="no pairs: all 1 rows were left out"):
        import_pairs(path, "trl")


def test_hh_transcripts_that_differ_before_the_last_turn_are_left_out_with_a_located_warning(tmp_path):
    earlier = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bread?\n\nAssistant: Knead it.",
               "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Bread?\n\nAssistant: No."}
    path = write_jsonl(tmp_path / "hh.jsonl", [HH_ROW, earlier])
    with pytest.warns(DataWarning, match=r"hh.jsonl:2: field 'chosen': the transcripts differ before their last "
                                         r"answer \(at character 25\)"):
        pairs = import_pairs(path, "hh")
    assert len(pairs) == 1 and pairs[0].provenance["line"] == 1
