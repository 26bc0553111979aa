"""JSONL files of records, and `datasets.Dataset` in and out.

Writes are crash-safe: a whole file is written to a temporary file and renamed over the target, so an
existing file is never left half-written; appends (used by resumable stages) write whole lines and
fsync, and :func:`drop_partial_last_line` removes the one torn line a crash can leave.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar, get_origin

from pydantic import ValidationError

from rlhfkit.data.records import Record

R = TypeVar("R", bound=Record)


class DataError(ValueError):
    """Bad input data, located by file, line (or 0-based row of a table) and field, with a hint on how to
    fix it: ``file:line: field 'name': reason``."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None,
                 field: str | None = None, row: int | None = None) -> None:
        self.path, self.line, self.field, self.row, self.message = path, line, field, row, message
        where = str(path) if path is not None else "<data>"
        if line is not None:
            where += f":{line}"
        if row is not None:
            where += f": row {row}"
        if field:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class DataWarning(UserWarning):
    """Input that was read but not used (e.g. a pair that compares an answer with itself), located like a
    :class:`DataError`; the command line prints each as one line."""


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def validation_error(exc: ValidationError, path: str | os.PathLike | None, line: int | None,
                     row: int | None = None) -> DataError:
    """Turn pydantic's error into a DataError naming the first bad field."""
    first = exc.errors()[0]
    field = _field_path(first["loc"]) or None
    message = first["msg"]
    if first["type"] == "value_error":  # raised by a validator of ours: its message as written
        message = str(first["ctx"]["error"])
    elif first["type"] == "missing":
        message = "required field is missing"
    elif first["type"] == "extra_forbidden":
        message = "unknown field (check its spelling against the record's schema)"
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''} on this line)"
    return DataError(message, path, line, field, row)


def parse_record(data: Any, record_type: type[R], path: str | os.PathLike | None = None,
                 line: int | None = None, row: int | None = None) -> R:
    """Validate one decoded JSON object as ``record_type``, checking its ``schema`` field if present;
    errors name ``path`` and ``line`` (or ``row``, a 0-based index of a table)."""
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object, got {type(data).__name__}", path, line, row=row)
    data = dict(data)
    schema = data.pop("schema", None)
    if schema is not None and schema != record_type.schema_name():
        kind = str(schema).partition("/")[0]
        if kind == f"rlhfkit.{record_type.kind}":
            hint = f"written by a different rlhfkit version (this one reads version {record_type.version})"
        else:
            hint = f"this is a {kind.removeprefix('rlhfkit.')} file, expected {record_type.kind} records"
        raise DataError(f"schema {schema!r} is not {record_type.schema_name()!r}: {hint}", path, line, "schema",
                        row)
    try:
        return record_type.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, path, line, row) from None


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file, a leading byte-order mark dropped; a missing file
    or bytes that are not UTF-8 are a DataError naming the line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError("a folder, not a file" if path.is_dir() else "file not found", path)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                "save the file as UTF-8", path, number) from None
            yield number, text.removeprefix("\ufeff") if number == 1 else text


def malformed_json(exc: json.JSONDecodeError, path: str | os.PathLike, line: int | None = None) -> DataError:
    """A DataError at the decoder's line and column (``line`` given: a line of a JSONL file)."""
    return DataError(f"malformed JSON ({exc.msg} at column {exc.colno})", path,
                     exc.lineno if line is None else line)


def decode_json(text: str, path: str | os.PathLike, line: int | None = None) -> Any:
    """``text`` (the whole of ``path``, or its line ``line``) decoded; malformed JSON, or nesting deeper
    than Python's recursion limit (which would crash the decoder), is a DataError at its line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise malformed_json(exc, path, line) from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read (lists or objects inside each other thousands of "
                        "levels deep)", path, line) from None


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, decoded object) for each non-blank line; malformed JSON is a DataError."""
    for number, raw in text_lines(path):
        if raw.strip():
            yield number, decode_json(raw, path, number)


def iter_records(path: str | os.PathLike, record_type: type[R]) -> Iterator[tuple[int, R]]:
    """(line number, record) for each line of a JSONL file; refuses bad lines and duplicate ids."""
    first_seen: dict[str, int] = {}
    for number, data in iter_json_lines(path):
        record = parse_record(data, record_type, path, number)
        if record_type.id_field:
            key = getattr(record, record_type.id_field)
            if key in first_seen:
                raise DataError(f"duplicate id {key!r} (first seen on line {first_seen[key]})", path, number,
                                record_type.id_field)
            first_seen[key] = number
        yield number, record


def read_records(path: str | os.PathLike, record_type: type[R], allow_empty: bool = True) -> list[R]:
    """All records of a JSONL file of ``record_type`` (see :func:`iter_records`); ``allow_empty=False``
    refuses a file without any."""
    records = [record for _, record in iter_records(path, record_type)]
    if not records and not allow_empty:
        raise DataError(f"no {record_type.kind} records: the file is empty", path)
    return records


def _line(record: Record) -> str:
    body = record.model_dump(mode="json")
    return json.dumps({"schema": record.schema_name(), **body}, ensure_ascii=False) + "\n"


def umask_mode(requested: int = 0o666) -> int:
    """The mode a new file (``requested=0o777``: folder) gets under the current umask, as ``open()`` and
    ``mkdir()`` give it: 0o644 (0o755) under umask 022."""
    umask = os.umask(0)
    os.umask(umask)
    return requested & ~umask


def _schema_of_first_line(path: Path) -> str | None:
    """The ``schema`` of an existing file's first line: None for no file or an empty one, "" for a file
    that is not rlhfkit records (another format, or not JSON at all)."""
    if not path.is_file():
        return None
    with path.open("rb") as f:
        first = f.readline(1 << 20)
    if not first.strip():
        return None
    try:
        data = json.loads(first.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        return ""
    return str(data.get("schema", "")) if isinstance(data, dict) else ""


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> int:
    """Write records atomically (temp file + rename); returns how many were written. The file gets the
    umask's mode, as a plain ``open()`` would give it (a temporary file starts at 0600). An existing file
    is replaced only by records of its own kind: ``-o`` naming an input of another kind (the rankings a
    ``pairs`` run reads, a TRL file being imported) is a DataError, not the input lost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count, schema = 0, None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                schema = schema or record.schema_name()
                f.write(_line(record))
                count += 1
            f.flush()
            os.fsync(f.fileno())
        existing = _schema_of_first_line(path)
        if schema and existing not in (None, schema):
            raise DataError(f"holds {existing or 'data without an rlhfkit schema'}, not {schema}; it is not "
                            "overwritten: choose another output file (or delete this one first)", path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _files(folder: Path) -> set[str]:
    """The path inside ``folder`` of each file under it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


ABANDONED_AFTER_S = 24 * 3600  # a staging folder untouched this long was left by a killed process


def _remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove the staging folders of ``write_folder_once`` that a killed process left (SIGKILL, power loss: its
    ``finally`` never ran), each as large as the cache (513 MiB for SmolLM2): those not modified for
    ``ABANDONED_AFTER_S``. A process writing one now keeps adding files to it, so its time is recent."""
    now = time.time()
    for staging in parent.glob(f"{glob.escape(prefix)}*.partial"):
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            if staging.is_dir() and now - staging.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(staging, ignore_errors=True)


def write_folder_once(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create a cache folder whole or not at all, with processes racing to create it: ``write`` fills a staging
    folder of this process's own, moved into place in one rename. A folder another process put there first
    is kept and this one's discarded (they hold the same); a crash or an error leaves no folder behind. A folder
    there that lacks a file this one holds is half-written (an older version wrote in place and a crash cut it
    short, a file deleted by hand): it is replaced. The folder gets the umask's mode, as ``mkdir()`` gives it (a
    staging folder starts at 0700: in a cache shared by several accounts the others could not read it)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # the name cut short: a folder name of up to 255 bytes leaves no room for the prefix and suffix (40 characters:
    # at most 160 bytes in UTF-8)
    prefix = f".{folder.name[:40]}."
    _remove_abandoned(folder.parent, prefix)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=prefix, suffix=".partial"))
    stale = staging.with_suffix(".stale")
    try:
        write(staging)
        staging.chmod(umask_mode(0o777))
        try:
            staging.rename(folder)
        except OSError:  # not empty: another process's, whole (it was renamed into place), or half-written
            if folder.exists() and not folder.is_dir():
                raise NotADirectoryError(f"{folder}: a file, not a folder; move it away (the cache is written "
                                         "there)") from None
            if not _files(staging) <= _files(folder):  # half-written: moved aside in one rename, then replaced
                stale.mkdir()
                with contextlib.suppress(FileNotFoundError):  # another process moved it aside first
                    folder.rename(stale / folder.name)
                try:
                    staging.rename(folder)
                except OSError:  # another process's, put there meanwhile
                    if not _files(staging) <= _files(folder):
                        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def append_records(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Append whole lines and fsync, so that a crash loses at most the batch being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(_line(r) for r in records)
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def drop_partial_last_line(path: str | os.PathLike) -> bool:
    """Remove a last line that has no newline (torn by a crash mid-append). True if one was removed."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
    return True


# ---------------------------------------------------------------- datasets.Dataset in and out


def to_dataset(records: Iterable[Record]):
    """A `datasets.Dataset` with one column per record field (conversations stay lists of dicts)."""
    from datasets import Dataset

    return Dataset.from_list([r.model_dump(mode="json") for r in records])


def _without_arrow_fill(row: dict, record_type: type[Record]) -> dict:
    """Arrow stores a column of dicts as one struct with every key, filling a row's missing keys with
    None; drop those again from the free-form dict fields (scores, metadata, provenance)."""
    row = dict(row)
    for name, info in record_type.model_fields.items():
        if get_origin(info.annotation) is dict and isinstance(row.get(name), dict):
            row[name] = {k: v for k, v in row[name].items() if v is not None}
    return row


def from_dataset(dataset, record_type: type[R]) -> list[R]:
    """Records from a `datasets.Dataset` (or any iterable of dicts); errors name the 0-based row and field."""
    return [parse_record(_without_arrow_fill(row, record_type), record_type, "<dataset>", row=index)
            for index, row in enumerate(dataset)]


def read_prompts(path: str | os.PathLike):
    """Prompts from a JSONL file of prompt records, or a .txt file with one prompt per line
    (ids ``line-N``; blank lines skipped). A file without any prompt is a DataError."""
    from rlhfkit.data.records import Prompt

    path = Path(path)
    if path.suffix != ".txt":
        return read_records(path, Prompt, allow_empty=False)
    prompts = [Prompt(id=f"line-{n}", text=text.strip()) for n, text in text_lines(path) if text.strip()]
    if not prompts:
        raise DataError("no prompts: the file has no non-blank line", path)
    return prompts
