"""Config <-> nested dicts: `from_dict` (unknown keys refused, naming the dotted path) and
`to_dict` (JSON types, as config.json and checkpoint metadata read back).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from onn_jax.config.errors import ConfigError


def from_dict(cls, data: Mapping[str, Any], path: str = ""):
    """Builds config dataclass `cls` from a nested mapping, rejecting unknown keys.

    Nested dataclass fields are built recursively. Errors name the dotted field path.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(path.rstrip(".") or cls.__name__,
                          f"must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(path + key, f"unknown key; known keys: {sorted(fields)}")
        default = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if default is not None and dataclasses.is_dataclass(default):
            value = from_dict(default, value, path + key + ".")
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(config) -> dict[str, Any]:
    """The config as a plain nested dict of JSON types (tuples as lists), as it reads back from
    config.json and checkpoint metadata (for logging, metadata and comparisons)."""
    return _json_shaped(dataclasses.asdict(config))


def _json_shaped(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_shaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_shaped(v) for v in value]
    return value
