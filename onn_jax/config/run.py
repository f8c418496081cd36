"""The training program's sections (mesh, data, train, checkpoint, distributed) and the top-level Config."""
from __future__ import annotations

from dataclasses import dataclass, field

from onn_jax.config.errors import check, nonneg_float, positive_int
from onn_jax.config.limits import check_values  # ranges of every field: int32, finite, UTF-8
from onn_jax.config.model import ModelConfig
from onn_jax.config.optim import OptimConfig


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. -1 on one axis means 'all remaining devices' (like MaxText's ici_*).

    data: data parallelism; expert: expert parallelism (experts split, tokens too);
    fsdp: parameters and batch sharded together (ZeRO-3 style).
    """

    data: int = -1
    expert: int = 1
    fsdp: int = 1

    def __post_init__(self):
        p = "mesh."
        sizes = {"data": self.data, "expert": self.expert, "fsdp": self.fsdp}
        for name, v in sizes.items():
            check(isinstance(v, int) and not isinstance(v, bool), p + name,
                   f"must be an integer, got {v!r}")
            check(v == -1 or v > 0, p + name, f"must be > 0 or -1, got {v}")
        check(sum(v == -1 for v in sizes.values()) <= 1, p + "data",
               "at most one mesh axis may be -1")


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and how they are batched (see onn_jax.data.dataset).

    source: `builtin` (the embedded multi-domain chat corpus), comma-separated paths of
      chat `.jsonl` files and plain-text files (read into memory), or `shards:DIR` (a
      directory written by onn-tokenize, streamed from disk; see onn_jax.data.shards).
    tokenizer: `byte` (byte-level, default) or a path to a local HF `tokenizer.json`.
    records_per_domain: records per domain of the builtin corpus (ignored for user files).
    eval_fraction: share of records held out for the evaluation split.
    pack: pack several records of one domain per row (else one record per row, padded).
    seed: corpus generation and shuffling seed.
    strict: a chat record longer than seq_len + 1 tokens is an error naming its file and
      line (default: it is cut to its first seq_len + 1 tokens). Long text records are
      always split into several rows, nothing lost (onn_jax.data.records.fit_record).
    """

    source: str = "builtin"
    tokenizer: str = "byte"
    seq_len: int = 256
    batch_size: int = 8
    records_per_domain: int = 1000
    eval_fraction: float = 0.05
    pack: bool = True
    seed: int = 0
    strict: bool = False

    def __post_init__(self):
        p = "data."
        for name in ("pack", "strict"):
            v = getattr(self, name)
            check(isinstance(v, bool), p + name, f"must be a bool, got {v!r}")
        for name in ("source", "tokenizer"):
            v = getattr(self, name)
            check(isinstance(v, str) and v != "", p + name, f"must be a non-empty string, got {v!r}")
        for name in ("seq_len", "batch_size", "records_per_domain"):
            positive_int(getattr(self, name), p + name)
        nonneg_float(self.eval_fraction, p + "eval_fraction")
        check(self.eval_fraction < 1, p + "eval_fraction", f"must be < 1, got {self.eval_fraction}")
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool), p + "seed",
               f"must be an integer, got {self.seed!r}")


SAMPLE_FORMATS = ("auto", "chat", "text")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, logging, evaluation and sample generation.

    steps: total optimizer steps (a resumed run continues up to this number).
    log_every: steps between metrics.jsonl / TensorBoard records (train metrics averaged over
      the steps since the last record); step 1, eval and sample steps are recorded too.
    eval_every: steps between held-out evaluations (0 = only at the end); eval_batches per eval.
    sample_every: steps between sample generations (0 = only at the end).
    sample_prompt, sample_tokens: the prompt of the greedy sample and its length in new tokens.
    sample_format: how the sample's prompt is encoded: `chat` (a user turn, then the
      assistant marker: the reply a chat-trained model gives), `text` (BOS + the prompt, as
      plain-text records are trained: the model continues it), `auto` (default: `text` when
      data.source is only plain-text files, else `chat`).
    progress: show the tqdm progress bar.
    max_skipped_in_a_row: a step whose loss or gradients are not finite is skipped (state
      unchanged, counted in train/skipped_steps); this many skipped in a row stop the run
      with a checkpoint.
    profile_steps: [a, b] writes a jax.profiler trace of steps a..b (inclusive) into
      WORKDIR/profile; None = no trace.
    peak_tflops: the device's peak TFLOP/s per device for perf/mfu; None = from the table in
      onn_jax.training.flops.PEAK_TFLOPS by device kind (perf/mfu is null where the device is unknown).
    plots: draw the dashboards (WORKDIR/plots/*.png) when the run ends; false skips them (a few
      seconds of matplotlib per run: many short runs, or no matplotlib wanted on the cluster);
      `onn-plot WORKDIR` draws them later from metrics.jsonl.
    """

    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    sample_every: int = 0
    sample_prompt: str = "What is 12 + 7?"
    sample_tokens: int = 48
    sample_format: str = "auto"
    progress: bool = True
    max_skipped_in_a_row: int = 10
    profile_steps: tuple[int, int] | None = None
    peak_tflops: float | None = None
    plots: bool = True

    def __post_init__(self):
        p = "train."
        _check_recipe_train(self)
        for name in ("steps", "log_every", "eval_batches", "sample_tokens", "max_skipped_in_a_row"):
            positive_int(getattr(self, name), p + name)
        for name in ("eval_every", "sample_every", "seed"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool), p + name,
                   f"must be an integer, got {v!r}")
            check(v >= 0 or name == "seed", p + name, f"must be >= 0, got {v}")
        check(isinstance(self.sample_prompt, str), p + "sample_prompt",
               f"must be a string, got {self.sample_prompt!r}")
        check(self.sample_format in SAMPLE_FORMATS, p + "sample_format",
               f"must be one of {list(SAMPLE_FORMATS)}, got {self.sample_format!r}")
        check(isinstance(self.progress, bool), p + "progress", f"must be a bool, got {self.progress!r}")
        check(isinstance(self.plots, bool), p + "plots", f"must be a bool, got {self.plots!r}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under WORKDIR/checkpoints: every `every` steps and at the end, the
    last `keep` kept. enabled=False writes none (and so never resumes)."""

    enabled: bool = True
    every: int = 500
    keep: int = 3
    # stop_timeout_s: on a stop signal, how long onn-train waits for the save of the current
    # step (and any save in flight) before abandoning it and exiting (see train.common.signals).
    stop_timeout_s: float = 120.0

    def __post_init__(self):
        p = "checkpoint."
        check(isinstance(self.enabled, bool), p + "enabled", f"must be a bool, got {self.enabled!r}")
        positive_int(self.every, p + "every")
        positive_int(self.keep, p + "keep")
        nonneg_float(self.stop_timeout_s, p + "stop_timeout_s")
        check(self.stop_timeout_s > 0, p + "stop_timeout_s", f"must be > 0, got {self.stop_timeout_s}")


@dataclass(frozen=True)
class DistributedConfig:
    """A multi-process run (jax.distributed; ignored by a single process). Whole seconds, as
    jax.distributed.initialize takes them (onn_jax.parallel.distributed).

    initialization_timeout_s: how long a process waits for the coordinator and for every
      process to join; past it onn-train stops with one line naming the coordinator address
      (exit code 2).
    heartbeat_timeout_s: a process whose heartbeats stop for this long is lost; jax's runtime
      then aborts every process. onn-train's watchdog notices at half of it, before the
      runtime does, and stops the survivors with one line naming the lost process and the
      checkpoint to resume from (exit code 5; see docs/SCALING.md).
    shutdown_timeout_s: how long a finished process waits for the others at the end.
    """

    initialization_timeout_s: int = 300
    heartbeat_timeout_s: int = 100
    shutdown_timeout_s: int = 300

    def __post_init__(self):
        for name in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
            positive_int(getattr(self, name), "distributed." + name)
        check(self.heartbeat_timeout_s >= 2, "distributed.heartbeat_timeout_s",
              f"must be >= 2 (the watchdog acts at half of it), got {self.heartbeat_timeout_s}")


@dataclass(frozen=True)
class Config:
    """Everything one training run needs; `from_dict(Config, d)` builds it from a config file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        kinds = {"model": ModelConfig, "optim": OptimConfig, "mesh": MeshConfig, "data": DataConfig,
                 "train": TrainConfig, "checkpoint": CheckpointConfig, "distributed": DistributedConfig}
        for name, cls in kinds.items():
            check(isinstance(getattr(self, name), cls), name, f"must be a {cls.__name__}")
        check(self.data.seq_len <= self.model.max_len, "data.seq_len",
               f"must be <= model.max_len ({self.model.max_len}), got {self.data.seq_len}")
        m = self.model.moe
        check(self.data.batch_size % self.optim.accum_steps == 0, "optim.accum_steps",
               f"must divide data.batch_size ({self.data.batch_size}), got {self.optim.accum_steps}")
        m = self.model.moe
        per_batch = [name for name, on in (("model.moe.aux_free_rate", m.aux_free_rate > 0),
                                           ("model.moe.adaptive_experts", m.adaptive_experts),
                                           ("model.moe.gate_tie_break='random'", m.gate_tie_break == "random"),
                                           ("model.moe.gate_tokens='nonconstant'", m.gate_tokens == "nonconstant"))
                     if on]
        check(self.optim.accum_steps == 1 or not per_batch, "optim.accum_steps",
               f"accumulation (k = {self.optim.accum_steps}) is not exact with {', '.join(per_batch)} "
               "(their updates or token shares need the whole batch at once); use accum_steps=1")
        check(not (self.model.scan_layers and self.optim.grad_filter.scope == "per_layer"),
               "optim.grad_filter.scope", "'per_layer' is not supported with model.scan_layers=true "
               "(the stacked expert leaves hold every layer); use 'pooled'")
        check_values(self)


def _check_recipe_train(c: "TrainConfig") -> None:
    """Validates TrainConfig's profile_steps and peak_tflops (lists from config files become tuples)."""
    p = "train."
    if c.profile_steps is not None:
        v = c.profile_steps
        ok = (isinstance(v, (tuple, list)) and len(v) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in v))
        check(ok, p + "profile_steps", f"must be [first, last] (two integers), got {v!r}")
        check(1 <= v[0] <= v[1], p + "profile_steps", f"must satisfy 1 <= first <= last, got {list(v)}")
        object.__setattr__(c, "profile_steps", tuple(v))
    if c.peak_tflops is not None:
        nonneg_float(c.peak_tflops, p + "peak_tflops")
        check(c.peak_tflops > 0, p + "peak_tflops", f"must be > 0, got {c.peak_tflops}")
