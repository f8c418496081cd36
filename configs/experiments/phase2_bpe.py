"""phase2_bpe: the slot embedding and the adaptive softmax at a BPE vocabulary (issue 15 item 6).

phase2.py's model, steps, MoE (top-2 + load balancing) and seeds, with a byte-level BPE of 2048
ids (phase2_bpe2048.json, HF `tokenizers` via onn-tokenizer) trained on a builtin-corpus sample
of another seed than the runs' (so the arithmetic, brackets and strings records it saw are not
the runs' held-out ones; the prose domain has only ~404 docstrings, shared by every sample):

    python -c "import json; from onn_jax.data.corpus import build_corpus; \
      records = build_corpus(seed=1000, records_per_domain=2000); \
      open('bpe_corpus.jsonl','w').write(''.join(json.dumps(r)+'\\n' for r in records))"
    onn-tokenizer train --vocab 2048 bpe_corpus.jsonl --out configs/experiments/phase2_bpe2048.json

(deterministic: the same file byte for byte). Rows:
  bpe_table      table embedding, dense output: the baseline
  bpe_slots      model.embed.kind = slots (256 shared slots, code 16, advantage surprise)
  bpe_adaptive   model.output.kind = adaptive, cutoffs (512,): the 512 most frequent ids in the
                 head softmax, the other 1536 in one tail cluster of width 32 // 4 = 8
Losses are per BPE token: compare them with bpe_table only, never with phase2.py's byte rows.
"""
import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
BPE_ROW = {"data.tokenizer": str(HERE / "phase2_bpe2048.json"), "model.vocab_size": 2048}


def _phase2() -> dict:
    spec = importlib.util.spec_from_file_location("_onn_phase2", HERE / "phase2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_experiment()


def get_experiment():
    return {
        **_phase2(),
        "name": "phase2_bpe",
        "runs": {
            "bpe_table": dict(BPE_ROW),
            "bpe_slots": {**BPE_ROW, "model.embed.kind": "slots"},
            "bpe_adaptive": {**BPE_ROW, "model.output.kind": "adaptive", "model.output.cutoffs": (512,)},
        },
        "baselines": ["bpe_table"],
    }
