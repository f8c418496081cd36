"""ConfigError, and the checks every config section's validation uses."""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid. `field` is the dotted path of the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(field_name, message)


def positive_int(value: Any, name: str) -> None:
    check(isinstance(value, int) and not isinstance(value, bool), name,
           f"must be an integer, got {type(value).__name__} {value!r}")
    check(value > 0, name, f"must be > 0, got {value}")


def nonneg_float(value: Any, name: str) -> None:
    check(isinstance(value, (int, float)) and not isinstance(value, bool), name,
           f"must be a number, got {type(value).__name__} {value!r}")
    check(value >= 0, name, f"must be >= 0, got {value}")


def choice(value: Any, choices: tuple[str, ...], name: str) -> None:
    check(value in choices, name, f"must be one of {list(choices)}, got {value!r}")
