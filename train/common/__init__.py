"""What several of the programs share, below all of them: config files and --config overrides,
the stop-signal policy and exit of a console script, the workdir's layout and checks,
metrics.jsonl, loading a trained model (workdir or export) and flag range checks."""
