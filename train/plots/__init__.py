"""onn-plot: PNG dashboards from a run's metrics.jsonl; `onn-plot DIR` writes DIR/plots/*.png.

    loss.png         main loss and accuracy, train and held-out eval
    gate.png         routing health (gate accuracy on tokens with non-constant S, dead experts,
                     load imbalance, router entropy, fallback and inactive-target shares),
                     avg_k, gate loss and mean threshold sigmoid(theta), each on its own axes
    expert_load.png  per-layer heatmap: expert x step, share of tokens routed to the expert
    surprise.png     per-layer histogram of Surprise on active (token, expert) pairs, latest eval
    domain_routing.png  per-layer heatmap: domain x expert, share of positions routed, latest eval

Gated attention heads (`attn/*`) and slot embedding (`embed/*`), train/plots/unit_figures.py:
    attn_gate.png, embed_gate.png   their routing health, avg_k, gate loss, thresholds
    head_load.png, slot_load.png    per-layer heatmap: head (slot) x step, share of tokens using it
    domain_heads.png, domain_slots.png  domain x head (slot), share of positions, latest eval

Modules, bottom up: draw (shared drawing helpers), figures and unit_figures (one function per
PNG), dashboards (draw them all, then write), cli (onn-plot). onn-train draws the dashboards at
the end of a run; the plots know nothing of the training loop (an import-linter contract).
"""
