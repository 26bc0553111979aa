"""Typed configs from YAML: every trainer's config is a dataclass with working defaults; a YAML file
(and command-line flags) override some of its fields, and the result is saved next to the checkpoint."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(loaded).__name__}")
    return loaded


def config_from_mapping(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """``cls`` from a mapping of its fields; unknown fields are refused with the list of known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**data)


def config_from_yaml(cls: type[C], path: str | os.PathLike | None = None, **overrides: Any) -> C:
    """``cls`` with the fields of a YAML mapping, then the non-None ``overrides``."""
    data = read_yaml(path) if path is not None else {}
    return config_from_mapping(cls, data | {k: v for k, v in overrides.items() if v is not None}, str(path or "config"))


def save_config(config: Any, path: str | os.PathLike) -> None:
    data = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
