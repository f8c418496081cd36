"""The pure math of the algorithm: functions of arrays and parameter pytrees, nothing else.

gate (routers), experts, losses, surprise (+ variants, registry), gate_targets, grad_filter,
optimizer (per-expert AdamW), analysis, routing_metrics, contracts (chex checks). No Flax, no
orbax, no config object, nothing else of onn_jax (an import-linter contract); every module of
the library may use it.
"""
