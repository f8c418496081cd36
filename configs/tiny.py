"""tiny: a few-second CPU run for tests and smoke checks (1 layer, 4 experts, 30 steps)."""
from onn_jax.configdict import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict(dict(vocab_size=262, hidden=32, num_layers=1, num_heads=4, max_len=64,
                              dtype="float32"))
    c.model.moe = ConfigDict(dict(num_experts=4, intermediate=32, router="surprise",
                                  fallback_k=None, w_ce=1.0, w_kl=1.0, w_aux=1.0))
    c.optim = ConfigDict(dict(lr=3e-3, weight_decay=0.01))
    c.mesh = ConfigDict(dict(data=1, expert=1, fsdp=1))  # one device, even where 8 are forced
    c.data = ConfigDict(dict(source="builtin", tokenizer="byte", seq_len=64, batch_size=8,
                             records_per_domain=100, eval_fraction=0.1, seed=0))
    c.train = ConfigDict(dict(steps=30, seed=0, log_every=5, eval_every=15, eval_batches=2,
                              sample_every=0, sample_prompt="What is 2 + 3?", sample_tokens=12,
                              progress=False))
    c.checkpoint = ConfigDict(dict(enabled=True, every=15, keep=2))
    return c
