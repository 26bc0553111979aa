import json

import pytest

from rlhfkit.data.importers import export_hh, export_trl, import_pairs, trl_pair
from rlhfkit.data.io import DataError
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
    assert pair.provenance["format"] == "hh-rlhf" and pair.provenance["row"] == 1
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
