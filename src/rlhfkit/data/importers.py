"""Bring preference data from other tools in, and send it back out.

Two formats are understood:

* **TRL** preference columns ``prompt`` / ``chosen`` / ``rejected``: plain strings, or conversational
  ``messages`` lists (``[{"role": ..., "content": ...}]``). Without a ``prompt`` column (TRL's "implicit
  prompt" form) the conversations' shared leading turns become the prompt.
* **Anthropic HH-RLHF** transcripts: ``chosen`` and ``rejected`` strings of ``\\n\\nHuman:`` /
  ``\\n\\nAssistant:`` turns that share every turn but the last answer; that shared prefix (up to and
  including the last ``\\n\\nAssistant:``) becomes the prompt.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from rlhfkit.data.io import DataError, DataWarning, decode_json, iter_json_lines, text_lines, validation_error
from rlhfkit.data.records import Message, PreferencePair

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
_MESSAGES = TypeAdapter(list[Message])


def is_table(path: Path) -> bool:
    """A Parquet file or a `save_to_disk` folder: rows are numbered 0, 1, ..., not by file line."""
    return path.is_dir() or path.suffix == ".parquet"


def iter_json_list(path: str | os.PathLike, text: str) -> Iterator[tuple[int, Any]]:
    """(line where the element starts, element) of ``text``, the content of ``path``: one JSON list."""
    decode_json(text, path)  # a syntax error is located at its line and column of the whole file
    decoder, separators = json.JSONDecoder(), re.compile(r"[\s,]*")
    index = text.index("[") + 1
    line, counted = 1, 0
    while True:
        start = separators.match(text, index).end()
        if text[start] == "]":
            return
        line, counted = line + text.count("\n", counted, start), start
        value, index = decoder.raw_decode(text, start)
        yield line, value


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(number, row) from a JSONL file, a JSON file (one list, or JSON Lines), a Parquet file or a
    `save_to_disk` folder.

    Numbers are file line numbers for JSON and JSONL, 0-based row indices for tables (see :func:`is_table`).
    """
    path = Path(path)
    if path.is_dir():
        import datasets

        try:
            dataset = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot be read as a `datasets` folder: {exc}", path) from None
        yield from enumerate(dataset)
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches()
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"cannot be read as a Parquet file: {exc}", path) from None
        yield from enumerate(row for batch in batches for row in batch.to_pylist())
        return
    text = "".join(line for _, line in text_lines(path)) if path.suffix == ".json" else ""
    for number, row in iter_json_list(path, text) if text.lstrip().startswith("[") else iter_json_lines(path):
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", path, number)
        yield number, row


class SkippedRow(DataError):
    """A well-formed row that gives no usable pair; :func:`import_pairs` leaves it out with a warning."""


def _text_or_messages(value: Any, field: str, where: dict) -> str | list[Message]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        try:
            return _MESSAGES.validate_python(value)
        except ValidationError as exc:
            err = validation_error(exc, None, None)
            raise DataError(err.message, field=f"{field}.{err.field}", **where) from None
    raise DataError(f"expected a string or a list of messages, got {type(value).__name__}", field=field, **where)


def _require(row: dict, field: str, where: dict) -> Any:
    if row.get(field) is None:
        present = sorted(k for k, v in row.items() if v is not None)
        state = "null" if field in row else "missing"
        raise DataError(f"required field is {state} (columns with values: {present})", field=field, **where)
    return row[field]


def _distinct(pair: PreferencePair, where: dict) -> PreferencePair:
    if pair.chosen == pair.rejected:
        raise SkippedRow("chosen and rejected are the same answer, so the pair prefers nothing", field="rejected",
                         **where)
    return pair


def trl_pair(row: dict[str, Any], where: dict | None = None) -> PreferencePair:
    """One TRL preference row (explicit or implicit prompt, text or conversational) as a pair.

    ``where``: the row's location for errors (``path`` and ``line``, or ``row``)."""
    where = where or {}
    chosen = _text_or_messages(_require(row, "chosen", where), "chosen", where)
    rejected = _text_or_messages(_require(row, "rejected", where), "rejected", where)
    if row.get("prompt") is not None:
        prompt = _text_or_messages(row["prompt"], "prompt", where)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise DataError("no 'prompt' column and the conversations share no leading turn", field="prompt",
                            **where)
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        raise DataError("no 'prompt' column; plain-text rows need one (only conversations can share a "
                        "prefix)", field="prompt", **where)
    if isinstance(prompt, str) != isinstance(chosen, str) or isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError("prompt, chosen and rejected must all be text or all be conversations", **where)
    return _distinct(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, provenance={"format": "trl"}),
                     where)


def hh_pair(row: dict[str, Any], where: dict | None = None) -> PreferencePair:
    """One HH-RLHF row: the shared transcript up to the last ``\\n\\nAssistant:`` becomes the prompt.

    Transcripts that differ before their last answer (a different human turn, or an earlier answer) do
    not compare two answers to one prompt: they are a :class:`SkippedRow`."""
    where = where or {}
    chosen = _require(row, "chosen", where)
    rejected = _require(row, "rejected", where)
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise DataError(f"expected a transcript string, got {type(value).__name__}", field=field, **where)
    common = os.path.commonprefix([chosen, rejected])  # noqa: RUF071 (character-wise is what we want)
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError("chosen and rejected share no '\\n\\nAssistant:' turn, so there is no common prompt "
                        "(is this HH-RLHF format?)", field="chosen", **where)
    cut += len(HH_ASSISTANT)
    if HH_HUMAN in chosen[cut:] or HH_HUMAN in rejected[cut:]:
        raise SkippedRow(f"the transcripts differ before their last answer (at character {len(common) + 1}), so "
                         "they do not answer one shared prompt", field="chosen", **where)
    return _distinct(PreferencePair(prompt=chosen[:cut], chosen=chosen[cut:], rejected=rejected[cut:],
                                    provenance={"format": "hh-rlhf"}), where)


IMPORTERS = {"trl": trl_pair, "hh": hh_pair}


def import_pairs(rows: Iterable[tuple[int, dict[str, Any]]] | str | os.PathLike, fmt: str,
                 source: str | None = None) -> list[PreferencePair]:
    """Pairs from rows of format ``fmt`` ('trl' or 'hh'); rows are a file path (see :func:`read_rows`) or
    (row index, row) tuples. A :class:`SkippedRow` is left out with a :class:`DataWarning`; input
    without any usable row is a DataError."""
    if fmt not in IMPORTERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(IMPORTERS)}")
    numbered_by = "row"
    if isinstance(rows, str | os.PathLike):
        source = source or str(rows)
        numbered_by = "row" if is_table(Path(rows)) else "line"
        rows = read_rows(rows)
    convert = IMPORTERS[fmt]
    pairs, skipped = [], 0
    for number, row in rows:
        where = {"path": source, numbered_by: number}
        try:
            pair = convert(row, where)
        except SkippedRow as skip:
            warnings.warn(f"{skip}; left out", DataWarning, stacklevel=2)
            skipped += 1
            continue
        pairs.append(pair.model_copy(update={"provenance": {**pair.provenance, "source": source,
                                                             numbered_by: number}}))
    if not pairs:
        raise DataError(f"no pairs: {f'all {skipped} rows were left out' if skipped else 'the input has no rows'}",
                        source)
    return pairs


def export_trl(pairs: Iterable[PreferencePair]) -> list[dict[str, Any]]:
    """TRL's explicit-prompt preference rows (``prompt`` / ``chosen`` / ``rejected``)."""
    return [pair.model_dump(mode="json", include={"prompt", "chosen", "rejected"}) for pair in pairs]


def export_hh(pairs: Iterable[PreferencePair]) -> list[dict[str, str]]:
    """HH-RLHF rows: full transcripts, prompt + answer. Needs text pairs whose prompt ends an
    ``\\n\\nAssistant:`` turn."""
    rows = []
    for pair in pairs:
        if not isinstance(pair.prompt, str) or not pair.prompt.endswith(HH_ASSISTANT):
            raise ValueError("HH export needs text prompts ending with '\\n\\nAssistant:'")
        rows.append({"chosen": pair.prompt + pair.chosen, "rejected": pair.prompt + pair.rejected})
    return rows
