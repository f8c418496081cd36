"""research_gpu_fresh: research_gpu's rows where every training token is new (issue 16).

research_gpu trains 3000 steps of 32 x 512 tokens on 5000 records per domain (~1.6 MB): about 30
epochs, so every row memorises the corpus (train loss < 0.1) and its held-out loss rises after
step 1000; there the held-out loss measures how a row overfits, not how it routes. This grid
draws 100000 records per domain (~30 MB of arithmetic, strings and brackets; prose is capped by
the 404 stdlib docstrings it is cut from) and trains 600 steps (~10 M tokens, under one epoch),
with a held-out evaluation every 100 steps:

    onn-experiment configs/experiments/research_gpu_fresh.py --only topk_lb,topk_auxfree,v_adv_budget_hi
"""
from pathlib import Path

from train.common.config_loader import exec_python_file


def get_experiment():
    gpu = exec_python_file(Path(__file__).with_name("research_gpu.py"), "_onn_experiment_research_gpu").get_experiment()
    return {
        **gpu,
        "name": "research_gpu_fresh",
        "overrides": {**gpu["overrides"], "data.records_per_domain": 100_000,
                      "train.steps": 600, "train.eval_every": 100},
    }
