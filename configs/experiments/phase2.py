"""phase2: full-stack sparsity components on the CPU (issue 15 item 6; docs/RESEARCH.md).

research.py's model (2 MoE layers of 8 GELU experts of width 32, hidden 32, 4 attention heads
of width 8) on the builtin 4-domain corpus, 400 steps, 3 seeds that vary the initialisation AND
the data (vary_data). The MoE is held at top-2 + Switch load balancing (research.py's best row:
all experts alive), so each row changes one phase-2 component against a healthy FFN.

Rows (byte tokenizer; the BPE rows: slots and the adaptive softmax, are in phase2_bpe.py):
  base             dense heads, table embedding, dense output (the baseline of every byte row)
  heads_og         model.heads.router = surprise, faithful output_grad surprise, gate over all tokens
  heads_adv        surprise router, advantage surprise, gate loss over unmasked tokens only
  heads_topk       MoH/MoA-style top-2 of the 4 heads + load balancing (lb_weight 0.01)
  embed_ngram2     hashed bigram input memory (Engram-style) on bytes (defaults: 2 hash heads x
                   16384 buckets x 32: +1.05 M parameters, 18x the base model)
Controls:
  heads_dense2     dense attention with 2 heads of width 16 (same attention parameters): 2 heads
                   per token without a router, the compute the routed rows' avg_k ~ 2 spends
  heads_og_unmasked  heads_og with the gate loss over unmasked tokens only
  embed_ngram2_small the bigram memory at 512 buckets x 8 (+9 k parameters): is it the
                   lookup or the parameter count?
"""


def get_experiment():
    return {
        "name": "phase2",
        "base": "../tiny.py",
        "overrides": {
            "model.num_layers": 2, "model.moe.num_experts": 8, "model.moe.intermediate": 32,
            "model.moe.router": "topk", "model.moe.top_k": 2, "model.moe.lb_weight": 0.01,
            "data.records_per_domain": 500, "data.batch_size": 8, "data.seq_len": 64,
            "train.steps": 400, "train.log_every": 20, "train.eval_every": 400, "train.eval_batches": 2,
            "checkpoint.enabled": False,
        },
        "runs": {
            "base": {},
            "heads_og": {"model.heads.router": "surprise"},
            "heads_adv": {"model.heads.router": "surprise", "model.heads.surprise": "advantage",
                          "model.heads.gate_tokens": "unmasked"},
            "heads_topk": {"model.heads.router": "topk", "model.heads.top_k": 2, "model.heads.lb_weight": 0.01},
            "embed_ngram2": {"model.embed.ngram": 2},
            # controls, added after the first pass:
            "heads_dense2": {"model.num_heads": 2},
            "heads_og_unmasked": {"model.heads.router": "surprise", "model.heads.gate_tokens": "unmasked"},
            "embed_ngram2_small": {"model.embed.ngram": 2, "model.embed.ngram_buckets": 512,
                                   "model.embed.ngram_dim": 8},
        },
        "seeds": [0, 1, 2],
        "vary_data": True,
        "baselines": ["base", "heads_dense2"],
    }
