"""routing: does the gate specialise experts by domain, and at what cost in loss? (CPU, minutes)

Two MoE layers of 8 experts on the builtin 4-domain corpus, same data and steps for every
router; 3 seeds (train.seed: initialisation; the data order and held-out set are shared).
Rows: the faithful surprise MoE (SMK), SMK with each surprise variant and with the gate loss
restricted to unmasked tokens (`smk_unmasked`; the variants use it too, `smk_advantage_all`
shows advantage without it), the top-2 + Switch load-balancing baseline, and a dense FFN
as wide as 2 experts.
"""


def get_experiment():
    return {
        "name": "routing",
        "base": "../tiny.py",
        "overrides": {
            "model.num_layers": 2, "model.moe.num_experts": 8, "model.moe.intermediate": 32,
            "model.moe.top_k": 2,
            "data.records_per_domain": 1000, "data.batch_size": 8, "data.seq_len": 64,
            "train.steps": 1000, "train.log_every": 20, "train.eval_every": 250, "train.eval_batches": 2,
            "checkpoint.enabled": False,
        },
        "runs": {
            "smk_faithful": {},
            "smk_unmasked": {"model.moe.gate_tokens": "unmasked"},
            "smk_advantage_all": {"model.moe.surprise": "advantage"},
            "smk_advantage": {"model.moe.surprise": "advantage", "model.moe.gate_tokens": "unmasked"},
            "smk_learning_cost": {"model.moe.surprise": "learning_cost", "model.moe.gate_tokens": "unmasked"},
            "topk_lb": {"model.moe.router": "topk", "model.moe.lb_weight": 0.01},
            "dense": {"model.moe.router": "dense"},
        },
        "seeds": [0, 1, 2],
    }
