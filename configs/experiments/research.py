"""research: baselines and surprise-gated variants on the CPU (issue 16; docs/RESEARCH.md).

The routing experiment's model (2 MoE layers of 8 GELU experts, hidden 32) on the builtin
4-domain corpus, shorter (400 steps) so that 14 rows x 3 seeds fit a shared 2-core CPU. The
seeds vary the initialisation AND the data (vary_data: data.seed = seed, i.e. the corpus
sample, its held-out split and the data order).

Rows and why each was tried (the diagnosis they address is in docs/RESEARCH.md):
  baselines   smk_faithful, topk_lb (top-2 + Switch LB), dense (FFN of width 2 experts),
              topk_auxfree (top-2, aux-loss-free bias, no LB loss), topk1_shared (top-1 + a
              shared always-on expert: 2 expert widths per token, as top-2),
              smk_dynmoe (DynMoE's adaptive expert count: 4 of 8 slots live at start)
  existing    smk_unmasked, smk_advantage (advantage surprise, unmasked tokens)
  variants    v_random_tie (ties of argmin S broken at random: no low-index bias),
              v_nonconstant (gate loss only where the S row is not constant: no masked-token
              collapse onto expert 0), v_kl_only (no hard target), v_ce_only (no soft target),
              v_kl_temp (soft target softmax(-S/0.005): S ~ 5e-3, so the faithful target is
              nearly uniform), v_budget (avg_k pulled to 2: matched compute),
              v_combined (random tie + nonconstant + budget + temperature),
              v_adv_budget (the advantage surprise over unmasked tokens, the only row without
              dead experts and with informative targets, with the avg_k budget that pulls it
              out of the E/2 fallback to matched compute: "What next" of the first grid)
              v_adv_budget_hi (the same with a 10x budget weight: v_adv_budget still sat at
              avg_k 2.52 with fallback tokens, so does holding avg_k at 2 close the gap?)
              v_adv_budget_fb (v_adv_budget_hi whose budget also charges the fallback: at the
              GPU size the plain budget held the thresholded count near 2 while half the
              tokens took the E/2 fallback, avg_k 9)
"""


def get_experiment():
    return {
        "name": "research",
        "base": "../tiny.py",
        "overrides": {
            "model.num_layers": 2, "model.moe.num_experts": 8, "model.moe.intermediate": 32,
            "model.moe.top_k": 2,
            "data.records_per_domain": 500, "data.batch_size": 8, "data.seq_len": 64,
            "train.steps": 400, "train.log_every": 20, "train.eval_every": 400, "train.eval_batches": 2,
            "checkpoint.enabled": False,
        },
        "runs": {
            "smk_faithful": {},
            "topk_lb": {"model.moe.router": "topk", "model.moe.lb_weight": 0.01},
            "topk_auxfree": {"model.moe.router": "topk", "model.moe.lb_weight": 0.0,
                             "model.moe.aux_free_rate": 0.005},
            "topk1_shared": {"model.moe.router": "topk", "model.moe.top_k": 1, "model.moe.shared_expert": True},
            "dense": {"model.moe.router": "dense"},
            "smk_dynmoe": {"model.moe.adaptive_experts": True, "model.moe.adaptive_every": 50,
                           "model.moe.adaptive_initial": 4},
            "smk_unmasked": {"model.moe.gate_tokens": "unmasked"},
            "smk_advantage": {"model.moe.surprise": "advantage", "model.moe.gate_tokens": "unmasked"},
            "v_random_tie": {"model.moe.gate_tie_break": "random"},
            "v_nonconstant": {"model.moe.gate_tokens": "nonconstant"},
            "v_kl_only": {"model.moe.w_ce": 0.0},
            "v_ce_only": {"model.moe.w_kl": 0.0},
            "v_kl_temp": {"model.moe.kl_temperature": 0.005},
            "v_budget": {"model.moe.w_budget": 0.1, "model.moe.budget_k": 2.0},
            "v_combined": {"model.moe.gate_tie_break": "random", "model.moe.gate_tokens": "nonconstant",
                           "model.moe.w_budget": 0.1, "model.moe.budget_k": 2.0,
                           "model.moe.kl_temperature": 0.005},
            "v_adv_budget": {"model.moe.surprise": "advantage", "model.moe.gate_tokens": "unmasked",
                             "model.moe.w_budget": 0.1, "model.moe.budget_k": 2.0},
            "v_adv_budget_hi": {"model.moe.surprise": "advantage", "model.moe.gate_tokens": "unmasked",
                                "model.moe.w_budget": 1.0, "model.moe.budget_k": 2.0},
            "v_adv_budget_fb": {"model.moe.surprise": "advantage", "model.moe.gate_tokens": "unmasked",
                                "model.moe.w_budget": 1.0, "model.moe.budget_k": 2.0,
                                "model.moe.budget_fallback": True},
        },
        "seeds": [0, 1, 2],
        "vary_data": True,
        "baselines": ["topk_lb", "topk_auxfree"],
    }
