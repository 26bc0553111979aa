"""Typed configs from YAML: every trainer's config is a dataclass with working defaults; a YAML file
(and command-line flags) override some of its fields, and the result is saved next to the checkpoint.

One validation layer for every command: the fields are checked against the dataclass's types by
pydantic (a number written as text, ``lr: 1e-3``, which YAML 1.1 reads as a string, is read as the
number; ``'no'``/``'off'``/``'false'`` as False; anything else of the wrong type is refused), then by the
dataclass's own ``__post_init__`` rules (ranges, fields that must agree). Every error is one line
``file:line: field 'name': reason``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

from rlhfkit.data.io import DataError

C = TypeVar("C")


class FieldError(ValueError):
    """A config field with a value its dataclass refuses (raised by ``__post_init__`` rules)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"field '{field}': {reason}")


def require(condition: bool, field: str, reason: str) -> None:
    """A ``__post_init__`` rule: ``field`` is refused with ``reason`` unless ``condition``."""
    if not condition:
        raise FieldError(field, reason)


SEED_BOUND = 2**32  # seeds are in [0, SEED_BOUND)


def require_seed(seed: int, field: str = "seed") -> None:
    """A trainer's ``seed`` is in [0, 2**32): what numpy, transformers' ``set_seed`` and torch's CPU generator
    take (torch reads a seed's low 32 bits, so 2**32 + s drew as s, and raised a traceback past 2**64)."""
    require(0 <= seed < SEED_BOUND, field, f"must be in [0, 2**32), got {seed}")


@functools.cache
def _field_type(config_type: type, name: str) -> TypeAdapter:
    return TypeAdapter(typing.get_type_hints(config_type)[name])


def require_field_types(config: Any) -> None:
    """The first ``__post_init__`` rule of a config dataclass, so that one built in Python is read like one
    from YAML: each field is validated against its annotation by pydantic (``lr="1e-3"`` becomes 0.001,
    ``whiten_advantages="no"`` False; ``lr=None`` is refused by name, not a TypeError in a comparison),
    and a float must be finite (``temperature=inf`` passes every ``> 0`` rule, then samples nonsense)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        value = os.fspath(value) if isinstance(value, os.PathLike) else value  # output_dir=Path(...) is fine
        try:
            value = _field_type(type(config), field.name).validate_python(value)
        except ValidationError as exc:
            raise FieldError(field.name, f"{exc.errors()[0]['msg']} (got {value!r})") from None
        require(not isinstance(value, float) or math.isfinite(value), field.name,
                f"must be a finite number, got {value}")
        setattr(config, field.name, value)


def _yaml_error(exc: yaml.YAMLError, path: str | os.PathLike) -> DataError:
    mark = getattr(exc, "problem_mark", None)
    return DataError(f"not valid YAML: {getattr(exc, 'problem', None) or exc}", path,
                     mark.line + 1 if mark else None)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML file; a syntax error is one line naming the file and line."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, path) from None
    except RecursionError:  # PyYAML's parser recurses once per level of [[[...]]]
        raise DataError("not valid YAML: nested too deeply to read", path) from None
    if not isinstance(loaded, dict):
        raise DataError(f"expected a mapping of config fields, got {type(loaded).__name__}", path)
    return loaded


def key_lines(path: str | os.PathLike) -> dict[str, int]:
    """The 1-based line of each top-level key of a YAML mapping (for error messages)."""
    try:
        node = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError, RecursionError):
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value): key.start_mark.line + 1 for key, _ in node.value}


def config_from_mapping(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """``cls`` from a mapping of its fields, validated (see the module docstring); ``source`` is the
    YAML file the mapping came from (its lines are then named in errors) or a word such as "flags"."""
    lines = key_lines(source) if Path(source).is_file() else {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=lambda k: lines.get(k, 0))
    if unknown:
        raise DataError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}", source,
                        lines.get(unknown[0]))
    try:
        config = TypeAdapter(cls).validate_python(data)
        require_field_types(config)  # finiteness, also for a config without __post_init__ rules (cai/)
        return config
    except FieldError as rule:
        field, reason = rule.field, rule.reason
    except ValidationError as exc:
        error = exc.errors()[0]
        rule = (error.get("ctx") or {}).get("error")
        if isinstance(rule, FieldError):
            field, reason = rule.field, rule.reason
        else:
            field = ".".join(str(part) for part in error["loc"])
            reason = f"{error['msg']} (got {error['input']!r})"
    raise DataError(reason, source, lines.get(field.split(".")[0]), field)


def config_from_yaml(cls: type[C], path: str | os.PathLike | None = None, **overrides: Any) -> C:
    """``cls`` with the fields of a YAML mapping, then the non-None ``overrides``."""
    data = read_yaml(path) if path is not None else {}
    return config_from_mapping(cls, data | {k: v for k, v in overrides.items() if v is not None}, str(path or "config"))


def save_config(config: Any, path: str | os.PathLike) -> None:
    data = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
