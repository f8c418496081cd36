"""The programs over the onn_jax library: the console scripts and what they share.

Single-module programs, flat: main (onn-train), generate (onn-generate), export (onn-export),
eval_cli (onn-eval), tokenize (onn-tokenize), tokenizer_cli (onn-tokenizer). Subpackages:

    experiment/  onn-experiment: grids of configs x seeds through the training loop
    run/         what onn-train runs: set-up, the step loop, logs, evals, checkpoints, the report
    plots/       onn-plot's dashboards from metrics.jsonl (onn-train draws them after a run)
    common/      what several programs share: config files, signals, the workdir's layout and
                 checks, metrics.jsonl, loading a trained model

Imports flow one way: programs > run > plots > common; no program imports another (the
import-linter contracts in pyproject.toml).
"""
