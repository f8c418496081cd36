"""onn-jax: surprise-gated sparse Mixture-of-Experts language models in JAX/Flax.

Importing the package has no side effects (orbax is imported lazily by the checkpoint
functions). The functional core (gate, experts, surprise, losses, moe_layer, compute_grads,
train_step) is plain functions of arrays and parameter pytrees.
"""
from onn_jax.analysis import avg_k_from_counts, domain_expert_counts, gate_accuracy, nmi_from_counts
from onn_jax.checkpoint import (CheckpointError, Checkpointer, abstract_like, export_params,
                                load_params, make_meta)
from onn_jax.config import (CheckpointConfig, Config, ConfigError, DataConfig, FilterConfig,
                            MeshConfig, ModelConfig, MoEConfig, OptimConfig, TrainConfig, from_dict,
                            to_dict)
from onn_jax.corpus import build_corpus
from onn_jax.data import DataError, Dataset, load_records
from onn_jax.dispatch import Dispatch, expert_capacity, make_dispatch
from onn_jax.distributed import global_batch, initialize_distributed, process_batch_rows
from onn_jax.experts import combine, dense_ffn, expert_outputs, gelu_exact
from onn_jax.gate import RouterOutput, cosine_logits, masked_softmax, top_any_gate, topk_gate
from onn_jax.generate import generate, generate_batch, generate_tokens, sample_logits, top_p_filter
from onn_jax.grad_filter import sigma_filter
from onn_jax.guard import guarded_train_step, make_guarded_step
from onn_jax.losses import hybrid_gate_loss, load_balancing_loss, next_token_loss, router_z_loss
from onn_jax.model import DecodeCache, KVCache, Transformer, init_cache, init_params, model_taps
from onn_jax.moe import (MoERecord, MoETaps, expert_received_tokens, layer_surprise, layer_taps, moe_layer,
                         surprise_inputs, zero_taps)
from onn_jax.optimizer import PerExpertAdamState, per_expert_adamw
from onn_jax.routing_metrics import DEAD_LOAD_FLOOR, dead_experts, routing_metrics
from onn_jax.sharding import (abstract_state, batch_sharding, make_mesh, make_sharded_train_step,
                              shard_batch, sharded_init)
from onn_jax.step import (TrainState, compute_grads, init_state, make_optimizer, make_train_step,
                          train_step)
from onn_jax.portable import Export, load_export, write_export
from onn_jax.records import encode_record, iter_records
from onn_jax.shards import ShardDataset, write_shards
from onn_jax.surprise import (SURPRISE_FNS, SurpriseInputs, get_surprise_fn, output_grad_closed_surprise,
                              output_grad_surprise)
from onn_jax.surprise_variants import advantage_surprise, learning_cost_surprise
from onn_jax.tokenizer import ByteTokenizer, HFTokenizer, encode_chat, load_tokenizer
# phase 2, full-stack sparsity (docs/FULL_STACK.md)
from onn_jax.config import EmbedConfig, HeadsConfig
from onn_jax.embed import SlotRecord, slot_embed, slot_surprise
from onn_jax.heads import HeadGradNorms, gated_heads, head_layer, route_heads
from onn_jax.units import UnitRecords, UnitTaps, unit_records, unit_taps
from onn_jax.config import OutputConfig
from onn_jax.output import adaptive_ce, adaptive_log_probs, count_labels, frequency_order

__version__ = "0.1.0"
