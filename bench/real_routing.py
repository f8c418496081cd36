"""Real routing for onn-bench (`--train-steps N`): time a model whose gate was trained, not forced.

Forcing the thresholds (`--force-avg-k`) fixes avg_k but not the shape of the load: the
trained top-any gate routes unevenly, falls back on some tokens and leaves some experts idle,
which is what the dispatches must cope with in practice. `--train-steps N` trains the
unforced model for N steps on the builtin four-domain corpus (byte tokens, the data
onn-train uses by default), then times the step from that state on further corpus batches.
The training uses the very step that is timed (same compiled program), so its routing is the
routing of the mode being measured (smk learns its thresholds; plain its top-k router).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from onn_jax.data.corpus import DOMAINS, build_corpus
from onn_jax.data.dataset import TrainIterator, make_examples
from onn_jax.data.tokenizer import ByteTokenizer


def corpus_batches(batch: int, seq: int, count: int, seed: int = 0,
                   records_per_domain: int = 1000) -> list[dict[str, jax.Array]]:
    """`count` consecutive training batches [batch, seq] of the builtin corpus (byte tokens),
    as onn-train's TrainIterator draws them (packed rows, shuffled per epoch)."""
    records = build_corpus(seed=seed, records_per_domain=records_per_domain)
    examples = make_examples(records, ByteTokenizer(), seq, DOMAINS)
    it = TrainIterator(examples, batch, seed=seed)
    out = []
    for _ in range(count):
        b = next(it)
        out.append({k: jnp.asarray(b[k]) for k in ("inputs", "targets", "loss_mask")})
    return out


def train_for(step, state, batches: list[dict[str, jax.Array]], steps: int):
    """`steps` steps of `step` (state, batch) -> (state, metrics) over `batches` in turn;
    returns the final state and the last step's metrics (host floats)."""
    metrics = {}
    for i in range(steps):
        state, metrics = step(state, batches[i % len(batches)])
    return state, {k: float(v) for k, v in jax.device_get(metrics).items() if jnp.ndim(v) == 0}
