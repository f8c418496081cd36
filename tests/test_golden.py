"""One-step golden metrics on a fixed seed: any change to the step's numbers shows up here.

The values were produced by this code on CPU (jax 0.10.2) and checked by the exactness tests
(test_step.py); update them only with a change that is meant to alter the numbers.
"""
import jax
import numpy as np
from helpers import random_batch, tiny_config

from onn_jax.config import OptimConfig
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.state import init_state
from onn_jax.training.step import make_train_step

GOLDEN = [
    {"train/main_loss": 3.658820629119873, "moe/gate_loss": 4.6078643798828125, "moe/gate_ce": 4.551779747009277,
     "moe/gate_kl": 0.05608508735895157, "moe/avg_k": 3.53125, "moe/surprise_mean": 0.004782307893037796,
     "train/filtered_frac": 0.0218505859375, "train/grad_norm": 1.525694727897644, "moe/threshold_mean": 0.5},
    {"train/main_loss": 3.624098300933838, "moe/gate_loss": 4.597465515136719, "moe/avg_k": 3.53125,
     "moe/threshold_mean": 0.5001249313354492, "train/grad_norm": 1.5219074487686157},
]


def test_first_two_steps_reproduce_the_golden_metrics():
    cfg = tiny_config(num_layers=2)
    tx = make_optimizer(OptimConfig())
    state = init_state(cfg, tx, jax.random.key(0))
    step = make_train_step(cfg, tx, donate=False)
    batch = random_batch(0)
    for golden in GOLDEN:
        state, metrics = step(state, batch)
        for key, value in golden.items():
            np.testing.assert_allclose(float(metrics[key]), value, rtol=2e-4, err_msg=key)
    assert float(metrics["moe/gate_acc"]) == 0.0  # the faithful identity: argmin S is an inactive expert
