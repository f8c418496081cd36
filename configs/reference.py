"""reference: the sizes of the original PyTorch proof of concept (docs/ALGORITHM.md).

C=32, intermediate 128, E=32 experts, 1 layer, 4 heads, sequence length 256, bf16 compute,
faithful gate (fallback E/2, CE+KL hybrid, w_aux 1), 2-sigma filter and AdamW (lr 1e-3).
Departure: the byte tokenizer (vocab 262) instead of the PoC's 151k-token vocabulary.
"""
from onn_jax.configdict import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict(dict(vocab_size=262, hidden=32, num_layers=1, num_heads=4, max_len=256,
                              norm="layernorm", norm_eps=1e-5, final_norm=False, dtype="bfloat16"))
    c.model.moe = ConfigDict(dict(num_experts=32, intermediate=128, expert_kind="gelu",
                                  router="surprise", fallback_k=None, w_ce=1.0, w_kl=1.0, w_aux=1.0,
                                  surprise="output_grad", dispatch="dense"))
    c.optim = ConfigDict(dict(lr=1e-3, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_norm=None))
    c.optim.grad_filter = ConfigDict(dict(mode="one_sided", scope="pooled", sigma=2.0))
    c.mesh = ConfigDict(dict(data=-1, expert=1, fsdp=1))
    c.data = ConfigDict(dict(source="builtin", tokenizer="byte", seq_len=256, batch_size=8,
                             records_per_domain=1000, eval_fraction=0.05, seed=0))
    c.train = ConfigDict(dict(steps=2000, seed=0, log_every=20, eval_every=250, eval_batches=4,
                              sample_every=500, sample_prompt="What is 12 + 7?", sample_tokens=48,
                              progress=True))
    c.checkpoint = ConfigDict(dict(enabled=True, every=500, keep=3))
    return c
