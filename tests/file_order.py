"""Longest test files first, so `-n 2 --dist loadfile` ends with short files on both workers.

`--dist loadfile` hands whole files to the workers in a queue; pytest-xdist's default order is by
number of tests, which puts one-test files that run a minute (two-process training, kill/resume
chains) at the end of the queue, where one worker runs them alone while the other idles. Here the
files are ordered by their measured seconds from the last run (pytest's cache, written by the
xdist controller), else by SEED_S (seconds measured on a 2-core machine, for a fresh clone), else
by an estimate: a test marked `slow` counts SLOW_S, any other test OTHER_S. The tests within a
file keep their order (module fixtures are shared in that order); only the order of files changes,
so every test still runs exactly as before."""
import pytest

CACHE_KEY = "onn/file_seconds"
SLOW_S, OTHER_S = 20.0, 0.5
# Seconds per file from the 40 slowest test phases of a full run (2 cores, shared, at 1f3496a);
# lower bounds (a file's faster tests are not counted). Other files use the estimate.
SEED_S = {"tests/test_faults.py": 246, "tests/test_bad_input.py": 183, "tests/test_heads.py": 164,
          "tests/test_bench.py": 122, "tests/test_scan_layers.py": 113, "tests/test_router_state.py": 108,
          "tests/test_eval_cli.py": 104, "tests/test_experiment.py": 89, "tests/test_train_cli.py": 85,
          "tests/test_full_stack_sharding.py": 81, "tests/test_output.py": 80, "tests/test_dropless.py": 73,
          "tests/test_multiprocess_train.py": 72, "tests/test_shards.py": 41, "tests/test_embed.py": 40,
          "tests/test_accumulate.py": 34, "tests/test_checkpoint.py": 33, "tests/test_step.py": 32,
          "tests/test_multiprocess.py": 30, "tests/test_surprise.py": 28, "tests/test_model.py": 26}


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def estimate(items) -> dict:
    seconds = {}
    for item in items:
        cost = SLOW_S if item.get_closest_marker("slow") else OTHER_S
        seconds[file_of(item.nodeid)] = seconds.get(file_of(item.nodeid), 0.0) + cost
    return seconds


def longest_files_first(config: pytest.Config, items: list) -> None:
    """Reorders `items` in place: files by decreasing seconds, each file's tests in their order."""
    cache = getattr(config, "cache", None)
    measured = cache.get(CACHE_KEY, {}) if cache is not None else {}
    guess = estimate(items)
    first_seen = {}
    for i, item in enumerate(items):
        first_seen.setdefault(file_of(item.nodeid), i)

    def key(item):
        name = file_of(item.nodeid)
        return -measured.get(name, SEED_S.get(name, guess[name])), first_seen[name]
    items.sort(key=key)  # stable: the order within a file is kept


class Recorder:
    """On the xdist controller (or a plain run): each file's summed test seconds, saved at the end
    of a run that ran every test of the file set (a run of one file updates that file only)."""

    def __init__(self, config: pytest.Config):
        self.config, self.seconds = config, {}

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report):
        name = file_of(report.nodeid)
        self.seconds[name] = self.seconds.get(name, 0.0) + report.duration

    @pytest.hookimpl
    def pytest_sessionfinish(self, session, exitstatus):
        if getattr(self.config, "cache", None) is None or not self.seconds:
            return
        saved = dict(self.config.cache.get(CACHE_KEY, {}))
        saved.update({k: round(v, 1) for k, v in self.seconds.items()})
        self.config.cache.set(CACHE_KEY, saved)
