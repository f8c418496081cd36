"""onn-jax: surprise-gated sparse Mixture-of-Experts language models in JAX/Flax."""
from onn_jax.config import (ConfigError, FilterConfig, ModelConfig, MoEConfig, OptimConfig,
                            from_dict, to_dict)
from onn_jax.experts import combine, dense_ffn, expert_outputs, gelu_exact
from onn_jax.gate import RouterOutput, cosine_logits, masked_softmax, top_any_gate, topk_gate
from onn_jax.grad_filter import sigma_filter
from onn_jax.losses import hybrid_gate_loss, load_balancing_loss, next_token_loss, router_z_loss
from onn_jax.model import Transformer, init_params, model_taps
from onn_jax.moe import MoERecord, MoETaps, moe_layer, zero_taps
from onn_jax.step import (TrainState, compute_grads, init_state, make_optimizer, make_train_step,
                          train_step)
from onn_jax.surprise import SURPRISE_FNS, SurpriseInputs, get_surprise_fn, output_grad_surprise

__version__ = "0.1.0"
