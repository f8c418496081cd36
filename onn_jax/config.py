"""Frozen, validated configuration dataclasses for the model, the MoE layer and the optimizer.

Every field has the faithful default of docs/ALGORITHM.md unless its docstring says
otherwise. Validation happens at construction time and raises `ConfigError`, which names
the offending field by its dotted path so the training program can point at the source.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

ROUTERS = ("surprise", "topk", "dense")
EXPERT_KINDS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "bfloat16")
FILTER_MODES = ("one_sided", "two_sided", "off")
FILTER_SCOPES = ("pooled", "per_layer")
DISPATCHES = ("dense", "sparse", "dropless")
GEMMS = ("auto", "ragged_dot", "mosaic_gpu", "padded")
TOKEN_SUMS = ("auto", "loop", "pallas")  # onn_jax.token_sums
GATE_TOKENS = ("all", "unmasked")
MOE_GATE_TOKENS = GATE_TOKENS + ("nonconstant",)  # `nonconstant`: MoE gate only (issue 16)
GATE_TIE_BREAKS = ("low_index", "random")
ATTENTIONS = ("xla", "cudnn", "auto")
SCHEDULES = ("constant", "warmup_cosine", "wsd", "linear")
REMATS = ("none", "block", "dots")
IDLE_EXPERTS = ("skip", "zero_grad")


class ConfigError(ValueError):
    """A configuration value is invalid. `field` is the dotted path of the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(field_name, message)


def _positive_int(value: Any, name: str) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool), name,
           f"must be an integer, got {type(value).__name__} {value!r}")
    _check(value > 0, name, f"must be > 0, got {value}")


def _nonneg_float(value: Any, name: str) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool), name,
           f"must be a number, got {type(value).__name__} {value!r}")
    _check(value >= 0, name, f"must be >= 0, got {value}")


def _choice(value: Any, choices: tuple[str, ...], name: str) -> None:
    _check(value in choices, name, f"must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class MoEConfig:
    """The MoE feed-forward layer: router kind, experts and the gate losses.

    router: `surprise` (faithful top-any gate trained by the Surprise hybrid loss),
      `topk` (linear router, top_k experts, Switch load-balancing loss) or `dense`
      (a plain FFN whose width equals top_k experts).
    fallback_k: experts activated for a token with none active; None means E // 2.
    w_ce, w_kl: weights of the hard (CE to argmin S) and soft (KL) gate targets.
    w_aux: weight of the summed per-layer gate losses in the total loss.
    surprise: name of the surprise definition (see onn_jax.surprise.SURPRISE_FNS).
    lb_weight, z_weight: Switch load-balancing and router z-loss weights (topk router).
    dispatch: `dense` (faithful reference: every expert on every token) or `sparse`
      (only active pairs, within a per-expert capacity; see onn_jax.dispatch).
    gate_tokens: tokens the Surprise gate loss averages over: `all` (faithful) or `unmasked`
      (only positions whose label counts in the main loss; masked ones have g = 0 on top).
    capacity_factor: sparse capacity per expert = ceil(capacity_factor * N * k_ref / E), with
      k_ref = top_k for the top-k router and fallback_k (E // 2) for the surprise gate (see
      onn_jax.dispatch.expert_capacity); None means no pair is ever dropped (capacity N).
    pair_budget: dropless dispatch (`dispatch="dropless"`, onn_jax.dropless): rows of the
      expert-sorted pair buffer per token on average, ceil(pair_budget * N) rows for the batch.
      At num_experts nothing can drop; beyond the budget the pairs of the batch's last tokens
      (token-major order) are dropped and counted in moe/dropped_frac. None: top_k for the top-k
      router (never drops), fallback_k (E // 2) for the surprise gate (every token's k at
      initialisation; avg_k falls while training).
    gemm: grouped-GEMM backend of the dropless experts (onn_jax.grouped_gemm): `ragged_dot`
      (jax.lax.ragged_dot, portable), `mosaic_gpu` (the Pallas Mosaic GPU kernels in jax,
      Hopper only), `padded` (a masked einsum per expert: a slow exact reference) or `auto`
      (mosaic_gpu on a Hopper GPU, else ragged_dot).
    token_sum: the dropless layer's deterministic per-token sums (combine, and the dispatch's
      backward; onn_jax.token_sums): `loop` (one pass over an [N, C] accumulator per j < max k,
      portable), `pallas` (one Pallas Triton kernel reading each row once, NVIDIA GPUs) or
      `auto` (pallas on an NVIDIA GPU, else loop). Same sums in the same order either way.
    ep_budget: dropless dispatch on a mesh of several devices (onn_jax.expert_parallel; ep =
      mesh.expert, 1 for data parallelism): each device sends at most ceil(ep_budget * n) rows
      to each expert-parallel peer (n = its tokens; at ep = 1 its own row buffer); a peer's
      pairs beyond that are dropped (the device's last tokens first) and counted in
      moe/dropped_frac. None means min(pair budget, num_experts / ep), which adds no drop for
      ep > 1 when pair_budget is its default (top_k, or fallback_k for the surprise gate); at
      ep = 1 a device whose tokens need more than pair_budget rows each on average overflows
      (num_experts never does).

    Research options (issue 16, docs/RESEARCH.md; the defaults are the faithful model):
    aux_free_rate: aux-loss-free balancing of the top-k router (0 = off): a per-expert bias, added
      to the scores for selection only, moves by rate * sign(mean load - load) after every step
      (onn_jax.router_state; kept in TrainState.router_state, outside the optimizer).
    shared_expert: add an always-on expert (a GELU/SwiGLU FFN of width `intermediate`) to the
      routed experts' output, for any router.
    adaptive_experts: DynMoE's adaptive expert count for the top-any gate (onn_jax.adaptive_experts):
      every `adaptive_every` steps experts with no hit in the window are masked out and one is
      added whose prototype is the normalised sum of the window's unrouted tokens (threshold 0);
      `adaptive_initial` experts are live at the start (None: all num_experts, the maximum).
    gate_tokens `nonconstant`: the gate loss averages over tokens whose S row is not constant.
    gate_tie_break: the hard target argmin S among tied minima: `low_index` (faithful, jnp.argmin)
      or `random` (uniform among the tied experts, a fresh draw per step and layer).
    kl_temperature: the soft target is softmax(-S / kl_temperature) (faithful 1).
    w_budget, budget_k: w_budget * (mean_t sum_e sigmoid(pre[t,e] / 0.1) - budget_k)^2 added to the
      gate loss, a differentiable pull of avg_k toward budget_k (0 = off).
    budget_fallback: the budget's count also charges a token with no expert above threshold its
      fallback_k experts (onn_jax.gate_targets.expected_k), as the gate does. Why: without it, at
      E = 32 the budget held the thresholded count near 2 while half the tokens took the E/2
      fallback (avg_k 9, docs/RESEARCH.md). Needs w_budget > 0; not with adaptive_experts.
    """

    num_experts: int = 32
    intermediate: int = 128
    expert_kind: str = "gelu"
    router: str = "surprise"
    fallback_k: int | None = None
    w_ce: float = 1.0
    w_kl: float = 1.0
    w_aux: float = 1.0
    surprise: str = "output_grad"
    top_k: int = 2
    lb_weight: float = 0.01
    z_weight: float = 0.0
    dispatch: str = "dense"
    capacity_factor: float | None = None
    gate_tokens: str = "all"
    pair_budget: float | None = None
    gemm: str = "auto"
    token_sum: str = "auto"
    ep_budget: float | None = None
    # --- research options (issue 16; docs/RESEARCH.md). Defaults leave the faithful model unchanged.
    aux_free_rate: float = 0.0
    shared_expert: bool = False
    adaptive_experts: bool = False
    adaptive_every: int = 100
    adaptive_initial: int | None = None
    gate_tie_break: str = "low_index"
    kl_temperature: float = 1.0
    w_budget: float = 0.0
    budget_k: float = 2.0
    budget_fallback: bool = False

    def __post_init__(self):
        p = "model.moe."
        _choice(self.gate_tokens, MOE_GATE_TOKENS, p + "gate_tokens")
        _choice(self.dispatch, DISPATCHES, p + "dispatch")
        _check(not (self.surprise == "advantage" and self.dispatch != "dense"), p + "surprise",
               "`advantage` needs every expert's output; it cannot run with "
               f"dispatch={self.dispatch!r}")
        _choice(self.gemm, GEMMS, p + "gemm")
        _choice(self.token_sum, TOKEN_SUMS, p + "token_sum")
        if self.capacity_factor is not None:
            _nonneg_float(self.capacity_factor, p + "capacity_factor")
            _check(self.capacity_factor > 0, p + "capacity_factor",
                   f"must be > 0, got {self.capacity_factor}")
        _positive_int(self.num_experts, p + "num_experts")
        _positive_int(self.intermediate, p + "intermediate")
        _choice(self.expert_kind, EXPERT_KINDS, p + "expert_kind")
        _choice(self.router, ROUTERS, p + "router")
        if self.fallback_k is not None:
            _positive_int(self.fallback_k, p + "fallback_k")
            _check(self.fallback_k <= self.num_experts, p + "fallback_k",
                   f"must be <= num_experts ({self.num_experts}), got {self.fallback_k}")
        _positive_int(self.top_k, p + "top_k")
        _check(self.top_k <= self.num_experts, p + "top_k",
               f"must be <= num_experts ({self.num_experts}), got {self.top_k}")
        for name in ("w_ce", "w_kl", "w_aux", "lb_weight", "z_weight"):
            _nonneg_float(getattr(self, name), p + name)
        from onn_jax.surprise import SURPRISE_FNS  # noqa: PLC0415 (keeps this module light)
        _check(isinstance(self.surprise, str) and self.surprise in SURPRISE_FNS, p + "surprise",
               f"must be one of {sorted(SURPRISE_FNS)} (onn_jax.surprise.SURPRISE_FNS), got {self.surprise!r}")
        if self.pair_budget is not None:
            _nonneg_float(self.pair_budget, p + "pair_budget")
            _check(0 < self.pair_budget <= self.num_experts, p + "pair_budget",
                   f"must be in (0, num_experts={self.num_experts}], got {self.pair_budget}")
        if self.ep_budget is not None:  # expert-parallel send budget (onn_jax.expert_parallel)
            _nonneg_float(self.ep_budget, p + "ep_budget")
            _check(0 < self.ep_budget <= self.num_experts, p + "ep_budget",
                   f"must be in (0, num_experts={self.num_experts}], got {self.ep_budget}")
        self._check_research_options()

    def _check_research_options(self) -> None:
        """Validation of the issue-16 options (aux-free balancing, shared expert, adaptive expert
        count, gate-loss variants); see the class docstring's last paragraph."""
        p = "model.moe."
        _nonneg_float(self.aux_free_rate, p + "aux_free_rate")
        _check(self.aux_free_rate == 0 or self.router == "topk", p + "aux_free_rate",
               f"aux-loss-free balancing is for router='topk', got router={self.router!r}")
        for name in ("shared_expert", "adaptive_experts", "budget_fallback"):
            _check(isinstance(getattr(self, name), bool), p + name, f"must be a bool, got {getattr(self, name)!r}")
        _check(not (self.shared_expert and self.router == "dense"), p + "shared_expert",
               "needs a router ('surprise' or 'topk'), got router='dense'")
        _check(not self.adaptive_experts or self.router == "surprise", p + "adaptive_experts",
               f"the adaptive expert count is for the top-any gate (router='surprise'), got {self.router!r}")
        _positive_int(self.adaptive_every, p + "adaptive_every")
        if self.adaptive_initial is not None:
            _positive_int(self.adaptive_initial, p + "adaptive_initial")
            _check(self.adaptive_initial <= self.num_experts, p + "adaptive_initial",
                   f"must be <= num_experts ({self.num_experts}), got {self.adaptive_initial}")
        _choice(self.gate_tie_break, GATE_TIE_BREAKS, p + "gate_tie_break")
        _nonneg_float(self.kl_temperature, p + "kl_temperature")
        _check(self.kl_temperature > 0, p + "kl_temperature", f"must be > 0, got {self.kl_temperature}")
        _nonneg_float(self.w_budget, p + "w_budget")
        _nonneg_float(self.budget_k, p + "budget_k")
        _check(self.w_budget == 0 or self.router == "surprise", p + "w_budget",
               f"the avg_k budget is for router='surprise', got {self.router!r}")
        _check(not self.budget_fallback or self.w_budget > 0, p + "budget_fallback",
               "counts the fallback in the avg_k budget: set model.moe.w_budget > 0")
        _check(not (self.budget_fallback and self.adaptive_experts), p + "budget_fallback",
               "is not available with adaptive_experts (the fallback size follows the live experts)")

    @property
    def effective_fallback_k(self) -> int:
        """The fallback size in force: fallback_k, or E // 2 (at least 1) by default."""
        if self.fallback_k is not None:
            return self.fallback_k
        return max(1, self.num_experts // 2)


# --- Phase 2, full-stack sparsity: gated attention heads (docs/FULL_STACK.md) ------------------

HEAD_ROUTERS = ("dense", "surprise", "topk")
HEAD_COMBINES = ("scaled", "softmax")


def _check_gate_fields(cfg, p: str) -> None:
    """The fields every Surprise-gated unit kind shares (MoE-style names, one meaning)."""
    _choice(cfg.gate_tokens, GATE_TOKENS, p + "gate_tokens")
    for name in ("w_ce", "w_kl", "w_aux"):
        _nonneg_float(getattr(cfg, name), p + name)
    _check(isinstance(cfg.surprise, str) and cfg.surprise != "", p + "surprise",
           f"must be the name of a surprise function, got {cfg.surprise!r}")
    if cfg.fallback_k is not None:
        _positive_int(cfg.fallback_k, p + "fallback_k")


@dataclass(frozen=True)
class HeadsConfig:
    """Gated attention heads (off by default: `router = dense` is plain multi-head attention).

    router: `dense` (every head, summed: faithful), `surprise` (the top-any gate of the MoE
      layer per query token over the H heads, trained by the Surprise hybrid loss) or `topk`
      (MoH-style baseline: linear router, top_k heads, Switch load balancing `lb_weight`).
    fallback_k: heads of a token with none above its threshold; None means H // 2.
    combine: `scaled` (MoH: out = k_t * sum_h w_h Y_h, k_t = active heads; all heads with
      w = 1/H is dense attention) or `softmax` (out = sum_h w_h Y_h).
    surprise, w_ce, w_kl, w_aux, gate_tokens: as in model.moe, for the head gate.
    """

    router: str = "dense"
    fallback_k: int | None = None
    combine: str = "scaled"
    surprise: str = "output_grad"
    w_ce: float = 1.0
    w_kl: float = 1.0
    w_aux: float = 1.0
    gate_tokens: str = "all"
    top_k: int = 2
    lb_weight: float = 0.01

    def __post_init__(self):
        p = "model.heads."
        _choice(self.router, HEAD_ROUTERS, p + "router")
        _choice(self.combine, HEAD_COMBINES, p + "combine")
        _check_gate_fields(self, p)
        _positive_int(self.top_k, p + "top_k")
        _nonneg_float(self.lb_weight, p + "lb_weight")

    def check_against(self, num_heads: int) -> None:
        p = "model.heads."
        if self.fallback_k is not None:
            _check(self.fallback_k <= num_heads, p + "fallback_k",
                   f"must be <= model.num_heads ({num_heads}), got {self.fallback_k}")
        _check(self.top_k <= num_heads, p + "top_k",
               f"must be <= model.num_heads ({num_heads}), got {self.top_k}")

    def effective_fallback_k(self, num_heads: int) -> int:
        """fallback_k, or H // 2 (at least 1) by default."""
        return self.fallback_k if self.fallback_k is not None else max(1, num_heads // 2)

    @property
    def gated(self) -> bool:
        return self.router != "dense"


EMBED_KINDS = ("table", "slots")
SLOT_SURPRISES = ("output_grad", "output_grad_closed", "advantage")


@dataclass(frozen=True)
class EmbedConfig:
    """Sparse embeddings (off by default: `kind = table`, `deep = false`, `ngram = 0`).

    kind: `table` (nn.Embed [V, C]: faithful) or `slots` (a learned code Z[id] [code_dim] ->
      the top-any gate over num_slots shared slot vectors -> their convex mix; trained by the
      Surprise hybrid loss, Surprise in closed form: `output_grad`/`output_grad_closed`
      S = w |g|, `advantage` A[t,m] = <g_t, slot_m - x0_t>; `learning_cost` is refused, every
      slot's would be |g_t|). fallback_k: slots of a token with none active; None means M // 2.
    surprise, w_ce, w_kl, w_aux, gate_tokens: as in model.moe, for the slot gate.
    deep: RWKV-8 DeepEmbed: each block's FFN output is scaled by a per-layer table D_l[id_t]
      [V, C] (init 1).
    ngram: 0 (off), 2 or 3: a hashed n-gram memory (Engram-style) added to the embedding,
      ngram_heads hash heads per order, ngram_buckets rows of width ngram_dim per head, a
      sigmoid context gate; works on bytes.
    """

    kind: str = "table"
    num_slots: int = 256
    code_dim: int = 16
    fallback_k: int | None = None
    surprise: str = "advantage"
    w_ce: float = 1.0
    w_kl: float = 1.0
    w_aux: float = 1.0
    gate_tokens: str = "all"
    deep: bool = False
    ngram: int = 0
    ngram_buckets: int = 16384
    ngram_heads: int = 2
    ngram_dim: int = 32

    def __post_init__(self):
        p = "model.embed."
        _choice(self.kind, EMBED_KINDS, p + "kind")
        _check_gate_fields(self, p)
        if self.kind == "slots":
            _check(self.surprise in SLOT_SURPRISES, p + "surprise",
                   f"slots take their Surprise in closed form: one of {list(SLOT_SURPRISES)}, got "
                   f"{self.surprise!r} (`learning_cost` would be |g_t| for every slot)")
        for name in ("num_slots", "code_dim", "ngram_buckets", "ngram_heads", "ngram_dim"):
            _positive_int(getattr(self, name), p + name)
        if self.fallback_k is not None:
            _check(self.fallback_k <= self.num_slots, p + "fallback_k",
                   f"must be <= num_slots ({self.num_slots}), got {self.fallback_k}")
        _check(isinstance(self.deep, bool), p + "deep", f"must be a bool, got {self.deep!r}")
        _check(self.ngram in (0, 2, 3) and not isinstance(self.ngram, bool), p + "ngram",
               f"must be 0, 2 or 3, got {self.ngram!r}")

    @property
    def effective_fallback_k(self) -> int:
        return self.fallback_k if self.fallback_k is not None else max(1, self.num_slots // 2)

    @property
    def gated(self) -> bool:
        return self.kind == "slots"


# --- Phase 2: sparse output, adaptive softmax (docs/FULL_STACK.md, onn_jax/output.py) ----------

OUTPUT_KINDS = ("dense", "adaptive")


def _int_tuple(cfg, name: str, p: str) -> tuple:
    """cfg.name as a tuple of ints (lists from config files / JSON become tuples)."""
    v = getattr(cfg, name)
    _check(isinstance(v, (tuple, list)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
           p + name, f"must be a list of integers, got {v!r}")
    object.__setattr__(cfg, name, tuple(v))
    return tuple(v)


@dataclass(frozen=True)
class OutputConfig:
    """The output layer (off by default: `kind = dense` is the LM head lm_head/kernel [C, V]).

    kind: `dense` or `adaptive` (adaptive softmax, Grave et al. 2017; onn_jax.output): a head
      softmax over the ids of frequency rank < cutoffs[0] plus one logit per tail cluster; tail
      cluster i = 1..len(cutoffs) holds ranks [cutoffs[i-1], cutoffs[i]) (the last up to vocab_size)
      behind a projection C -> max(1, C // div**i).
    cutoffs: increasing ranks, each in (0, model.vocab_size); () is one cluster: a dense softmax.
    div: the tail width divisor (an integer >= 1).
    order: the ids by falling frequency of the training split's trained-on labels (rank r is id
      order[r]; ties by id); a permutation of range(vocab_size). onn-train fills it in from the
      training split when it is empty and stores it with the config (config.json, checkpoint
      metadata, export), so resume, onn-eval, onn-generate and onn-export use the same clusters.
      Empty outside onn-train: the identity (rank = id).
    """

    kind: str = "dense"
    cutoffs: tuple[int, ...] = ()
    div: int = 4
    order: tuple[int, ...] = ()

    def __post_init__(self):
        p = "model.output."
        _choice(self.kind, OUTPUT_KINDS, p + "kind")
        cutoffs = _int_tuple(self, "cutoffs", p)
        _check(all(c > 0 for c in cutoffs), p + "cutoffs", f"must be > 0, got {list(cutoffs)}")
        _check(all(a < b for a, b in zip(cutoffs, cutoffs[1:])), p + "cutoffs",
               f"must be strictly increasing, got {list(cutoffs)}")
        _positive_int(self.div, p + "div")
        _int_tuple(self, "order", p)

    def check_against(self, vocab_size: int) -> None:
        p = "model.output."
        _check(all(c < vocab_size for c in self.cutoffs), p + "cutoffs",
               f"must be < model.vocab_size ({vocab_size}), got {list(self.cutoffs)}")
        if self.order:
            _check(sorted(self.order) == list(range(vocab_size)), p + "order",
                   f"must be a permutation of the ids 0..{vocab_size - 1} (model.vocab_size), "
                   f"got {len(self.order)} ids")


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
      [L, ...]; onn_jax.layer_stack converts to / from the per-layer block_i layout). Same values,
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
        _choice(self.remat, REMATS, p + "remat")
        _check_scan_layers(self)
        for name in ("vocab_size", "hidden", "num_layers", "num_heads", "max_len"):
            _positive_int(getattr(self, name), p + name)
        _check(self.hidden % self.num_heads == 0, p + "num_heads",
               f"must divide hidden ({self.hidden}), got {self.num_heads}")
        _check((self.hidden // self.num_heads) % 2 == 0, p + "num_heads",
               f"head dim hidden/num_heads = {self.hidden // self.num_heads} must be even for RoPE")
        _choice(self.norm, NORMS, p + "norm")
        _check(isinstance(self.norm_eps, float) and self.norm_eps > 0, p + "norm_eps",
               f"must be a float > 0, got {self.norm_eps!r}")
        _check(isinstance(self.rope_base, (int, float)) and self.rope_base > 1, p + "rope_base",
               f"must be > 1, got {self.rope_base!r}")
        _check(isinstance(self.final_norm, bool), p + "final_norm",
               f"must be a bool, got {self.final_norm!r}")
        _choice(self.dtype, DTYPES, p + "dtype")
        _choice(self.attention, ATTENTIONS, p + "attention")
        if self.attention == "cudnn":
            _check(self.dtype == "bfloat16", p + "attention",
                   f"'cudnn' (fused flash attention) needs dtype='bfloat16', got dtype={self.dtype!r}")
            _check(self.head_dim % 8 == 0 and self.head_dim <= 128, p + "attention",
                   f"'cudnn' needs a head dim (hidden/num_heads) that is a multiple of 8 and <= 128, "
                   f"got {self.head_dim}")
        _check(isinstance(self.moe, MoEConfig), p + "moe", "must be a MoEConfig")
        _check(isinstance(self.heads, HeadsConfig), p + "heads", "must be a HeadsConfig")
        self.heads.check_against(self.num_heads)
        _check(isinstance(self.embed, EmbedConfig), p + "embed", "must be an EmbedConfig")
        _check(isinstance(self.output, OutputConfig), p + "output", "must be an OutputConfig")
        self.output.check_against(self.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


@dataclass(frozen=True)
class FilterConfig:
    """The expert gradient filter ("2-sigma").

    mode: `one_sided` (faithful: zero g > mean + sigma*std), `two_sided` (zero |g| >
      mean(|g|) + sigma*std(|g|)) or `off`.
    scope: `pooled` (faithful: statistics over all expert gradients together) or
      `per_layer` (statistics per transformer block).
    """

    mode: str = "one_sided"
    scope: str = "pooled"
    sigma: float = 2.0

    def __post_init__(self):
        p = "optim.grad_filter."
        _choice(self.mode, FILTER_MODES, p + "mode")
        _choice(self.scope, FILTER_SCOPES, p + "scope")
        _nonneg_float(self.sigma, p + "sigma")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with the faithful PoC hyper-parameters, plus the expert gradient filter.

    clip_norm: optional global-norm clipping (an option; None = off, faithful).
    schedule: learning-rate schedule (onn_jax.schedules): `constant` (faithful), `warmup_cosine`,
      `wsd` (warmup, stable, then a linear cooldown over the last cooldown_fraction of
      decay_steps) or `linear` (warmup, then linear decay).
    warmup_steps: steps of linear warmup from 0 to lr (schedules other than constant).
    decay_steps: the step at which the schedule reaches lr * min_lr_ratio; None = train.steps.
    min_lr_ratio: the final learning rate as a share of lr.
    cooldown_fraction: `wsd` only: share of decay_steps spent in the final linear decay.
    accum_steps: split each batch into this many microbatches whose summed gradient equals the
      one-batch gradient (onn_jax.accumulate); 1 = off (faithful).
    idle_experts: what an expert that received no token in the step gets (onn_jax.optimizer):
      `skip` (faithful: no gradient; left out of the 2-sigma statistics, AdamW skips it and
      its own step counter stays) or `zero_grad` (a zero gradient: pooled, decayed, moved by
      momentum; one step counter for all parameters).
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = None
    grad_filter: FilterConfig = field(default_factory=FilterConfig)
    idle_experts: str = "skip"
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None
    min_lr_ratio: float = 0.0
    cooldown_fraction: float = 0.2
    accum_steps: int = 1

    def __post_init__(self):
        p = "optim."
        _choice(self.idle_experts, IDLE_EXPERTS, p + "idle_experts")
        _check_recipe_optim(self)
        _check(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool), p + "lr",
               f"must be a number, got {type(self.lr).__name__} {self.lr!r}")
        _check(self.lr > 0, p + "lr", f"must be > 0, got {self.lr}")
        for name in ("weight_decay", "eps"):
            _nonneg_float(getattr(self, name), p + name)
        for name in ("b1", "b2"):
            v = getattr(self, name)
            _nonneg_float(v, p + name)
            _check(v < 1, p + name, f"must be < 1, got {v}")
        if self.clip_norm is not None:
            _nonneg_float(self.clip_norm, p + "clip_norm")
            _check(self.clip_norm > 0, p + "clip_norm", f"must be > 0, got {self.clip_norm}")
        _check(isinstance(self.grad_filter, FilterConfig), p + "grad_filter",
               "must be a FilterConfig")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. -1 on one axis means 'all remaining devices' (like MaxText's ici_*).

    data: data parallelism; expert: expert parallelism (experts split, tokens too);
    fsdp: parameters and batch sharded together (ZeRO-3 style).
    """

    data: int = -1
    expert: int = 1
    fsdp: int = 1

    def __post_init__(self):
        p = "mesh."
        sizes = {"data": self.data, "expert": self.expert, "fsdp": self.fsdp}
        for name, v in sizes.items():
            _check(isinstance(v, int) and not isinstance(v, bool), p + name,
                   f"must be an integer, got {v!r}")
            _check(v == -1 or v > 0, p + name, f"must be > 0 or -1, got {v}")
        _check(sum(v == -1 for v in sizes.values()) <= 1, p + "data",
               "at most one mesh axis may be -1")


def from_dict(cls, data: Mapping[str, Any], path: str = ""):
    """Builds config dataclass `cls` from a nested mapping, rejecting unknown keys.

    Nested dataclass fields are built recursively. Errors name the dotted field path.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(path.rstrip(".") or cls.__name__,
                          f"must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(path + key, f"unknown key; known keys: {sorted(fields)}")
        default = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if default is not None and dataclasses.is_dataclass(default):
            value = from_dict(default, value, path + key + ".")
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(config) -> dict[str, Any]:
    """The config as a plain nested dict of JSON types (tuples as lists), as it reads back from
    config.json and checkpoint metadata (for logging, metadata and comparisons)."""
    return _json_shaped(dataclasses.asdict(config))


def _json_shaped(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_shaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_shaped(v) for v in value]
    return value


# --- The training program: data, loop, checkpoints, and the top-level Config -------------------

@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and how they are batched (see onn_jax.data).

    source: `builtin` (the embedded multi-domain chat corpus), comma-separated paths of
      chat `.jsonl` files and plain-text files (read into memory), or `shards:DIR` (a
      directory written by onn-tokenize, streamed from disk; see onn_jax.shards).
    tokenizer: `byte` (byte-level, default) or a path to a local HF `tokenizer.json`.
    records_per_domain: records per domain of the builtin corpus (ignored for user files).
    eval_fraction: share of records held out for the evaluation split.
    pack: pack several records of one domain per row (else one record per row, padded).
    seed: corpus generation and shuffling seed.
    strict: a chat record longer than seq_len + 1 tokens is an error naming its file and
      line (default: it is cut to its first seq_len + 1 tokens). Long text records are
      always split into several rows, nothing lost (onn_jax.records.fit_record).
    """

    source: str = "builtin"
    tokenizer: str = "byte"
    seq_len: int = 256
    batch_size: int = 8
    records_per_domain: int = 1000
    eval_fraction: float = 0.05
    pack: bool = True
    seed: int = 0
    strict: bool = False

    def __post_init__(self):
        p = "data."
        for name in ("pack", "strict"):
            v = getattr(self, name)
            _check(isinstance(v, bool), p + name, f"must be a bool, got {v!r}")
        for name in ("source", "tokenizer"):
            v = getattr(self, name)
            _check(isinstance(v, str) and v != "", p + name, f"must be a non-empty string, got {v!r}")
        for name in ("seq_len", "batch_size", "records_per_domain"):
            _positive_int(getattr(self, name), p + name)
        _nonneg_float(self.eval_fraction, p + "eval_fraction")
        _check(self.eval_fraction < 1, p + "eval_fraction", f"must be < 1, got {self.eval_fraction}")
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool), p + "seed",
               f"must be an integer, got {self.seed!r}")


SAMPLE_FORMATS = ("auto", "chat", "text")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, logging, evaluation and sample generation.

    steps: total optimizer steps (a resumed run continues up to this number).
    log_every: steps between metrics.jsonl / TensorBoard records (train metrics averaged over
      the steps since the last record); step 1, eval and sample steps are recorded too.
    eval_every: steps between held-out evaluations (0 = only at the end); eval_batches per eval.
    sample_every: steps between sample generations (0 = only at the end).
    sample_prompt, sample_tokens: the prompt of the greedy sample and its length in new tokens.
    sample_format: how the sample's prompt is encoded: `chat` (a user turn, then the
      assistant marker: the reply a chat-trained model gives), `text` (BOS + the prompt, as
      plain-text records are trained: the model continues it), `auto` (default: `text` when
      data.source is only plain-text files, else `chat`).
    progress: show the tqdm progress bar.
    max_skipped_in_a_row: a step whose loss or gradients are not finite is skipped (state
      unchanged, counted in train/skipped_steps); this many skipped in a row stop the run
      with a checkpoint.
    profile_steps: [a, b] writes a jax.profiler trace of steps a..b (inclusive) into
      WORKDIR/profile; None = no trace.
    peak_tflops: the device's peak TFLOP/s per device for perf/mfu; None = from the table in
      bench.bench.PEAK_TFLOPS by device kind (perf/mfu is null where the device is unknown).
    plots: draw the dashboards (WORKDIR/plots/*.png) when the run ends; false skips them (a few
      seconds of matplotlib per run: many short runs, or no matplotlib wanted on the cluster);
      `onn-plot WORKDIR` draws them later from metrics.jsonl.
    """

    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    sample_every: int = 0
    sample_prompt: str = "What is 12 + 7?"
    sample_tokens: int = 48
    sample_format: str = "auto"
    progress: bool = True
    max_skipped_in_a_row: int = 10
    profile_steps: tuple[int, int] | None = None
    peak_tflops: float | None = None
    plots: bool = True

    def __post_init__(self):
        p = "train."
        _check_recipe_train(self)
        for name in ("steps", "log_every", "eval_batches", "sample_tokens", "max_skipped_in_a_row"):
            _positive_int(getattr(self, name), p + name)
        for name in ("eval_every", "sample_every", "seed"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool), p + name,
                   f"must be an integer, got {v!r}")
            _check(v >= 0 or name == "seed", p + name, f"must be >= 0, got {v}")
        _check(isinstance(self.sample_prompt, str), p + "sample_prompt",
               f"must be a string, got {self.sample_prompt!r}")
        _check(self.sample_format in SAMPLE_FORMATS, p + "sample_format",
               f"must be one of {list(SAMPLE_FORMATS)}, got {self.sample_format!r}")
        _check(isinstance(self.progress, bool), p + "progress", f"must be a bool, got {self.progress!r}")
        _check(isinstance(self.plots, bool), p + "plots", f"must be a bool, got {self.plots!r}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under WORKDIR/checkpoints: every `every` steps and at the end, the
    last `keep` kept. enabled=False writes none (and so never resumes)."""

    enabled: bool = True
    every: int = 500
    keep: int = 3
    # stop_timeout_s: on a stop signal, how long onn-train waits for the save of the current
    # step (and any save in flight) before abandoning it and exiting (see train.signals).
    stop_timeout_s: float = 120.0

    def __post_init__(self):
        p = "checkpoint."
        _check(isinstance(self.enabled, bool), p + "enabled", f"must be a bool, got {self.enabled!r}")
        _positive_int(self.every, p + "every")
        _positive_int(self.keep, p + "keep")
        _nonneg_float(self.stop_timeout_s, p + "stop_timeout_s")
        _check(self.stop_timeout_s > 0, p + "stop_timeout_s", f"must be > 0, got {self.stop_timeout_s}")


@dataclass(frozen=True)
class Config:
    """Everything one training run needs; `from_dict(Config, d)` builds it from a config file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        kinds = {"model": ModelConfig, "optim": OptimConfig, "mesh": MeshConfig, "data": DataConfig,
                 "train": TrainConfig, "checkpoint": CheckpointConfig}
        for name, cls in kinds.items():
            _check(isinstance(getattr(self, name), cls), name, f"must be a {cls.__name__}")
        _check(self.data.seq_len <= self.model.max_len, "data.seq_len",
               f"must be <= model.max_len ({self.model.max_len}), got {self.data.seq_len}")
        m = self.model.moe
        _check(self.data.batch_size % self.optim.accum_steps == 0, "optim.accum_steps",
               f"must divide data.batch_size ({self.data.batch_size}), got {self.optim.accum_steps}")
        m = self.model.moe
        per_batch = [name for name, on in (("model.moe.aux_free_rate", m.aux_free_rate > 0),
                                           ("model.moe.adaptive_experts", m.adaptive_experts),
                                           ("model.moe.gate_tie_break='random'", m.gate_tie_break == "random"),
                                           ("model.moe.gate_tokens='nonconstant'", m.gate_tokens == "nonconstant"))
                     if on]
        _check(self.optim.accum_steps == 1 or not per_batch, "optim.accum_steps",
               f"accumulation (k = {self.optim.accum_steps}) is not exact with {', '.join(per_batch)} "
               "(their updates or token shares need the whole batch at once); use accum_steps=1")
        _check(not (self.model.scan_layers and self.optim.grad_filter.scope == "per_layer"),
               "optim.grad_filter.scope", "'per_layer' is not supported with model.scan_layers=true "
               "(the stacked expert leaves hold every layer); use 'pooled'")
        from onn_jax.limits import check_values  # ranges of every field: int32, finite, UTF-8
        check_values(self)



# --- Training recipe (issue 13): schedules, accumulation, profiling ---------------------------

def _check_recipe_optim(c: "OptimConfig") -> None:
    """Validates OptimConfig's schedule and accumulation fields."""
    p = "optim."
    _choice(c.schedule, SCHEDULES, p + "schedule")
    _check(isinstance(c.warmup_steps, int) and not isinstance(c.warmup_steps, bool) and c.warmup_steps >= 0,
           p + "warmup_steps", f"must be an integer >= 0, got {c.warmup_steps!r}")
    if c.decay_steps is not None:
        _positive_int(c.decay_steps, p + "decay_steps")
        _check(c.decay_steps >= c.warmup_steps, p + "decay_steps",
               f"must be >= optim.warmup_steps ({c.warmup_steps}), got {c.decay_steps}")
    _nonneg_float(c.min_lr_ratio, p + "min_lr_ratio")
    _check(c.min_lr_ratio <= 1, p + "min_lr_ratio", f"must be <= 1, got {c.min_lr_ratio}")
    _nonneg_float(c.cooldown_fraction, p + "cooldown_fraction")
    _check(0 < c.cooldown_fraction <= 1, p + "cooldown_fraction",
           f"must be in (0, 1], got {c.cooldown_fraction}")
    _positive_int(c.accum_steps, p + "accum_steps")


def _check_recipe_train(c: "TrainConfig") -> None:
    """Validates TrainConfig's profile_steps and peak_tflops (lists from config files become tuples)."""
    p = "train."
    if c.profile_steps is not None:
        v = c.profile_steps
        ok = (isinstance(v, (tuple, list)) and len(v) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in v))
        _check(ok, p + "profile_steps", f"must be [first, last] (two integers), got {v!r}")
        _check(1 <= v[0] <= v[1], p + "profile_steps", f"must satisfy 1 <= first <= last, got {list(v)}")
        object.__setattr__(c, "profile_steps", tuple(v))
    if c.peak_tflops is not None:
        _nonneg_float(c.peak_tflops, p + "peak_tflops")
        _check(c.peak_tflops > 0, p + "peak_tflops", f"must be > 0, got {c.peak_tflops}")


def _check_scan_layers(c: "ModelConfig") -> None:
    """model.scan_layers: a bool; the options that key per-layer state by block_i are refused."""
    _check(isinstance(c.scan_layers, bool), "model.scan_layers", f"must be a bool, got {c.scan_layers!r}")
    if not c.scan_layers:
        return
    why = "is not supported with model.scan_layers=true (it keys per-layer state by block_i); "
    _check(c.moe.aux_free_rate == 0, "model.moe.aux_free_rate", why + "use 0")
    _check(not c.moe.adaptive_experts, "model.moe.adaptive_experts", why + "use false")
