"""gpu_large: the GPU benchmark size. C512, I256, E64, 8 layers, 8 heads, vocab 32000,
batch 32, seq 512, bf16 compute (router, Surprise and losses stay float32).

vocab 32000 suits a local tokenizer.json (--config.data.tokenizer=PATH); with the byte
tokenizer the ids above 261 are simply never used.
"""
from onn_jax.configdict import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict(dict(vocab_size=32000, hidden=512, num_layers=8, num_heads=8, max_len=512,
                              norm="layernorm", final_norm=False, dtype="bfloat16",
                              attention="auto"))
    c.model.moe = ConfigDict(dict(num_experts=64, intermediate=256, expert_kind="gelu",
                                  router="surprise", fallback_k=None, w_ce=1.0, w_kl=1.0, w_aux=1.0,
                                  surprise="output_grad", dispatch="dense", capacity_factor=None))
    c.optim = ConfigDict(dict(lr=1e-3, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_norm=None))
    c.optim.grad_filter = ConfigDict(dict(mode="one_sided", scope="pooled", sigma=2.0))
    c.mesh = ConfigDict(dict(data=-1, expert=1, fsdp=1))
    c.data = ConfigDict(dict(source="builtin", tokenizer="byte", seq_len=512, batch_size=32,
                             records_per_domain=5000, eval_fraction=0.02, seed=0))
    c.train = ConfigDict(dict(steps=20000, seed=0, log_every=50, eval_every=1000, eval_batches=8,
                              sample_every=2000, sample_prompt="What is 12 + 7?", sample_tokens=64,
                              progress=True))
    c.checkpoint = ConfigDict(dict(enabled=True, every=1000, keep=3))
    return c
