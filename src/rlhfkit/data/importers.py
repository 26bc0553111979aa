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

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from rlhfkit.data.io import DataError, iter_json_lines, validation_error
from rlhfkit.data.records import Message, PreferencePair

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
_MESSAGES = TypeAdapter(list[Message])


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row) from a JSONL file, a JSON list, a Parquet file or a `save_to_disk` folder.

    Row numbers are file line numbers for JSONL, 0-based indices otherwise.
    """
    path = Path(path)
    if path.is_dir() or path.suffix in {".parquet", ".json"}:
        import datasets

        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
        elif path.suffix == ".parquet":
            dataset = datasets.Dataset.from_parquet(str(path))
        else:
            dataset = datasets.Dataset.from_json(str(path))
        yield from enumerate(dataset)
    else:
        for number, row in iter_json_lines(path):
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", path, number)
            yield number, row


def _text_or_messages(value: Any, field: str, where: tuple) -> str | list[Message]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        try:
            return _MESSAGES.validate_python(value)
        except ValidationError as exc:
            err = validation_error(exc, *where)
            raise DataError(err.message, where[0], where[1], f"{field}.{err.field}") from None
    raise DataError(f"expected a string or a list of messages, got {type(value).__name__}", *where, field)


def _require(row: dict, field: str, where: tuple) -> Any:
    if field not in row or row[field] is None:
        raise DataError(f"required field is missing (columns present: {sorted(row)})", *where, field)
    return row[field]


def trl_pair(row: dict[str, Any], where: tuple = (None, None)) -> PreferencePair:
    """One TRL preference row (explicit or implicit prompt, text or conversational) as a pair."""
    chosen = _text_or_messages(_require(row, "chosen", where), "chosen", where)
    rejected = _text_or_messages(_require(row, "rejected", where), "rejected", where)
    if row.get("prompt") is not None:
        prompt = _text_or_messages(row["prompt"], "prompt", where)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise DataError("no 'prompt' column and the conversations share no leading turn", *where, "prompt")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        raise DataError("no 'prompt' column; plain-text rows need one (only conversations can share a "
                        "prefix)", *where, "prompt")
    if isinstance(prompt, str) != isinstance(chosen, str) or isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError("prompt, chosen and rejected must all be text or all be conversations", *where)
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, provenance={"format": "trl"})


def hh_pair(row: dict[str, Any], where: tuple = (None, None)) -> PreferencePair:
    """One HH-RLHF row: the shared transcript up to the last ``\\n\\nAssistant:`` becomes the prompt."""
    chosen = _require(row, "chosen", where)
    rejected = _require(row, "rejected", where)
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise DataError(f"expected a transcript string, got {type(value).__name__}", *where, field)
    common = os.path.commonprefix([chosen, rejected])  # noqa: RUF071 (character-wise is what we want)
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError("chosen and rejected share no '\\n\\nAssistant:' turn, so there is no common prompt "
                        "(is this HH-RLHF format?)", *where, "chosen")
    cut += len(HH_ASSISTANT)
    return PreferencePair(prompt=chosen[:cut], chosen=chosen[cut:], rejected=rejected[cut:],
                          provenance={"format": "hh-rlhf"})


IMPORTERS = {"trl": trl_pair, "hh": hh_pair}


def import_pairs(rows: Iterable[tuple[int, dict[str, Any]]] | str | os.PathLike, fmt: str,
                 source: str | None = None) -> list[PreferencePair]:
    """Pairs from rows of format ``fmt`` ('trl' or 'hh'); rows are a file path or (number, row) tuples."""
    if fmt not in IMPORTERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(IMPORTERS)}")
    if isinstance(rows, str | os.PathLike):
        source = source or str(rows)
        rows = read_rows(rows)
    convert = IMPORTERS[fmt]
    pairs = []
    for number, row in rows:
        pair = convert(row, (source, number))
        pairs.append(pair.model_copy(update={"provenance": {**pair.provenance, "source": source, "row": number}}))
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
