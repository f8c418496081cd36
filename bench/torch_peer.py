"""The PyTorch peer of onn-bench: a plain compiled top-k MoE transformer of the same size.

    python -m bench.torch_peer --preset gpu_olmoe [--top-k 8] [--steps 20]
    python -m bench.torch_peer --gemm-shapes 131072x2048x1024,131072x1024x2048 --groups 64

What a GPU user would otherwise run: pre-norm blocks (the config's RMSNorm or LayerNorm), RoPE
attention through SDPA (flash), a linear top-k router with softmax weights over the chosen k and
the Switch load-balancing loss, dropless GELU experts through torch's grouped GEMM (`torch._grouped_mm`: every token's k
pairs sorted by expert, one GEMM per expert matrix, combined with index_add in float32), an
untied LM head; float32 parameters under bf16 autocast, fused AdamW, `torch.compile`.

Timed like onn-bench (bench/timing.py): `step_ms` is the median of waited steps, `pipelined_step_ms`
the mean of steps enqueued back to back; MFU by the same FLOP formula (train_flops_per_token,
k = top_k), peak memory from torch.cuda.max_memory_allocated. One JSON line with the fields of
onn-bench's lines and `mode: "torch_peer"`. Sanity: the loss at initialisation must be near ln V,
and the parameter count is printed next to the one the formula implies.

`--gemm-shapes` times the grouped GEMM alone on uneven groups (forward, forward + backward), the
rows to set beside bench/gemm_tune.py's: how much of a step gap is the kernel and how much glue.

torch is on the GPU image, not a dependency of onn-jax; this module imports it lazily.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

from bench.gemm_tune import uneven_sizes
from bench.modes import load_config
from onn_jax.training.flops import PEAK_TFLOPS, train_flops_per_token


def _torch():
    import torch
    return torch


def grouped_mm(x, w, offs):
    """y[r] = x[r] @ w[g(r)] over expert-sorted rows; offs = cumulative row ends (int32)."""
    torch = _torch()
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offs)


def build_model(cfg, top_k: int, lb_weight: float):
    """The peer model for onn_jax's ModelConfig `cfg` (sizes only)."""
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional
    c, h, layers = cfg.hidden, cfg.num_heads, cfg.num_layers
    e, inter, vocab = cfg.moe.num_experts, cfg.moe.intermediate, cfg.vocab_size
    d = c // h
    norm = (lambda: nn.RMSNorm(c, eps=cfg.norm_eps)) if cfg.norm == "rmsnorm" else (
        lambda: nn.LayerNorm(c, eps=cfg.norm_eps))

    def rope(x, positions):  # rotate-half form, as onn_jax.nn.attention.apply_rope
        half = d // 2
        freqs = cfg.rope_base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
        ang = positions.float()[:, None] * freqs  # [T, D/2]
        sin, cos = ang.sin()[None, None], ang.cos()[None, None]
        x1, x2 = x.float()[..., :half], x.float()[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(c, e, bias=False)
            self.w1 = nn.Parameter(torch.empty(e, c, inter).uniform_(-c ** -0.5, c ** -0.5))
            self.w2 = nn.Parameter(torch.empty(e, inter, c).uniform_(-inter ** -0.5, inter ** -0.5))

        def forward(self, x):  # x [N, C] (bf16 under autocast)
            n = x.shape[0]
            logits = self.router(x).float()
            top_logits, top_idx = torch.topk(logits, top_k, dim=-1)            # [N, k]
            weights = torch.softmax(top_logits, dim=-1)
            probs = torch.softmax(logits, dim=-1)
            load = torch.zeros(e, device=x.device).scatter_add_(
                0, top_idx.reshape(-1), torch.ones(n * top_k, device=x.device)) / (n * top_k)
            lb = e * torch.sum(load * probs.mean(0))
            flat_e = top_idx.reshape(-1)
            order = torch.argsort(flat_e, stable=True)                          # rows sorted by expert
            token = torch.div(order, top_k, rounding_mode="floor")
            counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(
                0, flat_e, torch.ones_like(flat_e, dtype=torch.int32))       # static shape (no bincount)
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            rows = x.to(torch.bfloat16)[token]
            hidden = F.gelu(grouped_mm(rows, self.w1.to(torch.bfloat16), offs))
            y = grouped_mm(hidden, self.w2.to(torch.bfloat16), offs)
            y = y.float() * weights.reshape(-1)[order][:, None]
            out = torch.zeros(n, c, device=x.device, dtype=torch.float32).index_add_(0, token, y)
            return out.to(x.dtype), lb

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm_attn, self.norm_moe = norm(), norm()
            self.qkv = nn.Linear(c, 3 * c, bias=False)
            self.out = nn.Linear(c, c, bias=False)
            self.moe = MoE()

        def forward(self, x, positions):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.norm_attn(x)).view(b, t, 3, h, d).unbind(2)
            q, k, v = rope(q.transpose(1, 2), positions), rope(k.transpose(1, 2), positions), v.transpose(1, 2)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(attn.transpose(1, 2).reshape(b, t, c))
            moe, lb = self.moe(self.norm_moe(x).reshape(b * t, c))
            return x + moe.view(b, t, c), lb

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, c)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = norm() if cfg.final_norm else nn.Identity()
            self.head = nn.Linear(c, vocab, bias=False)

        def forward(self, inputs, targets):
            x = self.embed(inputs)
            positions = torch.arange(inputs.shape[1], device=inputs.device)
            lb_total = 0.0
            for block in self.blocks:
                x, lb = block(x, positions)
                lb_total = lb_total + lb
            logits = self.head(self.norm(x)).float()
            main = F.cross_entropy(logits.view(-1, vocab), targets.view(-1))
            return main + lb_weight * lb_total, main

    return LM()


def time_peer(cfg, batch: int, seq: int, top_k: int, steps: int, warmup: int, lb_weight: float,
              compile_model: bool = True) -> dict:
    torch = _torch()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = build_model(cfg, top_k, lb_weight).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    fwd = torch.compile(model) if compile_model else model
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(dev)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, main = fwd(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return main

    t0 = time.perf_counter()
    init_loss = float(step())
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    waited = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        waited.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(steps):
        main = step()
    torch.cuda.synchronize()
    pipelined = (time.perf_counter() - t) / steps
    step_s = statistics.median(waited)
    flops_tok = train_flops_per_token(cfg, seq, float(top_k))
    kind = torch.cuda.get_device_name()
    peak = next((v for name, v in PEAK_TFLOPS.items() if name in kind), None)
    params = sum(p.numel() for p in model.parameters())
    c, e, i, v = cfg.hidden, cfg.moe.num_experts, cfg.moe.intermediate, cfg.vocab_size
    norm_params = c if cfg.norm == "rmsnorm" else 2 * c
    want_params = (2 * v * c + cfg.num_layers * (4 * c * c + c * e + 2 * e * c * i + 2 * norm_params)
                   + (norm_params if cfg.final_norm else 0))
    return {
        "mode": "torch_peer", "device_kind": kind, "torch": torch.__version__, "batch": batch, "seq": seq,
        "top_k": top_k, "router": "topk", "dispatch": "dropless", "gemm": "torch_grouped_mm",
        "attention": "sdpa", "step_ms": round(step_s * 1e3, 2), "pipelined_step_ms": round(pipelined * 1e3, 2),
        "tokens_per_s": round(batch * seq / step_s), "pipelined_tokens_per_s": round(batch * seq / pipelined),
        "model_tflops": round(flops_tok * batch * seq / step_s / 1e12, 1),
        "mfu": round(flops_tok * batch * seq / step_s / (peak * 1e12), 4) if peak else None,
        "mfu_pipelined": round(flops_tok * batch * seq / pipelined / (peak * 1e12), 4) if peak else None,
        "peak_tflops": peak, "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3),
        "compile_s": round(compile_s, 1), "init_loss": round(init_loss, 4), "ln_vocab": round(math.log(v), 4),
        "main_loss": round(float(main), 4), "params": params, "params_by_formula": want_params,
        "flops_per_token": flops_tok,
    }


def time_gemm(shape: str, groups: int, steps: int = 20) -> dict:
    """torch's grouped GEMM on uneven groups: forward and forward + backward (dx, dw), bf16."""
    torch = _torch()
    r, k, n = (int(v) for v in shape.split("x"))
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(r, k, generator=gen).to("cuda", torch.bfloat16).requires_grad_(True)
    w = (torch.randn(groups, k, n, generator=gen) / math.sqrt(k)).to("cuda", torch.bfloat16).requires_grad_(True)
    sizes = uneven_sizes(r, groups)
    offs = torch.as_tensor(np.cumsum(sizes), dtype=torch.int32, device="cuda")
    dy = torch.randn(r, n, generator=gen).to("cuda", torch.bfloat16)

    def median_ms(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        return statistics.median(out)

    fwd_ms = median_ms(lambda: grouped_mm(x, w, offs))
    fb_ms = median_ms(lambda: torch.autograd.grad(grouped_mm(x, w, offs), (x, w), dy))
    flops = 2.0 * r * k * n
    return {"shape": shape, "groups": groups, "max_group": int(sizes.max()), "backend": "torch_grouped_mm",
            "device_kind": torch.cuda.get_device_name(), "torch": torch.__version__,
            "fwd_ms": round(fwd_ms, 3), "fwd_bwd_ms": round(fb_ms, 3),
            "fwd_tflops": round(flops / fwd_ms / 1e9, 1), "fwd_bwd_tflops": round(3 * flops / fb_ms / 1e9, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="torch_peer", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="a config file (its model and data sizes)")
    ap.add_argument("--preset", default="gpu_olmoe", help="an onn-bench preset when no --config")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--lb-weight", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="eager mode (debugging)")
    ap.add_argument("--gemm-shapes", help="RxKxN,... : time the grouped GEMM alone instead")
    ap.add_argument("--groups", type=int, default=64)
    args = ap.parse_args(argv)
    if args.gemm_shapes:
        for shape in args.gemm_shapes.split(","):
            print(json.dumps(time_gemm(shape, args.groups)), flush=True)
        return 0
    name, cfg = load_config(args)
    rec = time_peer(cfg.model, cfg.data.batch_size, cfg.data.seq_len, args.top_k, args.steps, args.warmup,
                    args.lb_weight, not args.no_compile)
    print(json.dumps({"config": name, **rec}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
