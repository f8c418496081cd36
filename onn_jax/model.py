"""Flax Linen modules: embedding, pre-norm causal attention with RoPE, MoE layer, LM head.

The modules only create parameters and call the pure functions of onn_jax.moe / gate /
experts, so `model.apply` is itself a pure function of (params, tokens, taps) that
`jax.vjp` can differentiate with respect to the Surprise taps.

Parameter layout (what onn_jax.sharding and the expert filter key on):
  embed/embedding [V, C]
  block_i/attn/{query,key,value}/kernel [C, H, D], block_i/attn/out/kernel [H, D, C]
  block_i/attn/{head_prototypes [C, H], head_thresholds [H]} or head_router [C, H] (gated heads)
  block_i/{norm_attn,norm_moe}/{scale,bias}
  block_i/moe/{prototypes [C, E], thresholds [E]} or router [C, E]
  block_i/moe/experts/{w1 [E, C, I], w2 [E, I, C], w3 [E, C, I] for SwiGLU}
  block_i/moe/ffn/{w1, w2, w3} for the dense baseline
  lm_head/kernel [C, V]; model.output.kind = adaptive instead: output/head [C, c_1 + n],
  output/tail_i/{proj [C, d_i], out [d_i, V_i]} (onn_jax.output)
  model.embed options: embed/{codes, slot_prototypes, slot_thresholds, slots} (slots),
  ngram/{tables, key, value, norm_key, norm_query}, block_i/deep_embed [V, C]
  model.scan_layers: every block_i/... leaf stacked as blocks/... [L, ...] (onn_jax.layer_stack)

Decoding (onn_jax.generate) passes a `DecodeCache` (keys/values of every layer at absolute
positions, static shape [B, S, H, D], and a [B, S] mask of the slots holding real tokens);
the call then also returns the updated cache. Without a cache nothing changes.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from onn_jax.config import ConfigError, ModelConfig
from onn_jax.experts import dense_ffn
from onn_jax.embed import deep_scale
from onn_jax.embed_layers import NgramMemory, SlotEmbed, deep_embed_table
from onn_jax.heads import HeadGradNorms, head_layer
from onn_jax.moe import MoETaps, moe_layer, zero_taps
from onn_jax.output import AdaptiveOutput

# PyTorch nn.Linear's default init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def stacked_linear_init(in_axis: int, out_axis: int):
    """PyTorch-Linear init for weights stacked over a leading expert axis."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                            in_axis=in_axis, out_axis=out_axis, batch_axis=(0,))


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def apply_rope(x_BxTxHxD: jax.Array, positions_BxT: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding (rotate-half form), computed in float32."""
    half = x_BxTxHxD.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions_BxT.astype(jnp.float32)[..., None] * freqs  # [B, T, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x = x_BxTxHxD.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxD.dtype)


def causal_attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, q_pos_BxT, kv_pos_BxS, kv_valid_BxS=None):
    """Softmax attention scaled by 1/sqrt(D); query t sees keys with position <= its own."""
    scale = q_BxTxHxD.shape[-1] ** -0.5
    scores = jnp.einsum("bthd,bshd->bhts", q_BxTxHxD, k_BxSxHxD,
                        preferred_element_type=jnp.float32) * scale
    allowed = kv_pos_BxS[:, None, None, :] <= q_pos_BxT[:, None, :, None]
    if kv_valid_BxS is not None:
        allowed = allowed & kv_valid_BxS[:, None, None, :]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxHxD.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v_BxSxHxD)


def cuda_backend() -> bool:
    """Whether jax's default backend is a CUDA GPU (where cuDNN attention exists)."""
    if jax.default_backend() != "gpu":
        return False
    try:
        return "cuda" in jax.devices()[0].client.platform_version.lower()
    except Exception:  # an unknown client: assume no cuDNN
        return False


def attention_impl(cfg: ModelConfig) -> str:
    """The training attention in force, `xla` or `cudnn`, for cfg.attention on this backend.

    Raises ConfigError (field model.attention) when `cudnn` is asked for and no CUDA GPU runs.
    """
    if cfg.attention == "xla":
        return "xla"
    cudnn_fits = cfg.dtype == "bfloat16" and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128
    if cfg.attention == "auto":
        return "cudnn" if cudnn_fits and cuda_backend() else "xla"
    if not cuda_backend():
        raise ConfigError("model.attention", f"'cudnn' needs a CUDA GPU; jax's backend here is "
                                             f"{jax.default_backend()!r} (use 'auto' or 'xla')")
    return "cudnn"


class KVCache(NamedTuple):
    """One attention layer's keys and values, indexed by absolute position: [B, S, H, D]."""

    key: jax.Array
    value: jax.Array


class DecodeCache(NamedTuple):
    """Every layer's KVCache and which slots hold real tokens (valid [B, S] bool)."""

    layers: tuple[KVCache, ...]
    valid: jax.Array
    tokens: jax.Array | None = None  # [B, S] ids by position (the n-gram memory's history)


def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> DecodeCache:
    """An empty decode cache for `length` positions (zeros, no valid slot)."""
    shape = (batch_size, length, cfg.num_heads, cfg.head_dim)
    dt = compute_dtype(cfg)
    layers = tuple(KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(cfg.num_layers))
    tokens = jnp.zeros((batch_size, length), jnp.int32) if cfg.embed.ngram else None
    return DecodeCache(layers=layers, valid=jnp.zeros((batch_size, length), jnp.bool_), tokens=tokens)


def write_positions(cache_BxSx: jax.Array, new_BxTx: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    """cache[b, positions[b, t]] = new[b, t] (per-row positions, so rows may differ)."""
    rows_Bx1 = jnp.arange(cache_BxSx.shape[0])[:, None]
    return cache_BxSx.at[rows_Bx1, positions_BxT].set(new_BxTx.astype(cache_BxSx.dtype))


class Norm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        if self.cfg.norm == "layernorm":
            # Two-pass variance, as PyTorch's LayerNorm (Flax's fast E[x^2]-E[x]^2 loses
            # precision when a token's mean is large against its spread).
            y = nn.LayerNorm(epsilon=self.cfg.norm_eps, dtype=jnp.float32, use_fast_variance=False,
                             name="ln")(x.astype(jnp.float32))
        else:
            y = nn.RMSNorm(epsilon=self.cfg.norm_eps, dtype=jnp.float32, name="rms")(x.astype(jnp.float32))
        return y.astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxC, positions_BxT, cache: KVCache | None = None, kv_valid_BxS=None,
                 index_positions: bool = False, taps: MoETaps | None = None):
        """Output [B, T, C]; with a cache, (output, cache with this call's keys/values written).

        `index_positions`: positions are 0..T-1 in every row, so causality by index equals
        causality by position and the fused attention (cfg.attention) may be used.
        With gated heads (cfg.heads.router != dense) the heads are combined by onn_jax.heads,
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
        """The gated combine of onn_jax.heads (its parameters live here; W_out keeps its path)."""
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
        """The router state the forward reads (onn_jax.router_state.FORWARD_KEYS), which the
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


def scanned_blocks(cfg: ModelConfig, x, positions_BxT, taps, cache, kv_valid_BxS, index_positions,
                   tokens_BxT, head_taps=None):
    """model.scan_layers: the blocks as one nn.scan named `blocks` (parameters [L, ...], one
    compiled block). Per-layer taps / caches are stacked in, per-layer records / caches are
    unstacked out, so the caller sees the tuples of the unrolled loop; gated heads' records are
    sown stacked (gated/blocks/attn/heads, read by onn_jax.units.unit_records). Call inside a
    compact method."""
    from onn_jax.layer_stack import stack_tree, unstack_records
    decode = cache is not None
    cls = ScanBlock if decode else remat_block(cfg.remat, ScanBlock)
    b, bc = nn.broadcast, (0 if decode else nn.broadcast)
    scan = nn.scan(cls, variable_axes={"params": 0, "gated": 0}, split_rngs={"params": True},
                   in_axes=(b, 0 if taps is not None else b, bc, b, b, 0 if head_taps is not None else b, b),
                   length=cfg.num_layers)
    layer_taps = None if taps is None else stack_tree(taps)
    layer_head_taps = None if head_taps is None else stack_tree(head_taps)
    layer_cache = stack_tree(cache.layers) if decode else None
    x, outs = scan(cfg, name="blocks")(x, positions_BxT, layer_taps, layer_cache, kv_valid_BxS,
                                       index_positions, layer_head_taps, tokens_BxT)
    per_layer = unstack_records(outs, cfg.num_layers)
    records = [o[0] for o in per_layer]
    new_layers = [o[1] for o in per_layer] if decode else []
    return x, records, new_layers


class Transformer(nn.Module):
    """The LM: tokens [B, T] -> (logits [B, T, V] float32, per-layer MoE records).

    Decoding: with `cache` (a DecodeCache) the tokens are written at `positions_BxT`
    (absolute, per row) and attend to every valid cached slot at or before their position;
    `tokens_valid_BxT` (default all True) marks padding that later tokens must not see.
    The call then returns (logits, records, updated cache).

    `unit_taps` (onn_jax.units.UnitTaps) are the zero taps of the gated units beyond the MoE
    (attention heads, slot embedding); their records are sown in the "gated" collection (apply with
    mutable=["gated"] to get them; onn_jax.units.unit_records reads them).

    model.output.kind = adaptive: the first output is log p(v) [B, T, V] (onn_jax.output), which
    are valid logits. `return_hidden`: return the final hidden states [B, T, C] instead of logits
    (the training loss applies the output layer itself, onn_jax.output.output_loss).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, taps: Sequence[MoETaps] | None = None, positions_BxT=None,
                 cache: DecodeCache | None = None, tokens_valid_BxT=None, unit_taps=None,
                 return_hidden: bool = False):
        cfg = self.cfg
        if return_hidden and cache is not None:
            raise ValueError("return_hidden is for the forward without a decode cache")
        index_positions = positions_BxT is None and cache is None
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        kv_valid_BxS, new_layers = None, []
        if cache is not None:
            if tokens_valid_BxT is None:
                tokens_valid_BxT = jnp.ones(tokens_BxT.shape, jnp.bool_)
            kv_valid_BxS = write_positions(cache.valid, tokens_valid_BxT, positions_BxT)
        if cfg.embed.kind == "slots":
            x = SlotEmbed(cfg, name="embed")(tokens_BxT, None if unit_taps is None else unit_taps.embed)
        else:
            x = nn.Embed(cfg.vocab_size, cfg.hidden, embedding_init=nn.initializers.normal(1.0),
                         name="embed")(tokens_BxT)
        history_BxS = None
        if cfg.embed.ngram:
            if cache is not None:
                history_BxS = write_positions(cache.tokens, tokens_BxT, positions_BxT)
            x = x + NgramMemory(cfg, name="ngram")(tokens_BxT, x, history_BxS,
                                                   None if cache is None else positions_BxT)
        x = x.astype(compute_dtype(cfg))
        records = []
        block_cls = remat_block(cfg.remat) if cache is None else Block
        if cfg.scan_layers:  # one nn.scan over stacked parameters (params["blocks"], [L, ...])
            all_head_taps = None if unit_taps is None else unit_taps.heads
            x, records, new_layers = scanned_blocks(cfg, x, positions_BxT, taps, cache, kv_valid_BxS,
                                                    index_positions, tokens_BxT, all_head_taps)
        for i in range(0 if cfg.scan_layers else cfg.num_layers):
            block = block_cls(cfg, name=f"block_{i}")
            layer_taps = None if taps is None else taps[i]
            head_taps = None if unit_taps is None or unit_taps.heads is None else unit_taps.heads[i]
            if cache is None:  # positional: index_positions is a static argument of nn.remat
                x, record = block(x, positions_BxT, layer_taps, None, None, index_positions,
                                  head_taps, tokens_BxT)
            else:
                x, record, layer_cache = block(x, positions_BxT, layer_taps, cache.layers[i], kv_valid_BxS,
                                               tokens_BxT=tokens_BxT)
                new_layers.append(layer_cache)
            records.append(record)
        if cfg.final_norm:
            x = Norm(cfg, name="final_norm")(x)
        if return_hidden:  # the loss applies the head itself (onn_jax.output.output_loss)
            return x, tuple(records)
        if cfg.output.kind == "adaptive":  # log-probabilities: valid logits for CE, sampling, argmax
            logits = AdaptiveOutput(cfg, name="output")(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=compute_dtype(cfg),
                              kernel_init=torch_linear_init, name="lm_head")(x)
        if cache is None:
            return logits.astype(jnp.float32), tuple(records)
        return logits.astype(jnp.float32), tuple(records), DecodeCache(tuple(new_layers), kv_valid_BxS,
                                                                       history_BxS)


def model_taps(cfg: ModelConfig, batch_size: int, seq_len: int) -> tuple[MoETaps, ...] | None:
    """Zero Surprise taps for every MoE layer, or None for the dense baseline."""
    if cfg.moe.router == "dense":
        return None
    return tuple(zero_taps(batch_size * seq_len, cfg.moe.num_experts, cfg.hidden)
                 for _ in range(cfg.num_layers))


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int | None = None) -> dict:
    """Initial parameters (a plain nested dict of float32 arrays)."""
    tokens = jnp.zeros((1, seq_len or min(cfg.max_len, 8)), jnp.int32)
    if cfg.scan_layers:  # the per-layer init, stacked: the same numbers as scan_layers = false
        from onn_jax.layer_stack import stack_layers
        import dataclasses
        return stack_layers(Transformer(dataclasses.replace(cfg, scan_layers=False)).init(rng, tokens)["params"])
    return Transformer(cfg).init(rng, tokens)["params"]
