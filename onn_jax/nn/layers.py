"""Flax Linen layers of one transformer block: norm, attention (dense or gated heads),
the MoE feed-forward (or the dense FFN baseline) and the block itself, with its remat forms.

The modules only create parameters and call the pure functions of onn_jax.nn.moe,
onn_jax.nn.heads and onn_jax.core, so `model.apply` stays a pure function of
(params, tokens, taps).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig
from onn_jax.core.experts import dense_ffn
from onn_jax.nn.attention import KVCache, apply_rope, attention_impl, causal_attention, compute_dtype, write_positions
from onn_jax.nn.embed import deep_scale
from onn_jax.nn.embed_layers import deep_embed_table
from onn_jax.nn.heads import HeadGradNorms, head_layer
from onn_jax.nn.inits import stacked_linear_init, torch_linear_init
from onn_jax.nn.moe import MoETaps, moe_layer


class Norm(nn.Module):
    """LayerNorm or RMSNorm computed in float32, the result in x's dtype.

    The conversion to float32 and the normalisation run under nn.remat (jax.checkpoint): the
    backward keeps only x (in its own dtype) and recomputes the rest, instead of three float32
    [B, T, C] arrays per norm. Same parameters and math; XLA may order the float32 reductions
    of the recomputation differently, so a step's gradients agree to rounding (float32: within
    4e-7 relative; bfloat16: the odd last-bit flip)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        if self.cfg.norm == "layernorm":
            # Two-pass variance, as PyTorch's LayerNorm (Flax's fast E[x^2]-E[x]^2 loses
            # precision when a token's mean is large against its spread).
            norm = nn.LayerNorm(epsilon=self.cfg.norm_eps, dtype=jnp.float32, use_fast_variance=False, name="ln")
        else:
            norm = nn.RMSNorm(epsilon=self.cfg.norm_eps, dtype=jnp.float32, name="rms")
        y = nn.remat(lambda mdl, x: mdl(x.astype(jnp.float32)))(norm, x)
        return y.astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxC, positions_BxT, cache: KVCache | None = None, kv_valid_BxS=None,
                 index_positions: bool = False, taps: MoETaps | None = None):
        """Output [B, T, C]; with a cache, (output, cache with this call's keys/values written).

        `index_positions`: positions are 0..T-1 in every row, so causality by index equals
        causality by position and the fused attention (cfg.attention) may be used.
        With gated heads (cfg.heads.router != dense) the heads are combined by onn_jax.nn.heads,
        `taps` are its zero taps, and the layer's record is sown as ("gated", "heads").
        """
        cfg, dt = self.cfg, compute_dtype(self.cfg)
        proj = lambda name: nn.DenseGeneral((cfg.num_heads, cfg.head_dim), use_bias=False, dtype=dt,
                                            kernel_init=torch_linear_init, name=name)
        q = apply_rope(proj("query")(x_BxTxC), positions_BxT, cfg.rope_base)
        k = apply_rope(proj("key")(x_BxTxC), positions_BxT, cfg.rope_base)
        v = proj("value")(x_BxTxC)
        if cache is None and index_positions and attention_impl(cfg) == "cudnn":
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        elif cache is None:
            o = causal_attention(q, k, v, positions_BxT, positions_BxT)
        else:
            cache = KVCache(write_positions(cache.key, k, positions_BxT),
                            write_positions(cache.value, v, positions_BxT))
            b, s = kv_valid_BxS.shape
            kv_pos_BxS = jnp.broadcast_to(jnp.arange(s), (b, s))
            o = causal_attention(q, cache.key, cache.value, positions_BxT, kv_pos_BxS, kv_valid_BxS)
        if cfg.heads.gated:
            out = self.gated_heads(x_BxTxC, q, k, v, o, positions_BxT, cache, kv_valid_BxS, taps)
            return out if cache is None else (out, cache)
        out = nn.DenseGeneral(cfg.hidden, axis=(-2, -1), use_bias=False, dtype=dt,
                              kernel_init=torch_linear_init, name="out")(o)
        return out if cache is None else (out, cache)

    def gated_heads(self, x_BxTxC, q, k, v, o_BxTxHxD, positions_BxT, cache, kv_valid_BxS, taps):
        """The gated combine of onn_jax.nn.heads (its parameters live here; W_out keeps its path)."""
        cfg, hc = self.cfg, self.cfg.heads
        b, t, c = x_BxTxC.shape
        h = cfg.num_heads
        params = {"out": HeadOut((h, cfg.head_dim, c), name="out")()}
        if hc.router == "surprise":
            params["head_prototypes"] = self.param("head_prototypes", nn.initializers.normal(1.0), (c, h))
            params["head_thresholds"] = self.param("head_thresholds", nn.initializers.zeros, (h,))
        else:
            params["head_router"] = self.param("head_router", torch_linear_init, (c, h))
        if cache is None:
            kv_pos_BxS, kv_valid = positions_BxT, None
        else:
            k, v = cache.key, cache.value
            kv_pos_BxS, kv_valid = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2]), kv_valid_BxS
        attn_NxHxD = o_BxTxHxD.reshape(b * t, h, cfg.head_dim)
        norms = HeadGradNorms(q, k, v, positions_BxT, kv_pos_BxS, kv_valid, params["out"],
                              jnp.ones((b * t,), jnp.float32), attn_NxHxD)
        out_NxC, record = head_layer(params, x_BxTxC.reshape(b * t, c), attn_NxHxD, hc, taps, norms)
        self.sow("gated", "heads", record)
        return out_NxC.astype(x_BxTxC.dtype).reshape(b, t, c)


class HeadOut(nn.Module):
    """W_out [H, D, C] at the dense path's place (attn/out/kernel) and with its init."""

    shape: tuple[int, int, int]

    @nn.compact
    def __call__(self):
        def init(rng, shape, dtype=jnp.float32):  # as nn.DenseGeneral: PyTorch Linear, fan_in H * D
            h, d, c = shape
            return torch_linear_init(rng, (h * d, c), dtype).reshape(shape)
        return self.param("kernel", init, self.shape)


class Experts(nn.Module):
    """Holds the stacked expert weights w1 [E, C, I], w2 [E, I, C] (w3 for SwiGLU)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self):
        m, c = self.cfg.moe, self.cfg.hidden
        params = {"w1": self.param("w1", stacked_linear_init(1, 2), (m.num_experts, c, m.intermediate)),
                  "w2": self.param("w2", stacked_linear_init(1, 2), (m.num_experts, m.intermediate, c))}
        if m.expert_kind == "swiglu":
            params["w3"] = self.param("w3", stacked_linear_init(1, 2), (m.num_experts, c, m.intermediate))
        return params


class MoEFeedForward(nn.Module):
    """Parameter holder for moe_layer (or the dense FFN baseline)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxC, taps: MoETaps | None = None):
        cfg, m = self.cfg, self.cfg.moe
        b, t, c = x_BxTxC.shape
        x_NxC = x_BxTxC.reshape(b * t, c)
        if m.router == "dense":
            width = m.intermediate * m.top_k
            ffn = {"w1": self.param("ffn_w1", torch_linear_init, (c, width)),
                   "w2": self.param("ffn_w2", torch_linear_init, (width, c))}
            if m.expert_kind == "swiglu":
                ffn["w3"] = self.param("ffn_w3", torch_linear_init, (c, width))
            return dense_ffn(ffn, x_NxC, m.expert_kind).reshape(b, t, c), None
        params = {"experts": Experts(cfg, name="experts")()}
        if m.router == "surprise":
            params["prototypes"] = self.param("prototypes", nn.initializers.normal(1.0), (c, m.num_experts))
            params["thresholds"] = self.param("thresholds", nn.initializers.zeros, (m.num_experts,))
        else:
            params["router"] = self.param("router", torch_linear_init, (c, m.num_experts))
        params.update(self._router_state())
        out_NxC, record = moe_layer(params, x_NxC, m, taps)
        if m.shared_expert:  # always-on expert, outside the gate (issue 16)
            shared = {w: self.param(f"shared_{w}", torch_linear_init, shape) for w, shape in
                      (("w1", (c, m.intermediate)), ("w2", (m.intermediate, c)), ("w3", (c, m.intermediate)))
                      if w != "w3" or m.expert_kind == "swiglu"}
            out_NxC = out_NxC + dense_ffn(shared, x_NxC, m.expert_kind).astype(jnp.float32)
        return out_NxC.astype(x_BxTxC.dtype).reshape(b, t, c), record


    def _router_state(self) -> dict:
        """The router state the forward reads (onn_jax.training.options.router_state.FORWARD_KEYS), which the
        caller merges into this module's params (TrainState.model_params); absent at init."""
        m, keys = self.cfg.moe, []
        if m.aux_free_rate > 0:
            keys.append("router_bias")
        if m.adaptive_experts:
            keys.append("live")
        out = {}
        for key in keys:
            if self.has_variable("params", key):
                out[key] = self.get_variable("params", key)
            elif not self.is_initializing():
                raise ValueError(f"model.moe: this model routes with router state {key!r}; apply it to "
                                 "TrainState.model_params (params + router state), not to the params alone")
        return out


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxC, positions_BxT, taps: MoETaps | None = None,
                 cache: KVCache | None = None, kv_valid_BxS=None, index_positions: bool = False,
                 head_taps: MoETaps | None = None, tokens_BxT=None):
        """(output, MoE record), plus the updated KVCache when a cache is given.

        With model.embed.deep the MoE output is scaled by this block's DeepEmbed row of each token.
        """
        attn = Attention(self.cfg, name="attn")(Norm(self.cfg, name="norm_attn")(x_BxTxC), positions_BxT,
                                                cache, kv_valid_BxS, index_positions, head_taps)
        if cache is not None:
            attn, cache = attn
        h = x_BxTxC + attn
        moe_out, record = MoEFeedForward(self.cfg, name="moe")(Norm(self.cfg, name="norm_moe")(h), taps)
        if self.cfg.embed.deep:
            moe_out = moe_out * deep_scale(deep_embed_table(self, self.cfg), tokens_BxT).astype(moe_out.dtype)
        return (h + moe_out, record) if cache is None else (h + moe_out, record, cache)


REMAT_POLICIES = {"block": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_block(remat: str, cls=Block):
    """Block, or Block under nn.remat (jax.checkpoint) for model.remat = `block` (keep only the
    block's input) or `dots` (keep matmul outputs without batch dims). Same values, same
    parameter tree; the backward recomputes what was not kept."""
    if remat == "none":
        return cls
    # argnums count the module as 0: (self, x, positions, taps, cache, kv_valid, index_positions)
    return nn.remat(cls, policy=REMAT_POLICIES[remat], static_argnums=(6,))


class ScanBlock(Block):
    """Block in nn.scan's form (carry, per-layer outputs): (x, (record,)) or (x, (record, cache))."""

    def __call__(self, x_BxTxC, positions_BxT, taps=None, cache=None, kv_valid_BxS=None,
                 index_positions=False, head_taps=None, tokens_BxT=None):
        out = Block.__call__(self, x_BxTxC, positions_BxT, taps, cache, kv_valid_BxS, index_positions,
                             head_taps, tokens_BxT)
        return out[0], out[1:]
