"""onn-jax: surprise-gated sparse Mixture-of-Experts language models in JAX/Flax.

Importing the package has no side effects (orbax is imported lazily by the checkpoint
functions). The functional core (gate, experts, surprise, losses, moe_layer, compute_grads,
train_step) is plain functions of arrays and parameter pytrees.
"""
# phase 2, full-stack sparsity (docs/FULL_STACK.md)
from onn_jax.config import (
                            CheckpointConfig,
                            Config,
                            ConfigError,
                            DataConfig,
                            EmbedConfig,
                            FilterConfig,
                            HeadsConfig,
                            MeshConfig,
                            ModelConfig,
                            MoEConfig,
                            OptimConfig,
                            OutputConfig,
                            TrainConfig,
                            from_dict,
                            to_dict,
)
from onn_jax.core.analysis import avg_k_from_counts, domain_expert_counts, gate_accuracy, nmi_from_counts
from onn_jax.core.experts import combine, dense_ffn, expert_outputs, gelu_exact
from onn_jax.core.gate import RouterOutput, cosine_logits, masked_softmax, top_any_gate, topk_gate
from onn_jax.core.grad_filter import sigma_filter
from onn_jax.core.losses import hybrid_gate_loss, load_balancing_loss, next_token_loss, router_z_loss
from onn_jax.core.optimizer import PerExpertAdamState, per_expert_adamw
from onn_jax.core.routing_metrics import DEAD_LOAD_FLOOR, dead_experts, routing_metrics
from onn_jax.core.surprise import SurpriseInputs, output_grad_closed_surprise, output_grad_surprise
from onn_jax.core.surprise_registry import SURPRISE_FNS, get_surprise_fn
from onn_jax.core.surprise_variants import advantage_surprise, learning_cost_surprise
from onn_jax.data.corpus import build_corpus
from onn_jax.data.dataset import Dataset, load_records
from onn_jax.data.records import DataError, encode_record, iter_records
from onn_jax.data.shards import ShardDataset, write_shards
from onn_jax.data.tokenizer import ByteTokenizer, HFTokenizer, encode_chat, load_tokenizer
from onn_jax.dispatch.capacity import Dispatch, expert_capacity, make_dispatch
from onn_jax.io import Checkpointer, CheckpointError, abstract_like, export_params, load_params, make_meta
from onn_jax.io.portable import Export, load_export, write_export
from onn_jax.nn.attention import DecodeCache, KVCache, init_cache
from onn_jax.nn.embed import SlotRecord, slot_embed, slot_surprise
from onn_jax.nn.generate import generate, generate_batch, generate_tokens, sample_logits, top_p_filter
from onn_jax.nn.heads import HeadGradNorms, gated_heads, head_layer, route_heads
from onn_jax.nn.moe import (
                            MoERecord,
                            MoETaps,
                            expert_received_tokens,
                            layer_surprise,
                            layer_taps,
                            moe_layer,
                            surprise_inputs,
                            zero_taps,
)
from onn_jax.nn.output import adaptive_ce, adaptive_log_probs, count_labels, frequency_order
from onn_jax.nn.transformer import Transformer, init_params, model_taps
from onn_jax.nn.units import UnitRecords, UnitTaps, unit_records, unit_taps
from onn_jax.parallel.distributed import global_batch, initialize_distributed, process_batch_rows
from onn_jax.parallel.mesh import make_mesh
from onn_jax.parallel.rules import batch_sharding
from onn_jax.training.guard import guarded_train_step, make_guarded_step
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.sharded import abstract_state, make_sharded_train_step, shard_batch, sharded_init
from onn_jax.training.state import TrainState, init_state
from onn_jax.training.step import compute_grads, make_train_step, train_step

__version__ = "0.1.0"
