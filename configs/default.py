"""default: the `make train` run; trains on 2 CPU cores in under 5 minutes.

Two layers of the faithful surprise-gated MoE (8 experts each) on the embedded multi-domain
chat corpus with the byte tokenizer; faithful gate loss, fallback and 2-sigma filter.
"""
from onn_jax.configdict import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict(dict(vocab_size=262, hidden=64, num_layers=2, num_heads=4, max_len=128,
                              norm="layernorm", final_norm=False, dtype="float32"))
    c.model.moe = ConfigDict(dict(num_experts=8, intermediate=128, expert_kind="gelu",
                                  router="surprise", fallback_k=None, w_ce=1.0, w_kl=1.0, w_aux=1.0,
                                  surprise="output_grad", dispatch="dense"))
    c.optim = ConfigDict(dict(lr=3e-3, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_norm=None))
    c.optim.grad_filter = ConfigDict(dict(mode="one_sided", scope="pooled", sigma=2.0))
    c.mesh = ConfigDict(dict(data=-1, expert=1, fsdp=1))
    c.data = ConfigDict(dict(source="builtin", tokenizer="byte", seq_len=128, batch_size=16,
                             records_per_domain=1000, eval_fraction=0.05, seed=0))
    c.train = ConfigDict(dict(steps=500, seed=0, log_every=10, eval_every=100, eval_batches=4,
                              sample_every=0, sample_prompt="What is 12 + 7?", sample_tokens=40,
                              progress=True))
    c.checkpoint = ConfigDict(dict(enabled=True, every=250, keep=2))
    return c
