"""What `onn-train` runs: the data, the set-up (checks, workdir lock, init or resume), the step
loop with its logs, evals, checkpoints and stops, and the end-of-run report (train.run.loop.train)."""
