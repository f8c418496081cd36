"""The model: attention, the MoE layer (taps, records, a layer's Surprise), gated heads, sparse
embeddings, adaptive softmax, the Flax layers and the Transformer, per-layer <-> stacked
parameters, KV-cache decoding. The Flax modules create parameters and call pure functions."""
