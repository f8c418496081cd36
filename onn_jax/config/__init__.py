"""Frozen, validated configuration dataclasses: one section per concern, one import for all.

Every field has the faithful default of docs/ALGORITHM.md unless its docstring says
otherwise. Validation happens at construction time and raises `ConfigError`, which names
the offending field by its dotted path so the training program can point at the source.

    model.moe        config/moe.py     the MoE layer: router, experts, dispatch, gate losses
    model.heads,     config/units.py   phase-2 gated units: attention heads, slot embedding,
    model.embed,                       adaptive softmax output
    model.output
    model            config/model.py   the transformer around them
    optim            config/optim.py   gradient filter, AdamW, schedule, accumulation
    mesh, data,      config/run.py     the training program, and the top-level Config
    train, checkpoint,
    distributed
    (any)            config/limits.py  ranges every field gets (int32, finite, UTF-8)
"""
from onn_jax.config.errors import ConfigError
from onn_jax.config.model import ATTENTIONS, DTYPES, NORMS, REMATS, ModelConfig
from onn_jax.config.moe import (
                                DISPATCHES,
                                EXPERT_KINDS,
                                GATE_TIE_BREAKS,
                                GATE_TOKENS,
                                GEMMS,
                                MOE_GATE_TOKENS,
                                ROUTERS,
                                TOKEN_SUMS,
                                MoEConfig,
)
from onn_jax.config.optim import FILTER_MODES, FILTER_SCOPES, IDLE_EXPERTS, SCHEDULES, FilterConfig, OptimConfig
from onn_jax.config.run import (
                                SAMPLE_FORMATS,
                                CheckpointConfig,
                                Config,
                                DataConfig,
                                DistributedConfig,
                                MeshConfig,
                                TrainConfig,
)
from onn_jax.config.serialize import from_dict, to_dict
from onn_jax.config.units import (
                                EMBED_KINDS,
                                HEAD_COMBINES,
                                HEAD_ROUTERS,
                                OUTPUT_KINDS,
                                SLOT_SURPRISES,
                                EmbedConfig,
                                HeadsConfig,
                                OutputConfig,
)

__all__ = [
    "ATTENTIONS", "DISPATCHES", "DTYPES", "EMBED_KINDS", "EXPERT_KINDS", "FILTER_MODES", "FILTER_SCOPES",
    "GATE_TIE_BREAKS", "GATE_TOKENS", "GEMMS", "HEAD_COMBINES", "HEAD_ROUTERS", "IDLE_EXPERTS",
    "MOE_GATE_TOKENS", "NORMS", "OUTPUT_KINDS", "REMATS", "ROUTERS", "SAMPLE_FORMATS", "SCHEDULES",
    "SLOT_SURPRISES", "TOKEN_SUMS",
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistributedConfig", "EmbedConfig", "FilterConfig",
    "HeadsConfig",
    "MeshConfig", "ModelConfig", "MoEConfig", "OptimConfig", "OutputConfig", "TrainConfig",
    "from_dict", "to_dict",
]
