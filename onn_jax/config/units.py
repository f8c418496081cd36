"""Phase 2, full-stack sparsity: gated attention heads (model.heads), the slot embedding
(model.embed) and the adaptive softmax output (model.output); docs/FULL_STACK.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from onn_jax.config.errors import check, choice, nonneg_float, positive_int
from onn_jax.config.moe import GATE_TOKENS

HEAD_ROUTERS = ("dense", "surprise", "topk")


HEAD_COMBINES = ("scaled", "softmax")


def check_gate_fields(cfg, p: str) -> None:
    """The fields every Surprise-gated unit kind shares (MoE-style names, one meaning)."""
    choice(cfg.gate_tokens, GATE_TOKENS, p + "gate_tokens")
    for name in ("w_ce", "w_kl", "w_aux"):
        nonneg_float(getattr(cfg, name), p + name)
    check(isinstance(cfg.surprise, str) and cfg.surprise != "", p + "surprise",
           f"must be the name of a surprise function, got {cfg.surprise!r}")
    if cfg.fallback_k is not None:
        positive_int(cfg.fallback_k, p + "fallback_k")


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
        choice(self.router, HEAD_ROUTERS, p + "router")
        choice(self.combine, HEAD_COMBINES, p + "combine")
        check_gate_fields(self, p)
        positive_int(self.top_k, p + "top_k")
        nonneg_float(self.lb_weight, p + "lb_weight")

    def check_against(self, num_heads: int) -> None:
        p = "model.heads."
        if self.fallback_k is not None:
            check(self.fallback_k <= num_heads, p + "fallback_k",
                   f"must be <= model.num_heads ({num_heads}), got {self.fallback_k}")
        check(self.top_k <= num_heads, p + "top_k",
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
        choice(self.kind, EMBED_KINDS, p + "kind")
        check_gate_fields(self, p)
        if self.kind == "slots":
            check(self.surprise in SLOT_SURPRISES, p + "surprise",
                   f"slots take their Surprise in closed form: one of {list(SLOT_SURPRISES)}, got "
                   f"{self.surprise!r} (`learning_cost` would be |g_t| for every slot)")
        for name in ("num_slots", "code_dim", "ngram_buckets", "ngram_heads", "ngram_dim"):
            positive_int(getattr(self, name), p + name)
        if self.fallback_k is not None:
            check(self.fallback_k <= self.num_slots, p + "fallback_k",
                   f"must be <= num_slots ({self.num_slots}), got {self.fallback_k}")
        check(isinstance(self.deep, bool), p + "deep", f"must be a bool, got {self.deep!r}")
        check(self.ngram in (0, 2, 3) and not isinstance(self.ngram, bool), p + "ngram",
               f"must be 0, 2 or 3, got {self.ngram!r}")

    @property
    def effective_fallback_k(self) -> int:
        return self.fallback_k if self.fallback_k is not None else max(1, self.num_slots // 2)

    @property
    def gated(self) -> bool:
        return self.kind == "slots"


OUTPUT_KINDS = ("dense", "adaptive")


def _int_tuple(cfg, name: str, p: str) -> tuple:
    """cfg.name as a tuple of ints (lists from config files / JSON become tuples)."""
    v = getattr(cfg, name)
    check(isinstance(v, (tuple, list)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
           p + name, f"must be a list of integers, got {v!r}")
    object.__setattr__(cfg, name, tuple(v))
    return tuple(v)


@dataclass(frozen=True)
class OutputConfig:
    """The output layer (off by default: `kind = dense` is the LM head lm_head/kernel [C, V]).

    kind: `dense` or `adaptive` (adaptive softmax, Grave et al. 2017; onn_jax.nn.output): a head
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
    loss_chunk: 0 (default) assembles the dense head's logits [B, T, V] for the loss; N >= 1
      runs the head and its cross entropy over N positions of every sequence at a time, the
      loss's gradient formed in the same pass, so [B, T, V] never exists (onn_jax.core.head_loss:
      several GiB less at a 50k vocabulary). Same loss and gradients (float32: up to summation
      order; bfloat16: the head kernel's gradient is summed in float32). kind = dense only.
    """

    kind: str = "dense"
    cutoffs: tuple[int, ...] = ()
    div: int = 4
    order: tuple[int, ...] = ()
    loss_chunk: int = 0

    def __post_init__(self):
        p = "model.output."
        choice(self.kind, OUTPUT_KINDS, p + "kind")
        check(isinstance(self.loss_chunk, int) and not isinstance(self.loss_chunk, bool) and self.loss_chunk >= 0,
              p + "loss_chunk", f"must be an integer >= 0, got {self.loss_chunk!r}")
        check(self.kind == "dense" or self.loss_chunk == 0, p + "loss_chunk",
              f"is for kind = dense (the adaptive softmax never assembles [B, T, V]), got {self.loss_chunk}")
        cutoffs = _int_tuple(self, "cutoffs", p)
        check(all(c > 0 for c in cutoffs), p + "cutoffs", f"must be > 0, got {list(cutoffs)}")
        check(all(a < b for a, b in zip(cutoffs, cutoffs[1:])), p + "cutoffs",
               f"must be strictly increasing, got {list(cutoffs)}")
        positive_int(self.div, p + "div")
        _int_tuple(self, "order", p)

    def check_against(self, vocab_size: int) -> None:
        p = "model.output."
        check(all(c < vocab_size for c in self.cutoffs), p + "cutoffs",
               f"must be < model.vocab_size ({vocab_size}), got {list(self.cutoffs)}")
        if self.order:
            check(sorted(self.order) == list(range(vocab_size)), p + "order",
                   f"must be a permutation of the ids 0..{vocab_size - 1} (model.vocab_size), "
                   f"got {len(self.order)} ids")
