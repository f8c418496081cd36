"""model.moe: the MoE layer's router, experts, dispatch and gate losses."""
from __future__ import annotations

from dataclasses import dataclass

from onn_jax.config.errors import check, choice, nonneg_float, positive_int
from onn_jax.core.surprise_registry import SURPRISE_FNS

ROUTERS = ("surprise", "topk", "dense")


EXPERT_KINDS = ("gelu", "swiglu")


DISPATCHES = ("dense", "sparse", "dropless")


GEMMS = ("auto", "ragged_dot", "mosaic_gpu", "padded")


TOKEN_SUMS = ("auto", "loop", "pallas")  # onn_jax.dispatch.token_sums


GATE_TOKENS = ("all", "unmasked")


MOE_GATE_TOKENS = GATE_TOKENS + ("nonconstant",)  # `nonconstant`: MoE gate only (issue 16)


GATE_TIE_BREAKS = ("low_index", "random")


@dataclass(frozen=True)
class MoEConfig:
    """The MoE feed-forward layer: router kind, experts and the gate losses.

    router: `surprise` (faithful top-any gate trained by the Surprise hybrid loss),
      `topk` (linear router, top_k experts, Switch load-balancing loss) or `dense`
      (a plain FFN whose width equals top_k experts).
    fallback_k: experts activated for a token with none active; None means E // 2.
    w_ce, w_kl: weights of the hard (CE to argmin S) and soft (KL) gate targets.
    w_aux: weight of the summed per-layer gate losses in the total loss.
    surprise: name of the surprise definition (see onn_jax.core.surprise_registry.SURPRISE_FNS).
    lb_weight, z_weight: Switch load-balancing and router z-loss weights (topk router).
    dispatch: `dense` (faithful reference: every expert on every token) or `sparse`
      (only active pairs, within a per-expert capacity; see onn_jax.dispatch.capacity).
    gate_tokens: tokens the Surprise gate loss averages over: `all` (faithful) or `unmasked`
      (only positions whose label counts in the main loss; masked ones have g = 0 on top).
    capacity_factor: sparse capacity per expert = ceil(capacity_factor * N * k_ref / E), with
      k_ref = top_k for the top-k router and fallback_k (E // 2) for the surprise gate (see
      onn_jax.dispatch.capacity.expert_capacity); None means no pair is ever dropped (capacity N).
    pair_budget: dropless dispatch (`dispatch="dropless"`, onn_jax.dispatch.dropless): rows of the
      expert-sorted pair buffer per token on average, ceil(pair_budget * N) rows for the batch.
      At num_experts nothing can drop; beyond the budget the pairs of the batch's last tokens
      (token-major order) are dropped and counted in moe/dropped_frac. None: top_k for the top-k
      router (never drops), fallback_k (E // 2) for the surprise gate (every token's k at
      initialisation; avg_k falls while training).
    gemm: grouped-GEMM backend of the dropless experts (onn_jax.dispatch.grouped_gemm): `ragged_dot`
      (jax.lax.ragged_dot, portable), `mosaic_gpu` (the Pallas Mosaic GPU kernels in jax,
      Hopper only), `padded` (a masked einsum per expert: a slow exact reference) or `auto`
      (mosaic_gpu on a Hopper GPU, else ragged_dot).
    token_sum: the dropless layer's deterministic per-token sums (combine, and the dispatch's
      backward; onn_jax.dispatch.token_sums): `loop` (one pass over an [N, C] accumulator per j < max k,
      portable), `pallas` (one Pallas Triton kernel reading each row once, NVIDIA GPUs) or
      `auto` (pallas on an NVIDIA GPU, else loop). Same sums in the same order either way.
    ep_budget: dropless dispatch on a mesh of several devices (onn_jax.dispatch.expert_parallel; ep =
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
      (onn_jax.training.options.router_state; kept in TrainState.router_state, outside the optimizer).
    shared_expert: add an always-on expert (a GELU/SwiGLU FFN of width `intermediate`) to the
      routed experts' output, for any router.
    adaptive_experts: DynMoE's adaptive expert count for the top-any gate (onn_jax.training.options.adaptive_experts):
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
      fallback_k experts (onn_jax.core.gate_targets.expected_k), as the gate does. Why: without it, at
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
        choice(self.gate_tokens, MOE_GATE_TOKENS, p + "gate_tokens")
        choice(self.dispatch, DISPATCHES, p + "dispatch")
        check(not (self.surprise == "advantage" and self.dispatch != "dense"), p + "surprise",
               "`advantage` needs every expert's output; it cannot run with "
               f"dispatch={self.dispatch!r}")
        choice(self.gemm, GEMMS, p + "gemm")
        choice(self.token_sum, TOKEN_SUMS, p + "token_sum")
        if self.capacity_factor is not None:
            nonneg_float(self.capacity_factor, p + "capacity_factor")
            check(self.capacity_factor > 0, p + "capacity_factor",
                   f"must be > 0, got {self.capacity_factor}")
        positive_int(self.num_experts, p + "num_experts")
        positive_int(self.intermediate, p + "intermediate")
        choice(self.expert_kind, EXPERT_KINDS, p + "expert_kind")
        choice(self.router, ROUTERS, p + "router")
        if self.fallback_k is not None:
            positive_int(self.fallback_k, p + "fallback_k")
            check(self.fallback_k <= self.num_experts, p + "fallback_k",
                   f"must be <= num_experts ({self.num_experts}), got {self.fallback_k}")
        positive_int(self.top_k, p + "top_k")
        check(self.top_k <= self.num_experts, p + "top_k",
               f"must be <= num_experts ({self.num_experts}), got {self.top_k}")
        for name in ("w_ce", "w_kl", "w_aux", "lb_weight", "z_weight"):
            nonneg_float(getattr(self, name), p + name)
        check(isinstance(self.surprise, str) and self.surprise in SURPRISE_FNS, p + "surprise",
               f"must be one of {sorted(SURPRISE_FNS)} (onn_jax.core.surprise_registry.SURPRISE_FNS), "
               f"got {self.surprise!r}")
        if self.pair_budget is not None:
            nonneg_float(self.pair_budget, p + "pair_budget")
            check(0 < self.pair_budget <= self.num_experts, p + "pair_budget",
                   f"must be in (0, num_experts={self.num_experts}], got {self.pair_budget}")
        if self.ep_budget is not None:  # expert-parallel send budget (onn_jax.dispatch.expert_parallel)
            nonneg_float(self.ep_budget, p + "ep_budget")
            check(0 < self.ep_budget <= self.num_experts, p + "ep_budget",
                   f"must be in (0, num_experts={self.num_experts}], got {self.ep_budget}")
        self._check_research_options()

    def _check_research_options(self) -> None:
        """Validation of the issue-16 options (aux-free balancing, shared expert, adaptive expert
        count, gate-loss variants); see the class docstring's last paragraph."""
        p = "model.moe."
        nonneg_float(self.aux_free_rate, p + "aux_free_rate")
        check(self.aux_free_rate == 0 or self.router == "topk", p + "aux_free_rate",
               f"aux-loss-free balancing is for router='topk', got router={self.router!r}")
        for name in ("shared_expert", "adaptive_experts", "budget_fallback"):
            check(isinstance(getattr(self, name), bool), p + name, f"must be a bool, got {getattr(self, name)!r}")
        check(not (self.shared_expert and self.router == "dense"), p + "shared_expert",
               "needs a router ('surprise' or 'topk'), got router='dense'")
        check(not self.adaptive_experts or self.router == "surprise", p + "adaptive_experts",
               f"the adaptive expert count is for the top-any gate (router='surprise'), got {self.router!r}")
        positive_int(self.adaptive_every, p + "adaptive_every")
        if self.adaptive_initial is not None:
            positive_int(self.adaptive_initial, p + "adaptive_initial")
            check(self.adaptive_initial <= self.num_experts, p + "adaptive_initial",
                   f"must be <= num_experts ({self.num_experts}), got {self.adaptive_initial}")
        choice(self.gate_tie_break, GATE_TIE_BREAKS, p + "gate_tie_break")
        nonneg_float(self.kl_temperature, p + "kl_temperature")
        check(self.kl_temperature > 0, p + "kl_temperature", f"must be > 0, got {self.kl_temperature}")
        nonneg_float(self.w_budget, p + "w_budget")
        nonneg_float(self.budget_k, p + "budget_k")
        check(self.w_budget == 0 or self.router == "surprise", p + "w_budget",
               f"the avg_k budget is for router='surprise', got {self.router!r}")
        check(not self.budget_fallback or self.w_budget > 0, p + "budget_fallback",
               "counts the fallback in the avg_k budget: set model.moe.w_budget > 0")
        check(not (self.budget_fallback and self.adaptive_experts), p + "budget_fallback",
               "is not available with adaptive_experts (the fallback size follows the live experts)")

    @property
    def effective_fallback_k(self) -> int:
        """The fallback size in force: fallback_k, or E // 2 (at least 1) by default."""
        if self.fallback_k is not None:
            return self.fallback_k
        return max(1, self.num_experts // 2)
