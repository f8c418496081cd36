"""The training program: onn-train (main, loop), config loading, logging and dashboards."""
