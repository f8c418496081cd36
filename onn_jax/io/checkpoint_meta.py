"""The JSON metadata saved next to a checkpoint's state: config, data position, PRNG key, tokenizer.

`make_meta` builds it (and fails at save time, not at restore time, on anything JSON cannot
hold); `rng_to_json` / `rng_from_json` carry a JAX PRNG key through JSON exactly, so a
resumed run draws the same random numbers. Plain JSON and jax: no orbax here.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import numpy as np


def rng_to_json(key: jax.Array | None) -> dict | None:
    """A JAX PRNG key (typed or raw uint32) as a JSON-able dict."""
    if key is None:
        return None
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    impl = str(jax.random.key_impl(key)) if typed else None
    return {"typed": bool(typed), "impl": impl, "data": np.asarray(data).tolist()}


def rng_from_json(obj: dict | None) -> jax.Array | None:
    """Inverse of rng_to_json."""
    if obj is None:
        return None
    data = np.asarray(obj["data"], np.uint32)
    return jax.random.wrap_key_data(data, impl=obj["impl"]) if obj["typed"] else jax.numpy.asarray(data)


def make_meta(config: Any = None, data_state: Mapping | None = None, rng: jax.Array | None = None,
              tokenizer: Mapping | None = None, **extra) -> dict:
    """The JSON metadata stored next to the state.

    config: a dict (e.g. onn_jax.config.to_dict of each section); data_state: the data
    iterator's position (small dict); rng: the training PRNG key; tokenizer: its description.
    """
    meta = {"config": config, "data": dict(data_state) if data_state is not None else None,
            "rng": rng_to_json(rng), "tokenizer": dict(tokenizer) if tokenizer is not None else None}
    meta.update(extra)
    json.dumps(meta)  # fail here, at save time, on anything JSON cannot hold
    return meta
