"""How tokens reach experts, behind nn/moe.py's `model.moe.dispatch`: capacity (sparse slots),
dropless (one expert-sorted row buffer), its grouped-GEMM backends and per-token sums, and expert
parallelism across devices. Each computes the dense dispatch's function when nothing drops."""
