"""Model FLOPs per token and device peaks: what the MFU of onn-bench and of training counts.

`train_flops_per_token` counts only active-expert FLOPs (the formula in its docstring);
`device_peak_tflops` looks up the dense bf16 peak by jax's device_kind. onn-train's perf/mfu
(train/run/perf.py), onn-bench and the PyTorch peer (bench/) all count with these, so a training
run and a benchmark count FLOPs alike.
"""
from __future__ import annotations

from onn_jax.config import ModelConfig

# Dense bf16 tensor-core peak in TFLOP/s, matched as a substring of jax's device_kind.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
               "TPU v4": 275.0, "TPU v6": 918.0}


def train_flops_per_token(cfg: ModelConfig, seq_len: int, active_k: float) -> float:
    """Model FLOPs of one training step per token: 3 x (forward matmul FLOPs).

    forward = 2 * [L * (4 C^2 + C E + k * m * C * I) + C V] + L * 4 * T * C
    (attention projections, router, the k active experts with m = 2 (GELU) or 3 (SwiGLU)
    matrices, LM head; then QK^T and PV over all T keys). The dense FFN counts k = top_k
    with no router. Inactive experts computed by the dense dispatch and the Surprise
    backward are not counted: they are overhead, not model work.
    """
    c, m, L = cfg.hidden, cfg.moe, cfg.num_layers
    mats = 3 if m.expert_kind == "swiglu" else 2
    router = 0 if m.router == "dense" else c * m.num_experts
    per_layer = 4 * c * c + router + active_k * mats * c * m.intermediate
    return 3.0 * (2.0 * (L * per_layer + c * cfg.vocab_size) + L * 4.0 * seq_len * c)


def device_peak_tflops(kind: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in kind.lower():
            return value
    return None
