#!/usr/bin/env bash
# One device call for issue 25's tables: every mode of a size (one process each) next to the
# PyTorch peer, then the GPU test subset; results land under $OUT as they come. Each stage has
# its own time limit and the whole run stops starting new stages at $DEADLINE_S (default 560 s).
#   bash bench/gpu_session.sh gpu_olmoe tests gpu_large
# MODES (default plain,smk,dense) picks the onn-bench modes; PROFILE=" " times without profiles;
# EXTRA adds onn-bench flags (e.g. EXTRA="--loss-chunk 256": the fused head, model.output.loss_chunk).
# BASELINE=DIR also times the onn-bench of an older tree in DIR (e.g. `mkdir base && git archive
# 60380af | tar -x -C base`), same flags without EXTRA, on the same machine; its rows get "tree": "baseline".
set -u
OUT=${OUT:-/tmp/onn_out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
DEADLINE_S=${DEADLINE_S:-560}
START=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
stage() {  # stage NAME SECONDS CMD...: runs CMD with min(SECONDS, time left), output to $OUT/NAME.log
  local name=$1 secs=$2; shift 2
  local l; l=$(left); [ "$l" -lt 30 ] && { echo "skip $name (no time left)"; return; }
  [ "$secs" -gt "$l" ] && secs=$l
  echo "== $name ($secs s)"; timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$?"
  case $name in
    *_baseline) grep '^{' "$OUT/$name.log" | sed 's/^{/{"tree": "baseline", /' >> "$OUT/results.jsonl" || true ;;
    *) grep '^{' "$OUT/$name.log" >> "$OUT/results.jsonl" || true ;;
  esac
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt"
python3 -c "import jax; print('jax', jax.__version__)" >> "$OUT/device.txt" 2>&1
COMMON="--dispatch dropless --gemm mosaic_gpu --token-sum pallas --scan-layers --force-avg-k E/8 --attention auto --steps 20 --warmup 2"
for what in "$@"; do
  case $what in
    tests) stage gpu_tests 150 env JAX_PLATFORMS=cuda XLA_FLAGS= python3 -m pytest -q -p no:cacheprovider \
             tests/test_dropless.py tests/test_dispatch.py tests/test_out_of_memory.py tests/test_head_loss.py ;;
    gemm) stage gemm 90 sh -c "python3 -m bench.gemm_tune --shapes 131072x2048x1024,131072x1024x2048 --groups 64 --no-grid; \
             python3 -m bench.torch_peer --gemm-shapes 131072x2048x1024,131072x1024x2048 --groups 64" ;;
    *) stage "${what}_onn" 260 python3 -m bench.bench --preset "$what" $COMMON --mode "${MODES:-plain,smk,dense}" \
             ${PROFILE:---profile --profile-top 40} ${EXTRA:-}
       if [ -n "${BASELINE:-}" ]; then
         stage "${what}_baseline" 260 env PYTHONPATH="$BASELINE" sh -c "cd '$BASELINE' && python3 -m bench.bench \
             --preset '$what' $COMMON --mode '${MODES:-plain,smk,dense}'"
       fi
       stage "${what}_peer" 100 python3 -m bench.torch_peer --preset "$what" --top-k 8 ;;
  esac
done
cat "$OUT/device.txt"
touch "$OUT/results.jsonl"
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "mode" in r:
        print(r.get("tree", "this"), r.get("config"), r["mode"], r.get("step_ms"), r.get("pipelined_step_ms"), r.get("mfu_pipelined"),
              r.get("peak_mem_gib"), r.get("compiled_temp_gib"), r.get("saved_residual_gib"), r.get("avg_k"))
PY
tail -n 5 "$OUT/gpu_tests.log" 2>/dev/null
