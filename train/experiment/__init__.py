"""`onn-experiment`: a grid of training configs x seeds through the onn-train loop, summarised
as a markdown table, per-run JSON and plots.

    onn-experiment configs/experiments/routing.py [--out DIR] [--seeds 0,1] [--only a,b] [--steps N]
                   [--compile-cache DIR|none] [--config.a.b=VALUE ...] [--dry-run] [--parallel N]

The experiment file (get_experiment(): base config, overrides, runs, seeds, kind) is described in
train/experiment/spec.py. Every run is evaluated on the whole held-out split of all domains of the
builtin corpus (onn_jax.core.analysis): loss per domain, avg_k (per domain), gate accuracy on
unmasked tokens (argmax pre == argmin S of the run's own surprise definition) and expert<->domain
NMI per layer; these also go into each run's metrics.jsonl at every train.eval_every as `analysis/*`.
Outputs in DIR: results.jsonl (one line per run, with its resolved Config(s) as `configs` and
their hash `config_hash`; a re-run skips a finished run when its hash matches, or when its
configs differ only by fields added to the code since, left at their defaults
(train/experiment/reuse.py); so a quick `--steps 20` trial is re-run, and its row replaced, by
the full run, while a new option does not invalidate a grid),
results.md (the table, mean +- std over seeds), plots/*.png, runs/<label>/seed_<s>/ (the
usual onn-train workdir of each run). --config.a.b=VALUE sets a config field in every run
(applied last); --dry-run builds and checks every run's config and lists the grid, writing nothing;
--parallel N runs up to N cells at once as processes of their own (train/experiment/parallel.py).

Modules, bottom up: spec (experiment files, a cell's Config), analysis (the `analysis/*` eval),
cells (train one cell, its configs and hash), results (results.jsonl), reuse (when an old row
still stands), report (results.md and plots), parallel (cells as processes), grid (run the grid),
cli (onn-experiment; `python -m train.experiment` runs it too).
"""
