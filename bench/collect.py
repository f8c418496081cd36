"""Appends onn-bench / torch_peer JSON lines to docs/benchmarks/<size>.jsonl with the run's
device, date and command, so every table row in docs/BENCHMARKS.md has its raw line.

    python -m bench.collect docs/benchmarks/gpu_olmoe.jsonl RUN.jsonl --date 2026-12-07 \\
        --command "python3 -m bench.bench --preset gpu_olmoe ..."
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="collect", description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--date", required=True)
    ap.add_argument("--command", default=None)
    ap.add_argument("--note", default=None)
    args = ap.parse_args(argv)
    with open(args.out, "a") as out:
        for path in args.inputs:
            for line in open(path):
                if not line.startswith("{"):
                    continue
                rec = json.loads(line)
                rec = {"mode": rec.get("mode"), "step_ms": rec.get("step_ms"),
                       "pipelined_step_ms": rec.get("pipelined_step_ms"),
                       "pipelined_tokens_per_s": rec.get("pipelined_tokens_per_s"),
                       "mfu_pipelined": rec.get("mfu_pipelined"), "peak_mem_gib": rec.get("peak_mem_gib"),
                       "device": rec.get("device_kind"), "date": args.date, **rec}
                if args.command:
                    rec["command"] = args.command
                if args.note:
                    rec["note"] = args.note
                out.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
