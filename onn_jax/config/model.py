"""model.*: the transformer around the gated units."""
from __future__ import annotations

from dataclasses import dataclass, field

from onn_jax.config.errors import check, choice, positive_int
from onn_jax.config.moe import MoEConfig
from onn_jax.config.units import EmbedConfig, HeadsConfig, OutputConfig

NORMS = ("layernorm", "rmsnorm")


DTYPES = ("float32", "bfloat16")


ATTENTIONS = ("xla", "cudnn", "auto")


REMATS = ("none", "block", "dots")


@dataclass(frozen=True)
class ModelConfig:
    """The transformer around the MoE layer (faithful PoC numerics by default).

    attention: how training computes causal attention: `xla` (default: explicit einsums
      with float32 scores), `cudnn` (jax.nn.dot_product_attention's fused cuDNN flash
      attention; CUDA GPUs, bfloat16) or `auto` (cudnn where a CUDA GPU runs a bfloat16
      model with a supported head dim, else xla). Decoding with a KV cache always uses xla.
    remat: rematerialisation of each block in the backward pass (jax.checkpoint via nn.remat):
      `none` (default: keep every activation), `block` (keep only each block's input) or
      `dots` (keep matmul outputs without batch dims: jax.checkpoint_policies.dots_with_no_batch_dims_saveable).
    scan_layers: the blocks as one nn.scan over stacked parameters (params["blocks"], leaves
      [L, ...]; onn_jax.nn.layer_stack converts to / from the per-layer block_i layout). Same values,
      one compiled block. Refused with the router-state options (aux_free_rate, adaptive_experts).
    output: the output layer, `dense` LM head (default) or adaptive softmax (OutputConfig).
    """

    vocab_size: int = 256
    hidden: int = 32
    num_layers: int = 1
    num_heads: int = 4
    max_len: int = 256
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    final_norm: bool = False
    dtype: str = "float32"
    attention: str = "xla"
    moe: MoEConfig = field(default_factory=MoEConfig)
    remat: str = "none"
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    scan_layers: bool = False
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        p = "model."
        choice(self.remat, REMATS, p + "remat")
        _check_scan_layers(self)
        for name in ("vocab_size", "hidden", "num_layers", "num_heads", "max_len"):
            positive_int(getattr(self, name), p + name)
        check(self.hidden % self.num_heads == 0, p + "num_heads",
               f"must divide hidden ({self.hidden}), got {self.num_heads}")
        check((self.hidden // self.num_heads) % 2 == 0, p + "num_heads",
               f"head dim hidden/num_heads = {self.hidden // self.num_heads} must be even for RoPE")
        choice(self.norm, NORMS, p + "norm")
        check(isinstance(self.norm_eps, float) and self.norm_eps > 0, p + "norm_eps",
               f"must be a float > 0, got {self.norm_eps!r}")
        check(isinstance(self.rope_base, (int, float)) and self.rope_base > 1, p + "rope_base",
               f"must be > 1, got {self.rope_base!r}")
        check(isinstance(self.final_norm, bool), p + "final_norm",
               f"must be a bool, got {self.final_norm!r}")
        choice(self.dtype, DTYPES, p + "dtype")
        choice(self.attention, ATTENTIONS, p + "attention")
        if self.attention == "cudnn":
            check(self.dtype == "bfloat16", p + "attention",
                   f"'cudnn' (fused flash attention) needs dtype='bfloat16', got dtype={self.dtype!r}")
            check(self.head_dim % 8 == 0 and self.head_dim <= 128, p + "attention",
                   f"'cudnn' needs a head dim (hidden/num_heads) that is a multiple of 8 and <= 128, "
                   f"got {self.head_dim}")
        check(isinstance(self.moe, MoEConfig), p + "moe", "must be a MoEConfig")
        check(isinstance(self.heads, HeadsConfig), p + "heads", "must be a HeadsConfig")
        self.heads.check_against(self.num_heads)
        check(isinstance(self.embed, EmbedConfig), p + "embed", "must be an EmbedConfig")
        check(isinstance(self.output, OutputConfig), p + "output", "must be an OutputConfig")
        self.output.check_against(self.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


def _check_scan_layers(c: "ModelConfig") -> None:
    """model.scan_layers: a bool; the options that key per-layer state by block_i are refused."""
    check(isinstance(c.scan_layers, bool), "model.scan_layers", f"must be a bool, got {c.scan_layers!r}")
    if not c.scan_layers:
        return
    why = "is not supported with model.scan_layers=true (it keys per-layer state by block_i); "
    check(c.moe.aux_free_rate == 0, "model.moe.aux_free_rate", why + "use 0")
    check(not c.moe.adaptive_experts, "model.moe.adaptive_experts", why + "use false")
