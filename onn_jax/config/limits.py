"""Range checks every config field gets, on top of its own validation in onn_jax.config.

    check_values(cfg)                    # ConfigError naming the dotted field
    problem = memory_problem(cfg, n)     # None, or (field, message) when one step cannot fit

`check_values` walks the dataclasses (so fields added later are covered too): integers must
fit int32 (shapes, steps and counters are int32 in jax; seeds are 0 <= seed < 2**32), floats
must be finite, strings must be encodable as UTF-8 without NUL (they become file names, JSON
and tokenizer input). A value that passed these checks used to fail late, after the workdir
was written, or hang.

`memory_problem` estimates what one training step holds (parameters, AdamW moments and
gradients in float32, plus the largest activations) and refuses a config that needs more than
the memory of all devices together; it is a lower bound, so a config it passes may still not
fit, but one it refuses never would.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from onn_jax.config.errors import ConfigError

INT32 = 2 ** 31


SEED_FIELDS = ("data.seed", "train.seed")


MAX_RECORDS_PER_DOMAIN = 10 ** 6  # the builtin corpus is built in memory, in Python


def check_values(cfg: Any, prefix: str = "") -> None:
    """Raises ConfigError for the first field out of range (see the module docstring)."""
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_values(value, name + ".")
        else:
            _check_leaf(value, name)
    if prefix == "" and hasattr(cfg, "data"):
        n = cfg.data.records_per_domain
        if n > MAX_RECORDS_PER_DOMAIN:
            raise ConfigError("data.records_per_domain", f"must be <= {MAX_RECORDS_PER_DOMAIN}, got {n}")


def _check_leaf(value: Any, name: str) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        lo, hi = (0, 2 ** 32) if name in SEED_FIELDS else (-INT32, INT32)
        if not lo <= value < hi:
            raise ConfigError(name, f"must be in [{lo}, {hi - 1}], got {value}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number, got {value}")
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(name, f"is not valid text (cannot be encoded as UTF-8 at character "
                                    f"{e.start}: {value[e.start:e.end]!r})") from None
        if "\x00" in value:
            raise ConfigError(name, "must not contain a NUL character")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_leaf(v, f"{name}[{i}]")
