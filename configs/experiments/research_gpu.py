"""research_gpu: the rows of research.py at a size where routing matters (issue 16's GPU grid).

configs/gpu_small.py (C256, 4 layers of 32 GELU experts of width 256, bf16) on the builtin
4-domain corpus with the byte tokenizer (vocab cut to 512: ids above 261 are never used),
3000 steps of 32 x 512 tokens, seeds that vary the initialisation AND the data. Finished cells
are skipped, so a grid spreads over device calls; several cells share one GPU well:

    onn-experiment configs/experiments/research_gpu.py --only smk_faithful,topk_lb,topk_auxfree --parallel 6

Caution (docs/RESEARCH.md "The GPU grid"): 3000 steps are ~30 epochs of this small corpus, so
every row memorises it and the held-out loss measures overfitting more than routing;
research_gpu_fresh.py is the same grid on fresh data (under one epoch).

The rows, and why each is tried, are research.py's (docs/RESEARCH.md); only the size differs,
plus top-8 and top-16 + load balancing: the surprise rows' active compute at this size.
"""
from pathlib import Path

from train.common.config_loader import exec_python_file

# Top-k + load balancing at the active compute the surprise rows reach at this size (their avg_k
# is 7-11 of 32 for smk_faithful / v_adv_budget*, 16 for v_kl_only): the matched-compute controls.
COMPUTE_CONTROLS = {
    f"topk{k}_lb": {"model.moe.router": "topk", "model.moe.top_k": k, "model.moe.lb_weight": 0.01} for k in (8, 16)
}


def get_experiment():
    cpu = exec_python_file(Path(__file__).with_name("research.py"), "_onn_experiment_research").get_experiment()
    return {
        "name": "research_gpu",
        "base": "../gpu_small.py",
        "overrides": {
            "model.vocab_size": 512, "model.moe.top_k": 2,
            "train.steps": 3000, "train.log_every": 100, "train.eval_every": 1000, "train.eval_batches": 8,
            "train.sample_every": 0, "checkpoint.enabled": False,
        },
        "runs": {**cpu["runs"], **COMPUTE_CONTROLS},
        "seeds": [0, 1, 2],
        "vary_data": True,
        "baselines": ["topk_lb", "topk_auxfree", "topk8_lb"],
    }
