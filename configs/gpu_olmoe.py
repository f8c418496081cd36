"""gpu_olmoe: an OLMoE-like size on one 80 GB GPU. C2048, I1024, E64, 4 layers, 16 heads,
vocab 50304, batch 8 x 2048, bf16 compute (router, Surprise and losses stay float32).

OLMoE-1B-7B has 16 such layers (top-8 of 64 SwiGLU experts); 4 layers keep the model and its
AdamW state on one GPU. The dropless dispatch with scanned layers is the fast path on a GPU
(grouped GEMMs, per-token sums in one kernel; docs/BENCHMARKS.md); the Surprise is the faithful
`output_grad`, taken under dropless from dL/dout (exact; no [R, C] tap).

vocab 50304 suits a local tokenizer.json (--config.data.tokenizer=PATH); with the byte
tokenizer the ids above 261 are simply never used.
"""
from onn_jax.configdict import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict(dict(vocab_size=50304, hidden=2048, num_layers=4, num_heads=16, max_len=2048,
                              norm="rmsnorm", final_norm=True, dtype="bfloat16", attention="auto",
                              scan_layers=True))
    c.model.moe = ConfigDict(dict(num_experts=64, intermediate=1024, expert_kind="gelu", top_k=8,
                                  router="surprise", fallback_k=None, w_ce=1.0, w_kl=1.0, w_aux=1.0,
                                  surprise="output_grad", dispatch="dropless", gemm="auto",
                                  token_sum="auto"))
    c.optim = ConfigDict(dict(lr=1e-3, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_norm=None))
    c.optim.grad_filter = ConfigDict(dict(mode="one_sided", scope="pooled", sigma=2.0))
    c.mesh = ConfigDict(dict(data=-1, expert=1, fsdp=1))
    c.data = ConfigDict(dict(source="builtin", tokenizer="byte", seq_len=2048, batch_size=8,
                             records_per_domain=5000, eval_fraction=0.02, seed=0))
    c.train = ConfigDict(dict(steps=5000, seed=0, log_every=50, eval_every=500, eval_batches=4,
                              sample_every=1000, sample_prompt="What is 12 + 7?", sample_tokens=64,
                              progress=True))
    c.checkpoint = ConfigDict(dict(enabled=True, every=1000, keep=3))
    return c
