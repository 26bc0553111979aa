import json
import os
import stat
import time
from pathlib import Path

import pytest

from conftest import make_completions
from rlhfkit.data.io import (
    DataError,
    append_records,
    drop_partial_last_line,
    from_dataset,
    read_prompts,
    read_records,
    to_dataset,
    write_records,
)
from rlhfkit.data.records import Completion, Message, PreferencePair, Prompt, Ranking


def test_records_round_trip_through_jsonl_with_schema(tmp_path):
    path = tmp_path / "completions.jsonl"
    records = make_completions()
    assert write_records(path, records) == 4
    first = json.loads(path.read_text().splitlines()[0])
    assert first["schema"] == "rlhfkit.completion/1"
    assert read_records(path, Completion) == records


def test_conversational_records_round_trip(tmp_path):
    pair = PreferencePair(prompt=[Message(role="user", content="hi")],
                          chosen=[Message(role="assistant", content="hello")],
                          rejected=[Message(role="assistant", content="go away")])
    write_records(tmp_path / "p.jsonl", [pair])
    assert read_records(tmp_path / "p.jsonl", PreferencePair) == [pair]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n\n{"id": "b", "text": \n')
    with pytest.raises(DataError) as err:
        read_records(path, Prompt)
    assert err.value.line == 3 and str(path) in str(err.value) and "malformed JSON" in str(err.value)


def test_missing_field_names_line_and_field(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b"}\n')
    with pytest.raises(DataError) as err:
        read_records(path, Prompt)
    assert (err.value.line, err.value.field) == (2, "text")
    assert "required field is missing" in str(err.value)


def test_nested_bad_field_is_named(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt_id": "p", "prompt": "q", "text": "t", "index": 0,
                                "sampling": {"temperature": -1}}) + "\n")
    with pytest.raises(DataError) as err:
        read_records(path, Completion)
    assert err.value.field == "sampling.temperature"


def test_duplicate_ids_are_refused_with_both_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n')
    with pytest.raises(DataError, match=r":3: field 'id': duplicate id 'a' \(first seen on line 1\)"):
        read_records(path, Prompt)


def test_file_of_another_stage_is_refused(tmp_path):
    path = tmp_path / "completions.jsonl"
    write_records(path, make_completions())
    with pytest.raises(DataError, match="this is a completion file, expected prompt records"):
        read_records(path, Prompt)


def test_failed_write_leaves_existing_file_intact(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_records(path, [Prompt(id="a", text="x")])
    before = path.read_bytes()

    def broken():
        yield Prompt(id="b", text="y")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_records(path, broken())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["prompts.jsonl"]  # no temp file left behind


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "prompts.jsonl"
    append_records(path, [Prompt(id="a", text="x")])
    with path.open("a") as f:
        f.write('{"schema": "rlhfkit.prompt/1", "id": "b", "te')
    assert drop_partial_last_line(path)
    assert [p.id for p in read_records(path, Prompt)] == ["a"]
    assert not drop_partial_last_line(path)


def test_datasets_round_trip():
    pairs = [PreferencePair(prompt="q", chosen="good", rejected="bad", prompt_id="p1", provenance={"labeler": "x"})]
    dataset = to_dataset(pairs)
    assert {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
    assert from_dataset(dataset, PreferencePair) == pairs


def test_completions_with_and_without_scores_round_trip_through_datasets():
    completions = make_completions()
    scored = [c.model_copy(update={"scores": {"rm": 0.5}}) if c.index == 1 else c for c in completions]
    for records in (completions, scored):
        assert from_dataset(to_dataset(records), Completion) == records


def test_dataset_errors_name_row_and_field():
    with pytest.raises(DataError) as err:
        from_dataset([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}],
                     PreferencePair)
    assert (err.value.row, err.value.line, err.value.field) == (1, None, "rejected")
    assert str(err.value).startswith("<dataset>: row 1: field 'rejected'")


@pytest.mark.parametrize(("groups", "flagged", "message"), [
    ([["a"], ["a", "b"]], [], "appears more than once"),
    ([["a"], []], [], "group 1 is empty"),
    ([["a"], ["b"]], ["c"], "flagged ids"),
])
def test_invalid_rankings_are_refused(groups, flagged, message):
    with pytest.raises(ValueError, match=message):
        Ranking(prompt_id="p", labeler_id="l", groups=groups, flagged=flagged)


def test_ranking_must_partition_the_completions():
    ranking = Ranking(prompt_id="p", labeler_id="l", groups=[["a"], ["b"], ["x"]])
    with pytest.raises(ValueError, match=r"missing \['c'\]; unknown \['x'\]"):
        ranking.check_partition({"a", "b", "c"})


@pytest.mark.parametrize("text", ['""', '"  \\n "', '[{"role": "user", "content": " "}]', "[]"])
def test_empty_or_blank_prompts_are_refused_with_line_and_field(tmp_path, text):
    path = tmp_path / "prompts.jsonl"
    path.write_text(f'{{"id": "a", "text": "x"}}\n{{"id": "b", "text": {text}}}\n')
    with pytest.raises(DataError, match="empty or blank") as err:
        read_prompts(path)
    assert (err.value.line, err.value.field) == (2, "text")


@pytest.mark.parametrize(("name", "content"), [("p.txt", "\n  \n"), ("p.jsonl", ""), ("p.jsonl", "\n\n")])
def test_a_prompts_file_without_prompts_is_refused(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match="no prompt"):
        read_prompts(tmp_path / name)


def test_an_empty_file_is_refused_where_records_are_required(tmp_path):
    (tmp_path / "c.jsonl").write_text("")
    assert read_records(tmp_path / "c.jsonl", Completion) == []
    with pytest.raises(DataError, match=r"c\.jsonl: no completion records: the file is empty"):
        read_records(tmp_path / "c.jsonl", Completion, allow_empty=False)


@pytest.mark.parametrize("name", ["prompts.jsonl", "prompts.txt"])
def test_non_utf8_input_names_file_line_and_column(tmp_path, name):
    first = b'{"id": "a", "text": "x"}\n' if name.endswith(".jsonl") else b"hello\n"
    (tmp_path / name).write_bytes(first + b'{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(DataError) as err:
        read_prompts(tmp_path / name)
    assert err.value.line == 2 and str(tmp_path / name) in str(err.value)
    assert "not UTF-8 text (byte 0xe9 at column 25)" in str(err.value)


def test_malformed_json_names_the_column(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b",, "text": "y"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2: malformed JSON \(.* at column 12\)"):
        read_records(path, Prompt)


def test_a_utf8_byte_order_mark_is_accepted_and_stripped(tmp_path):
    (tmp_path / "p.jsonl").write_text('\ufeff{"id": "a", "text": "Hello"}\n', encoding="utf-8")
    (tmp_path / "p.txt").write_text("\ufeffHello\nBye\n", encoding="utf-8")
    assert [p.text for p in read_prompts(tmp_path / "p.jsonl")] == ["Hello"]
    assert [p.text for p in read_prompts(tmp_path / "p.txt")] == ["Hello", "Bye"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_records(tmp_path / "p.jsonl", [Prompt(id="a", text="x")])
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "p.jsonl").stat().st_mode) == mode


def test_json_nested_deeper_than_the_decoder_can_go_is_one_located_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: JSON nested too deeply"):
        read_records(path, Prompt)


@pytest.mark.parametrize("line", [
    '{"prompt": "q", "chosen": "a", "rejected": "b", "label": NaN}',
    '{"id": "c", "prompt_id": "p", "prompt": "q", "text": "t", "index": 0, "scores": {"r": Infinity}}',
    '{"id": "c", "prompt_id": "p", "prompt": "q", "text": "t", "index": 0, "sampling": {"temperature": Infinity}}',
])
def test_non_finite_numbers_in_records_are_refused_by_field(tmp_path, line):
    record_type = PreferencePair if "chosen" in line else Completion
    (tmp_path / "r.jsonl").write_text(line + "\n")
    with pytest.raises(DataError, match=r"r\.jsonl:1: field '(label|scores\.r|sampling\.temperature)': .*finite"):
        read_records(tmp_path / "r.jsonl", record_type)


@pytest.mark.parametrize("existing", [
    '{"schema": "rlhfkit.ranking/1", "prompt_id": "p", "labeler_id": "l", "groups": [["a"], ["b"]]}\n',
    '{"prompt": "q", "chosen": "a", "rejected": "b"}\n',
    "# my notes\n",
])
def test_a_file_of_another_kind_is_not_overwritten(tmp_path, existing):
    path = tmp_path / "out.jsonl"
    path.write_text(existing)
    with pytest.raises(DataError, match=r"out\.jsonl: holds .*, not rlhfkit.pair/1; it is not overwritten"):
        write_records(path, [PreferencePair(prompt="q", chosen="a", rejected="b")])
    assert path.read_text() == existing and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_a_file_of_the_same_kind_is_replaced(tmp_path):
    path = tmp_path / "out.jsonl"
    write_records(path, [Prompt(id="a", text="x")])
    write_records(path, [Prompt(id="b", text="y")])
    assert [p.id for p in read_records(path, Prompt)] == ["b"]


def test_a_cache_folder_is_written_whole_once_when_processes_race_to_write_it(tmp_path):
    from rlhfkit.data.io import write_folder_once

    folder = tmp_path / "cache" / "model"

    def other_process_first(staging: Path) -> None:
        (staging / "weights").write_text("mine")
        folder.mkdir()  # another process renamed its whole folder into place meanwhile
        (folder / "weights").write_text("theirs")

    assert write_folder_once(folder, other_process_first) == folder
    assert (folder / "weights").read_text() == "theirs" and os.listdir(folder.parent) == ["model"]

    def crash(staging: Path) -> None:
        (staging / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_once(tmp_path / "other", crash)
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # no folder, no staging left: nothing looks done
    write_folder_once(tmp_path / "fresh", lambda staging: (staging / "weights").write_text("new"))
    assert (tmp_path / "fresh" / "weights").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["cache", "fresh"]


def test_staging_folders_a_killed_process_left_are_removed_a_day_later_not_before(tmp_path):
    """SIGKILL skips the ``finally`` that removes a staging folder: each was as large as the cache (513 MiB for
    SmolLM2). One untouched for over a day is removed by the next write of that folder; a recent one may be
    another process's, still writing, and an old one of another cache's name is not this folder's."""
    from rlhfkit.data.io import write_folder_once

    cache = tmp_path / "cache"
    cache.mkdir()
    old, recent, other = (cache / name for name in (".model.killed1.partial", ".model.writing.partial",
                                                    ".model-v2.killed2.partial"))
    for staging in (old, recent, other):
        staging.mkdir()
        (staging / "weights").write_text("half")
    two_days_ago = time.time() - 2 * 24 * 3600
    for staging in (old, other):
        os.utime(staging, (two_days_ago, two_days_ago))
    write_folder_once(cache / "model", lambda staging: (staging / "weights").write_text("whole"))
    assert sorted(os.listdir(cache)) == [".model-v2.killed2.partial", ".model.writing.partial", "model"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_a_cache_folder_gets_the_umask_mode_not_its_staging_folders_0700(tmp_path, umask, mode):
    """A cache shared by several accounts (RLHFKIT_CACHE on a group's disk): the folder the older code made with
    ``mkdir`` was 0755 under umask 022; a staging folder from ``mkdtemp`` is 0700, so renamed into place the others
    could no longer read the cached model."""
    from rlhfkit.data.io import write_folder_once

    previous = os.umask(umask)
    try:
        folder = write_folder_once(tmp_path / "cache" / "model", lambda staging: (staging / "weights").write_text("x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == mode


@pytest.mark.parametrize("leftover", [{"tokenizer.json": "{}"}, {"config.json": "{}", "weights": "ha"}])
def test_a_half_written_cache_folder_left_at_the_target_is_replaced_not_taken_for_a_whole_one(tmp_path, leftover):
    """A folder an older version wrote in place (SmolLM2's: config.json, then the weights, then the tokenizer) and a
    crash cut short, or a cache whose config.json was deleted by hand: taken for another process's whole folder,
    every later run wrote the cache again and crashed loading what was there."""
    from rlhfkit.data.io import write_folder_once

    folder = tmp_path / "cache" / "model"
    folder.mkdir(parents=True)
    for name, text in leftover.items():
        (folder / name).write_text(text)

    def write(staging: Path) -> None:
        (staging / "config.json").write_text("{}")
        (staging / "weights").write_text("whole")
        (staging / "tokenizer.json").write_text("{}")

    assert write_folder_once(folder, write) == folder
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"config.json": "{}", "weights": "whole",
                                                                 "tokenizer.json": "{}"}
    assert os.listdir(folder.parent) == ["model"]  # the leftover gone too


def test_a_cache_folder_target_that_is_a_file_is_an_error_naming_it(tmp_path):
    from rlhfkit.data.io import write_folder_once

    (tmp_path / "model").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"model: a file, not a folder"):
        write_folder_once(tmp_path / "model", lambda staging: (staging / "weights").write_text("x"))
    assert os.listdir(tmp_path) == ["model"] and (tmp_path / "model").read_text() == "not a folder"


def test_a_cache_folder_with_the_longest_name_a_folder_can_have_is_written(tmp_path):
    """Its staging folder's name adds a prefix and a suffix to it: past the file system's 255 bytes."""
    from rlhfkit.data.io import write_folder_once

    folder = write_folder_once(tmp_path / ("m" * 255), lambda staging: (staging / "weights").write_text("x"))
    assert (folder / "weights").read_text() == "x" and os.listdir(tmp_path) == [folder.name]
