"""The core's entry contracts (onn_jax.core.contracts): a wrong rank, a mismatched dimension or an
integer array where floats are needed raises AssertionError naming the function and the argument,
eagerly and at trace time under jit (chex.variants); what the model passes (bfloat16 tokens,
vmap, vjp) goes through."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from onn_jax.core import analysis, gate_targets, routing_metrics
from onn_jax.core.experts import combine, dense_ffn, expert_outputs
from onn_jax.core.gate import RouterOutput, cosine_logits, l2_normalize, masked_softmax, top_any_gate, topk_gate
from onn_jax.core.grad_filter import sigma_filter
from onn_jax.core.losses import hybrid_gate_loss, load_balancing_loss, next_token_loss, router_z_loss
from onn_jax.core.optimizer import per_expert_adamw
from onn_jax.core.surprise import SurpriseInputs, output_grad_closed_surprise, output_grad_surprise
from onn_jax.core.surprise_variants import advantage_surprise, expert_grad_norms, learning_cost_surprise

N, C, E, I, V, B, T, L = 6, 4, 3, 5, 7, 2, 3, 2


def f32(*shape):
    return jnp.asarray(np.random.default_rng(sum(shape)).normal(size=shape), jnp.float32)


def i32(*shape):
    return jnp.zeros(shape, jnp.int32)


def experts(e=E, c=C, i=I, swiglu=False):
    p = {"w1": f32(e, c, i), "w2": f32(e, i, c)}
    return {**p, "w3": f32(e, c, i)} if swiglu else p


def ffn(c=C, i=I):
    return {"w1": f32(c, i), "w2": f32(i, c)}


def surprise_inputs(**fields):
    base = dict(d_expert_out=f32(N, E, C), d_moe_out=f32(N, C), expert_out=f32(N, E, C), weights=f32(N, E),
                mask=jnp.ones((N, E), bool))
    return SurpriseInputs(**{**base, **fields})


class Ext:
    """What the registry may hand learning_cost_surprise: the fields it reads, as attributes."""

    def __init__(self, d_moe_out, expert_in, expert_params):
        self.d_moe_out, self.expert_in, self.expert_params = d_moe_out, expert_in, expert_params


def record(pre, mask, weights):
    return RouterOutput(pre, pre, mask, weights)


class Record:
    def __init__(self, router):
        self.router = router


def metrics_of(records_routers, surprises):
    return routing_metrics.routing_metrics([Record(r) for r in records_routers], surprises, "surprise")


def adamw_update(updates, params, active):
    tx = per_expert_adamw(1e-3)
    return tx.update(updates, tx.init(params), params, expert_active=active)


def filter_update(updates, active):
    tx = sigma_filter(idle_aware=True)
    return tx.update(updates, tx.init(updates), expert_active=active)


def expert_grads():
    return {f"block_{l}": {"moe": {"experts": {"w1": f32(E, C, I)}}} for l in range(L)}


# (name, function of arrays, its arrays, the message the AssertionError must contain)
CASES = [
    # gate
    ("gate_tokens_rank", lambda x, p, t: top_any_gate(x, p, t, 1), (f32(B, T, C), f32(C, E), f32(E)),
     "top_any_gate: x_NxC must be [N, C]"),
    ("gate_tokens_int", lambda x, p, t: top_any_gate(x, p, t, 1), (i32(N, C), f32(C, E), f32(E)),
     "top_any_gate: x_NxC must be floating"),
    ("gate_protos_c", lambda x, p, t: top_any_gate(x, p, t, 1), (f32(N, C), f32(C + 1, E), f32(E)),
     "top_any_gate: protos_CxE must be [C, E], C of x_NxC"),
    ("gate_theta_e", lambda x, p, t: top_any_gate(x, p, t, 1), (f32(N, C), f32(C, E), f32(E + 1)),
     "top_any_gate: theta_E must be [E]"),
    ("gate_live_e", lambda x, p, t, live: top_any_gate(x, p, t, 1, live),
     (f32(N, C), f32(C, E), f32(E), jnp.ones((E + 1,), bool)), "top_any_gate: live_E must be [E]"),
    ("topk_router_c", lambda x, w: topk_gate(x, w, 1), (f32(N, C), f32(C + 1, E)),
     "topk_gate: router_CxE must be [C, E], C of x_NxC"),
    ("topk_bias_e", lambda x, w, b: topk_gate(x, w, 1, b), (f32(N, C), f32(C, E), f32(E - 1)),
     "topk_gate: select_bias_E must be [E]"),
    ("cosine_tokens_rank", cosine_logits, (f32(C), f32(C, E)), "cosine_logits: x_NxC must be [N, C]"),
    ("softmax_mask_bool", masked_softmax, (f32(N, E), jnp.ones((N, E))), "masked_softmax: mask_NxE must be bool"),
    ("softmax_mask_shape", masked_softmax, (f32(N, E), jnp.ones((N, E + 1), bool)),
     "masked_softmax: scores_NxE and mask_NxE must have one shape"),
    ("normalize_int", lambda x: l2_normalize(x, -1), (i32(N, C),), "l2_normalize: x must be floating"),
    # experts
    ("experts_tokens_rank", expert_outputs, (experts(), f32(B, T, C)), "expert_outputs: x_NxC must be [N, C]"),
    ("experts_tokens_int", expert_outputs, (experts(), i32(N, C)), "expert_outputs: x_NxC must be floating"),
    ("experts_w1_c", expert_outputs, (experts(c=C + 1), f32(N, C)), "expert_outputs: w1 must be [E, C, I]"),
    ("experts_w2_i", expert_outputs, ({"w1": f32(E, C, I), "w2": f32(E, I + 1, C)}, f32(N, C)),
     "expert_outputs: w2 must be [E, I, C], E and I of w1"),
    ("experts_w3", lambda p, x: expert_outputs(p, x, "swiglu"), ({**experts(), "w3": f32(E, C, I + 1)}, f32(N, C)),
     "expert_outputs: w3 must be [E, C, I] like w1"),
    ("combine_y_e", combine, (f32(N, E), f32(N, E + 1, C)), "combine: y_NxExC must be [N, E, C], N and E of weights"),
    ("combine_weights_rank", combine, (f32(N, E, 1), f32(N, E, C)), "combine: weights_NxE must be [N, E]"),
    ("ffn_tokens_rank", dense_ffn, (ffn(), f32(B, T, C)), "dense_ffn: x_NxC must be [N, C]"),
    ("ffn_w2", dense_ffn, ({"w1": f32(C, I), "w2": f32(I, C + 1)}, f32(N, C)), "dense_ffn: w2 must be [I, C]"),
    # losses
    ("ce_logits_rank", next_token_loss, (f32(B * T, V), i32(B * T), jnp.ones((B * T,))),
     "next_token_loss: logits_BxTxV must be [B, T, V]"),
    ("ce_targets_float", next_token_loss, (f32(B, T, V), f32(B, T), jnp.ones((B, T))),
     "next_token_loss: targets_BxT must be integer"),
    ("ce_targets_shape", next_token_loss, (f32(B, T, V), i32(B, T + 1), jnp.ones((B, T))),
     "next_token_loss: targets_BxT must be [B, T]"),
    ("ce_mask_shape", next_token_loss, (f32(B, T, V), i32(B, T), jnp.ones((B * T,))),
     "next_token_loss: mask_BxT must be [B, T]"),
    ("gate_loss_pre_rank", hybrid_gate_loss, (f32(B, T, E), f32(B, T, E)), "hybrid_gate_loss: pre_NxE must be [N, E]"),
    ("gate_loss_surprise_e", hybrid_gate_loss, (f32(N, E), f32(N, E + 1)),
     "hybrid_gate_loss: surprise_NxE must be [N, E] like pre_NxE"),
    ("gate_loss_token_mask", lambda p, s, m: hybrid_gate_loss(p, s, token_mask_N=m), (f32(N, E), f32(N, E), f32(N + 1)),
     "hybrid_gate_loss: token_mask_N must be [N]"),
    ("gate_loss_target_float", lambda p, s, t: hybrid_gate_loss(p, s, target_N=t), (f32(N, E), f32(N, E), f32(N)),
     "hybrid_gate_loss: target_N must be integer"),
    ("lb_mask_shape", load_balancing_loss, (f32(N, E), jnp.ones((N, E + 1), bool)),
     "load_balancing_loss: mask_NxE must be [N, E] like router_logits_NxE"),
    ("z_int", router_z_loss, (i32(N, E),), "router_z_loss: router_logits_NxE must be floating"),
    # surprise
    ("s_output_grad_rank", lambda d: output_grad_surprise(surprise_inputs(d_expert_out=d)), (f32(N, C),),
     "output_grad_surprise: d_expert_out must be [N, E, C]"),
    ("s_closed_weights_n", lambda w: output_grad_closed_surprise(surprise_inputs(weights=w)), (f32(N + 1, E),),
     "output_grad_closed_surprise: weights must be [N, E], N of d_moe_out"),
    ("s_advantage_g_c", lambda g: advantage_surprise(surprise_inputs(d_moe_out=g)), (f32(N, C + 1),),
     "advantage_surprise: d_moe_out must be [N, C] of expert_out"),
    ("s_advantage_weights_e", lambda w: advantage_surprise(surprise_inputs(weights=w)), (f32(N, E + 1),),
     "advantage_surprise: weights must be [N, E] of expert_out"),
    ("s_grad_norms_g", expert_grad_norms, (experts(), f32(N, C), f32(N + 1, C)),
     "expert_grad_norms: g_NxC must be [N, C] like x_NxC"),
    ("s_grad_norms_w1", expert_grad_norms, (experts(c=C + 1), f32(N, C), f32(N, C)),
     "expert_grad_norms: w1 must be [E, C, I], C of x_NxC"),
    ("s_learning_cost_x", lambda g, x, p: learning_cost_surprise(Ext(g, x, p)), (f32(N, C), f32(B, T, C), experts()),
     "learning_cost_surprise: expert_in must be [N, C]"),
    ("s_learning_cost_g", lambda g, x, p: learning_cost_surprise(Ext(g, x, p)), (f32(N + 1, C), f32(N, C), experts()),
     "learning_cost_surprise: d_moe_out must be [N, C] like expert_in"),
    # gate targets
    ("tie_argmin_rank", gate_targets.random_tie_argmin, (f32(N), jax.random.key(0)),
     "random_tie_argmin: surprise_NxE must be [N, E]"),
    ("nonconstant_live", gate_targets.nonconstant_rows, (f32(N, E), jnp.ones((E + 1,), bool)),
     "nonconstant_rows: live_E must be [E]"),
    ("budget_int", lambda p: gate_targets.avg_k_budget(p, 2.0), (i32(N, E),), "avg_k_budget: pre_NxE must be floating"),
    ("expected_k_rank", lambda p: gate_targets.expected_k(p, 2), (f32(B, T, E),), "expected_k: pre_NxE must be [N, E]"),
    # analysis
    ("hits_surprise_e", analysis.gate_accuracy, (f32(N, E), f32(N, E + 1)),
     "gate_hits: surprise_NxE must be [N, E] like pre_NxE"),
    ("hits_token_mask", analysis.gate_hits, (f32(N, E), f32(N, E), f32(N + 1)), "gate_hits: token_mask_N must be [N]"),
    ("targets_mask", analysis.surprise_target_counts, (f32(N, E), jnp.ones((N + 1, E), bool)),
     "surprise_target_counts: mask_NxE must be [N, E] like surprise_NxE"),
    ("fallback_rank", analysis.fallback_count, (f32(B, T, E),), "fallback_count: pre_NxE must be [N, E]"),
    ("domain_counts_float", lambda m, d: analysis.domain_expert_counts(m, d, 2), (jnp.ones((N, E), bool), f32(N)),
     "domain_expert_counts: domain_N must be integer"),
    ("domain_counts_n", lambda m, d: analysis.domain_expert_counts(m, d, 2), (jnp.ones((N, E), bool), i32(N + 1)),
     "domain_expert_counts: domain_N must be [N]"),
    ("token_counts_rank", lambda d: analysis.domain_token_counts(d, 2), (i32(B, T),),
     "domain_token_counts: domain_N must be [N]"),
    ("nmi_rank", analysis.nmi_from_counts, (f32(E),), "nmi_from_counts: counts_DxE must be [..., D, E]"),
    ("avg_k_d", analysis.avg_k_from_counts, (f32(L, 3, E), f32(2)),
     "avg_k_from_counts: counts_DxE must be [..., D, E], D of tokens_D"),
    ("loss_sums_b", lambda c, m, d: analysis.domain_loss_sums(c, m, d, 2), (f32(B, T), f32(B, T), i32(B + 1)),
     "domain_loss_sums: domain_B must be [B]"),
    ("domain_means_shape", analysis.domain_means, (f32(3), f32(4)),
     "domain_means: counts_D must be shaped like sums_D"),
    # routing metrics
    ("informative_e", routing_metrics.informative_gate_hits, (f32(N, E), f32(N, E + 1)),
     "informative_gate_hits: surprise_NxE must be [N, E] like pre_NxE"),
    ("load_balance_rank", routing_metrics.load_balance, (jnp.ones((N,), bool),),
     "load_balance: mask_NxE must be [N, E]"),
    ("entropy_int", routing_metrics.weight_entropy, (i32(N, E),), "weight_entropy: weights_NxE must be floating"),
    ("metrics_one_s_per_record", lambda p, m, w, s: metrics_of([record(p, m, w)] * 2, [s]),
     (f32(N, E), jnp.ones((N, E), bool), f32(N, E), f32(N, E)),
     "routing_metrics: surprises must hold one S per record"),
    # optimizer
    ("adamw_shapes", adamw_update, ({"w": f32(E, C)}, {"w": f32(C, E)}, None),
     "per_expert_adamw: updates must have the params' shapes"),
    ("adamw_active_rank", adamw_update, (expert_grads(), expert_grads(), jnp.ones((E,), bool)),
     "per_expert_adamw: expert_active must be [L, E]"),
    ("filter_active_bool", filter_update, (expert_grads(), jnp.ones((L, E))),
     "sigma_filter: expert_active must be bool"),
]


class TestContractsFire(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_a_broken_contract_names_the_function_and_argument(self, fn, args, message):
        with self.assertRaises(AssertionError) as raised:
            self.variant(fn)(*args)
        self.assertIn(f"[{message}", str(raised.exception))
        self.assertIn("[Chex]", str(raised.exception))


class TestContractsAcceptWhatTheModelPasses(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_bfloat16_tokens_through_gates_experts_and_losses(self):
        x = f32(N, C).astype(jnp.bfloat16)
        gate = self.variant(lambda x_, p, t: top_any_gate(x_, p, t, 2))(x, f32(C, E), f32(E))
        ref = top_any_gate(x.astype(jnp.float32), f32(C, E), f32(E), 2)
        # The router upcasts to float32 first: the numbers of the upcast tokens.
        chex.assert_trees_all_close((gate.logits, gate.pre, gate.weights), (ref.logits, ref.pre, ref.weights),
                                    rtol=1e-6, atol=1e-6)
        chex.assert_trees_all_equal(gate.mask, ref.mask)
        routed = self.variant(lambda x_, w: topk_gate(x_, w, 2))(x, f32(C, E))
        chex.assert_type([routed.logits, routed.weights], jnp.float32)
        y = self.variant(expert_outputs)(experts(), x)
        chex.assert_shape(y, (N, E, C))
        chex.assert_type(y, jnp.bfloat16)
        out = self.variant(combine)(gate.weights, y)
        chex.assert_shape(out, (N, C))
        chex.assert_type(out, jnp.float32)
        h = self.variant(dense_ffn)(ffn(), x)
        chex.assert_type(h, jnp.bfloat16)
        loss, _, _ = self.variant(next_token_loss)(f32(B, T, V).astype(jnp.bfloat16), i32(B, T), jnp.ones((B, T), bool))
        chex.assert_shape(loss, ())

    def test_contracts_see_per_example_shapes_under_vmap_and_hold_under_vjp(self):
        x_BxNxC, protos, theta = f32(B, N, C), f32(C, E), f32(E)
        batched = jax.vmap(lambda x: top_any_gate(x, protos, theta, 2).weights)(x_BxNxC)
        chex.assert_trees_all_close(batched, jnp.stack([top_any_gate(x, protos, theta, 2).weights for x in x_BxNxC]),
                                    rtol=1e-6, atol=1e-6)
        p = experts(swiglu=True)
        y, pullback = jax.vjp(lambda x: expert_outputs(p, x, "swiglu"), f32(N, C))
        (dx,) = pullback(jnp.ones_like(y))
        chex.assert_shape(dx, (N, C))
        g = jax.grad(lambda x: jnp.sum(expert_grad_norms(p, x, f32(N, C))))(f32(N, C))
        chex.assert_shape(g, (N, C))
