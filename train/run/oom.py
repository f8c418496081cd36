"""A training step that does not fit the device memory, in one line.

onn-train refuses a config whose lower-bound estimate (onn_jax.training.memory) already exceeds
the devices' memory before anything is compiled. A config that passes that check may still not
fit: the estimate leaves out what XLA adds (attention scores, temporaries, fragmentation). XLA
then fails the first step's compilation or run with RESOURCE_EXHAUSTED and a long buffer dump;
onn-train turns it into one line naming the fields that drive memory, the estimate and the
devices' capacity (exit code 2; the start is undone, see train.run.setup).
"""
from __future__ import annotations

from typing import Any, Sequence

from onn_jax.training.memory import device_memory_bytes, step_bytes

MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is XLA's (or the allocator's) out-of-memory error: a RESOURCE_EXHAUSTED status
    at compile or run time (jax raises it as JaxRuntimeError / XlaRuntimeError)."""
    if isinstance(e, MemoryError):
        return False  # the host's Python heap, not a device
    text = str(e)[:4000]
    if "No space left" in text:  # a full disk (tensorstore says RESOURCE_EXHAUSTED too)
        return False
    return any(m in text for m in MARKERS) and "RuntimeError" in "".join(c.__name__ for c in type(e).__mro__)


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def out_of_memory_message(cfg: Any, devices: Sequence[Any], e: BaseException, step: int) -> str:
    """One line: the memory-driving fields (largest share of the estimate first), XLA's own
    first line, the estimate and the devices' memory, and what to change."""
    parts = step_bytes(cfg)
    order = sorted(parts, key=parts.get, reverse=True)
    need, have, n = sum(parts.values()), device_memory_bytes(devices), max(len(devices), 1)
    xla = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:240]
    shares = ", ".join(f"{f} {_gib(parts[f])}" for f in order)
    capacity = (f"the {_gib(have)} of {n} device(s) ({_gib(have / n)} each)" if have else
                f"the memory of {n} device(s) (capacity unknown)")
    when = "the first step" if step == 0 else f"step {step + 1}"
    return (f"{', '.join(order)}: {when} does not fit the device memory: XLA: {xla}. The estimate (a lower "
            f"bound: parameters, optimizer state and activations in float32) is {_gib(need)} ({shares}) of "
            f"{capacity}; XLA needs more (attention scores, temporaries). Lower data.batch_size (or raise "
            "optim.accum_steps), data.seq_len or the model sizes, set model.remat, or shard over more "
            "devices (mesh.fsdp, mesh.expert)")
