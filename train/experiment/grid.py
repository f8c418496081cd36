"""`onn-experiment`: a grid of training configs x seeds through the onn-train loop, summarised
as a markdown table, per-run JSON and plots.

    onn-experiment configs/experiments/routing.py [--out DIR] [--seeds 0,1] [--only a,b] [--steps N]
                   [--compile-cache DIR|none] [--config.a.b=VALUE ...] [--dry-run]

An experiment file defines `get_experiment()` returning a dict:
  name       the experiment's name (default output dir runs/experiments/<name>)
  base       a training config file (path relative to the experiment file or the cwd)
  overrides  {dotted config key: value} for every run, e.g. {"train.steps": 300}
  runs       {label: {dotted key: value}}: the grid's rows (router kinds, surprise variants...)
  seeds      [int]: each run is repeated with train.seed = seed (same data, new init)
  vary_data  (default False) True: each seed also sets data.seed = seed, so the seeds vary the
             data order, the builtin corpus sample and its held-out split, not only the init
  baselines  (routing, optional) [labels]: results.md adds a table of each row's held-out loss
             difference to these rows, paired by seed (mean ± standard error)
  kind       "routing" (default) or "forgetting"
  phases     (forgetting) {"first": [domains], "second": [domains], "first_steps": int,
             "second_steps": int}: train on the first domains, then continue (parameters and
             optimizer state) on the second; the rise of the first domains' loss is forgetting.

Every run is evaluated on the whole held-out split of all domains of the builtin corpus
(onn_jax.core.analysis): loss per domain, avg_k (per domain), gate accuracy on unmasked tokens
(argmax pre == argmin S of the run's own surprise definition) and expert<->domain NMI per
layer; these also go into each run's metrics.jsonl at every train.eval_every as `analysis/*`.
Outputs in DIR: results.jsonl (one line per run, with its resolved Config(s) as `configs` and
their hash `config_hash`; a re-run skips a finished run when its hash matches, or when its
configs differ only by fields added to the code since, left at their defaults
(train/experiment_reuse.py); so a quick `--steps 20` trial is re-run, and its row replaced, by
the full run, while a new option does not invalidate a grid),
results.md (the table, mean +- std over seeds), plots/*.png, runs/<label>/seed_<s>/ (the
usual onn-train workdir of each run). --config.a.b=VALUE sets a config field in every run
(applied last); --dry-run builds and checks every run's config and lists the grid, writing nothing;
--parallel N runs up to N cells at once as processes of their own (train/experiment_parallel.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from train.common.config_loader import (
    ConfigLoadError,
    apply_overrides,
    build_config,
    exec_python_file,
    load_config_file,
    split_overrides,
    with_defaults,
)
from train.experiment.parallel import ParallelCells
from train.experiment.report import make_plots, markdown_table
from train.experiment.reuse import reusable, set_aside_stale_run, stored_configs

KINDS = ("routing", "forgetting")


class ExperimentError(ValueError):
    """A bad experiment file; the message names the file and the key."""


# ------------------------------------------------------------------------- experiment files

def load_experiment(path: str | Path) -> dict[str, Any]:
    """Runs get_experiment() of `path` and validates it (errors name the file and key)."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"{path}: experiment file not found")
    try:
        exp = dict(exec_python_file(path, f"_onn_experiment_{path.stem}").get_experiment())
    except Exception as e:
        raise ExperimentError(f"{path}: cannot load get_experiment(): {type(e).__name__}: {e}") from e
    exp.setdefault("name", path.stem)
    exp.setdefault("kind", "routing")
    exp.setdefault("overrides", {})
    exp.setdefault("seeds", [0])
    where = lambda key: f"{path}: {key}"
    exp.setdefault("vary_data", False)
    exp.setdefault("baselines", [])
    unknown = set(exp) - {"name", "base", "overrides", "runs", "seeds", "kind", "phases", "vary_data", "baselines"}
    if unknown:
        raise ExperimentError(where(f"unknown keys {sorted(unknown)}"))
    if not isinstance(exp["baselines"], list) or not set(exp["baselines"]) <= set(exp.get("runs") or {}):
        raise ExperimentError(where(f"baselines must be a list of run labels, got {exp['baselines']!r}"))
    if not isinstance(exp["vary_data"], bool):
        raise ExperimentError(where(f"vary_data must be a bool, got {exp['vary_data']!r}"))
    if exp["kind"] not in KINDS:
        raise ExperimentError(where(f"kind must be one of {list(KINDS)}, got {exp['kind']!r}"))
    if not isinstance(exp.get("runs"), dict) or not exp["runs"]:
        raise ExperimentError(where("runs must be a non-empty {label: {dotted key: value}} dict"))
    if not exp["seeds"] or not all(isinstance(s, int) for s in exp["seeds"]):
        raise ExperimentError(where(f"seeds must be a non-empty list of ints, got {exp['seeds']!r}"))
    base = Path(exp.get("base", ""))
    candidates = [path.parent / base, base]
    found = [c for c in candidates if str(base) and c.is_file()]
    if not found:
        raise ExperimentError(where(f"base config {str(base)!r} not found (relative to {path.parent} or the cwd)"))
    exp["base"] = str(found[0])
    if exp["kind"] == "forgetting":
        ph = exp.get("phases")
        need = {"first", "second", "first_steps", "second_steps"}
        if not isinstance(ph, dict) or set(ph) != need:
            raise ExperimentError(where(f"phases must have exactly the keys {sorted(need)}"))
    exp["path"] = str(path)
    return exp


def set_dotted(cfg: dict, key: str, value: Any, source: str) -> None:
    """cfg[a][b][c] = value for key 'a.b.c'; the key must exist (typos are errors)."""
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise ExperimentError(f"{source}: unknown config key {key!r} (at {'.'.join(parts[:i + 1])!r})")
        if i < len(parts) - 1:
            node = node[part]
    node[parts[-1]] = value


def run_config(exp: dict, label: str, seed: int, extra: dict | None = None):
    """The validated Config of one grid cell: base <- overrides <- runs[label] <- extra, seed."""
    raw = with_defaults(load_config_file(exp["base"]))
    src = exp["path"]
    for k, v in {**exp["overrides"], **exp["runs"][label], **(extra or {})}.items():
        set_dotted(raw, k, v, f"{src}: runs[{label!r}]" if k in exp["runs"][label] else src)
    set_dotted(raw, "train.seed", seed, src)
    if exp.get("vary_data"):
        set_dotted(raw, "data.seed", seed, src)
    try:
        raw = apply_overrides(raw, exp.get("cli_overrides", ()), exp["base"])  # --config.* flags: last word
        return build_config(raw, src)
    except ConfigLoadError as e:
        raise ExperimentError(f"runs[{label!r}]: {e}") from e


# ------------------------------------------------------------------------- analysis eval

def make_analysis_step(model_cfg, num_domains: int):
    """Jitted (params, batch) -> sums for onn_jax.core.analysis metrics over one eval batch."""
    import jax
    import jax.numpy as jnp

    from onn_jax.core import analysis as an
    from train.run.evaluate import eval_forward

    def step(params, batch):
        t = batch["inputs"].shape[1]
        f = eval_forward(model_cfg, params, batch)
        out = dict(zip(("loss_sum", "loss_tokens"),
                       an.domain_loss_sums(f.ce_BxT, batch["loss_mask"], batch["domain"], num_domains)))
        dom_N = jnp.repeat(batch["domain"], t)
        unmasked = batch["loss_mask"].reshape(-1)
        out["tokens"] = an.domain_token_counts(dom_N, num_domains)
        if f.units.heads:  # gated attention heads: the same sums per layer, keys head_*
            out.update(unit_sums("head", f.units.heads, f.unit_surprises.heads, dom_N, unmasked, num_domains,
                                 top_any=model_cfg.heads.router == "surprise"))
        if f.units.embed is not None:  # slot embedding: one "layer" of M slots, keys slot_*
            s_ = None if f.unit_surprises.embed is None else (f.unit_surprises.embed,)
            out.update(unit_sums("slot", (f.units.embed,), s_, dom_N, unmasked, num_domains, top_any=True))
        records = f.records
        if not records:
            return out
        out["counts"] = jnp.stack([an.domain_expert_counts(r.router.mask, dom_N, num_domains) for r in records])
        if f.surprises is not None:
            valid_N = (dom_N >= 0).astype(jnp.float32)
            out["fallback"] = jnp.stack([an.fallback_count(r.router.pre, valid_N) for r in records])
            hits = [an.gate_hits(r.router.pre, s_, unmasked) for r, s_ in zip(records, f.surprises)]
            out["gate_hits"] = jnp.stack([h for h, _ in hits])
            out["gate_count"] = jnp.stack([c for _, c in hits])
            targets = [an.surprise_target_counts(s_, r.router.mask, unmasked)
                       for r, s_ in zip(records, f.surprises)]
            out["target_inactive"] = jnp.stack([i for i, _ in targets])
            out["target_hist"] = jnp.stack([h for _, h in targets])
        return out

    return jax.jit(step)


def unit_sums(prefix: str, records, surprises, dom_N, unmasked_N, num_domains: int, top_any: bool) -> dict:
    """Sums of gated units beyond the MoE (heads per layer, the slot embedding) over one batch,
    keyed `<prefix>_*`: [L, D, U] (token, active unit) pairs per domain, fallback tokens of a
    top-any gate and, with a Surprise (eval computes it when some gate needs the main-loss
    pullback), gate hits on unmasked tokens and inactive hard targets."""
    import jax.numpy as jnp

    from onn_jax.core import analysis as an
    out = {f"{prefix}_counts": jnp.stack([an.domain_expert_counts(r.router.mask, dom_N, num_domains)
                                          for r in records])}
    if top_any:
        valid_N = (dom_N >= 0).astype(jnp.float32)
        out[f"{prefix}_fallback"] = jnp.stack([an.fallback_count(r.router.pre, valid_N) for r in records])
    if surprises is not None:
        hits = [an.gate_hits(r.router.pre, s_, unmasked_N) for r, s_ in zip(records, surprises)]
        out[f"{prefix}_gate_hits"] = jnp.stack([h for h, _ in hits])
        out[f"{prefix}_gate_count"] = jnp.stack([c for _, c in hits])
        out[f"{prefix}_target_inactive"] = jnp.stack(
            [an.surprise_target_counts(s_, r.router.mask, unmasked_N)[0] for r, s_ in zip(records, surprises)])
    return out


def unit_metrics(prefix: str, sums: dict, tokens_D: np.ndarray) -> dict:
    """`analysis/<prefix>_*` from unit_sums' sums: avg_k (mean over layers, per layer, per
    domain), unit<->domain NMI per layer, and fallback / gate accuracy / inactive targets."""
    from onn_jax.core import analysis as an
    counts = sums[f"{prefix}_counts"]  # [L, D, U]
    tokens = max(float(tokens_D.sum()), 1.0)
    m = {f"analysis/{prefix}_layer_avg_k": counts.sum((1, 2)) / tokens}
    m[f"analysis/{prefix}_avg_k"] = float(m[f"analysis/{prefix}_layer_avg_k"].mean())
    m[f"analysis/{prefix}_domain_avg_k"] = np.asarray(an.avg_k_from_counts(counts, tokens_D)).mean(0)
    m[f"analysis/{prefix}_nmi"] = np.asarray(an.nmi_from_counts(counts), np.float64)
    if f"{prefix}_fallback" in sums:
        m[f"analysis/{prefix}_fallback_frac"] = sums[f"{prefix}_fallback"] / tokens
    if f"{prefix}_gate_hits" in sums:
        count = np.maximum(sums[f"{prefix}_gate_count"], 1.0)
        m[f"analysis/{prefix}_gate_acc_unmasked"] = sums[f"{prefix}_gate_hits"] / count
        m[f"analysis/{prefix}_target_inactive_frac"] = sums[f"{prefix}_target_inactive"] / count
    return m


def analyse(step, params, batches, domains: Sequence[str]) -> dict[str, Any]:
    """Sums `step` over batches -> the `analysis/*` metrics (numpy, JSON-ready)."""
    import jax

    from onn_jax.core import analysis as an
    sums: dict[str, np.ndarray] = {}
    for batch in batches:
        out = jax.device_get(step(params, {k: batch[k] for k in ("inputs", "targets", "loss_mask", "domain")}))
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + np.asarray(v, np.float64)
    m = {"analysis/loss": float(sums["loss_sum"].sum() / max(sums["loss_tokens"].sum(), 1.0)),
         "analysis/domain_loss": np.asarray(an.domain_means(sums["loss_sum"], sums["loss_tokens"]))}
    for prefix in ("head", "slot"):
        if f"{prefix}_counts" in sums:
            m.update(unit_metrics(prefix, sums, sums["tokens"]))
    if "counts" in sums:
        counts = sums["counts"]  # [L, D, E]
        m["analysis/layer_avg_k"] = counts.sum((1, 2)) / max(sums["tokens"].sum(), 1.0)  # [L]
        m["analysis/avg_k"] = float(m["analysis/layer_avg_k"].mean())
        m["analysis/domain_avg_k"] = np.asarray(an.avg_k_from_counts(counts, sums["tokens"])).mean(0)
        m["analysis/nmi"] = np.asarray(an.nmi_from_counts(counts), np.float64)
        m["analysis/domain_expert_share"] = counts / np.maximum(counts.sum(-1, keepdims=True), 1.0)
    if "gate_hits" in sums:
        count = np.maximum(sums["gate_count"], 1.0)  # [L] unmasked tokens
        m["analysis/gate_acc_unmasked"] = sums["gate_hits"] / count
        m["analysis/target_inactive_frac"] = sums["target_inactive"] / count
        m["analysis/target_share"] = sums["target_hist"] / count[:, None]  # [L, E]
        m["analysis/target_expert0"] = m["analysis/target_share"][:, 0]
        m["analysis/fallback_frac"] = sums["fallback"] / max(sums["tokens"].sum(), 1.0)  # [L]
    return m


def _analysis_run_class():
    """train.run.loop.Run whose periodic evaluation also logs `analysis/*` on all domains."""
    from train.run.loop import Run

    class AnalysisRun(Run):
        def __init__(self, cfg, workdir, full_ds, init_state=None):
            super().__init__(cfg, workdir)
            self.full_ds = full_ds
            self.analysis_step = make_analysis_step(self.cfg.model, len(full_ds.domains))  # with output.order
            if init_state is not None:  # continue another run (the forgetting experiment)
                self.state = init_state

        def analyse(self) -> dict[str, Any]:
            batches = self.full_ds.eval_batches(self.cfg.data.batch_size)
            return analyse(self.analysis_step, self.state.model_params, batches, self.full_ds.domains)

        def evaluate(self) -> dict[str, Any]:
            return {**super().evaluate(), **self.analyse()}

        def _sample(self) -> str:  # no greedy sample: it costs a compile per run
            return ""

    return AnalysisRun


# ------------------------------------------------------------------------- running

def full_dataset(cfg):
    """All domains of cfg's corpus (the held-out split is the same for every run)."""
    from train.run.data import build_dataset
    return build_dataset(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="builtin")))


def write_phase_data(cfg, phases: dict, data_dir: Path) -> dict[str, str]:
    """Writes the builtin corpus restricted to each phase's domains as chat jsonl files."""
    from onn_jax.data.corpus import DOMAINS, build_corpus
    records = build_corpus(seed=cfg.data.seed, records_per_domain=cfg.data.records_per_domain)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for phase in ("first", "second"):
        bad = [d for d in phases[phase] if d not in DOMAINS]
        if bad:
            raise ExperimentError(f"phases.{phase}: unknown domains {bad}; known: {list(DOMAINS)}")
        path = data_dir / f"{phase}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records if r["domain"] in phases[phase]))
        paths[phase] = str(path)
    return paths


def jsonable(m: dict) -> dict:
    from train.common.metrics_file import to_jsonable
    return {k: to_jsonable(v) if not isinstance(v, (str, list, dict)) else v for k, v in m.items()}


PHASES = ("first", "second")


def cell_configs(exp: dict, label: str, seed: int, phase_paths=None) -> list:
    """The Config(s) one (label, seed) cell trains with: one (routing), one per phase (forgetting)."""
    if exp["kind"] == "routing":
        return [run_config(exp, label, seed)]
    ph = exp["phases"]
    return [run_config(exp, label, seed, {"data.source": phase_paths[p], "train.steps": ph[f"{p}_steps"]})
            for p in PHASES]


def cell_dicts(exp: dict, configs: Sequence) -> list[dict]:
    """A cell's resolved Config dicts as its row stores them. A forgetting phase's data.source (a
    path under the output dir) enters as its domain list, so moving the output dir changes nothing."""
    from onn_jax.config import to_dict
    dicts = [to_dict(c) for c in configs]
    if exp["kind"] == "forgetting":
        for d, phase in zip(dicts, PHASES):
            d["data"]["source"] = {"phase": phase, "domains": list(exp["phases"][phase])}
    return dicts


def config_hash(exp: dict, configs: Sequence) -> str:
    """Hash of a cell's resolved Config dicts (steps included): a results.jsonl row of the same
    hash is reused (and one that differs only by fields added since: train.experiment.reuse)."""
    blob = json.dumps({"kind": exp["kind"], "configs": cell_dicts(exp, configs)}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_results(path: Path) -> list[dict]:
    """The rows of results.jsonl; a torn last line (a write cut by a kill) is dropped."""
    from train.common.metrics_file import read_jsonl
    try:
        numbered = read_jsonl(path, torn_tail_ok=True, numbered=True)  # a half-written cell runs again
    except ValueError as e:
        raise ExperimentError(f"{e}; fix or delete the line") from None
    for n, row in numbered:
        if not isinstance(row, dict) or "label" not in row or "seed" not in row:
            raise ExperimentError(f"{path}:{n}: not a result row (no label/seed); fix or delete the line")
    return [row for _, row in numbered]


def write_results(path: Path, rows: Sequence[dict]) -> None:
    """Rewrites results.jsonl atomically (a kill never leaves it half written)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_cell(exp: dict, label: str, seed: int, out: Path, full_ds, phase_paths=None) -> dict:
    """Trains one (label, seed) cell and returns its result row."""
    Run = _analysis_run_class()
    workdir = out / "runs" / label / f"seed_{seed}"
    start = time.perf_counter()
    row: dict[str, Any] = {"label": label, "seed": seed}
    configs = cell_configs(exp, label, seed, phase_paths)
    if exp["kind"] == "routing":
        (cfg,) = configs
        run = Run(cfg, workdir, full_ds)
        run.run()
        row.update(run.analyse())
        row["params"] = param_count(run.state.params)  # trainable: no router state
    else:
        ph = exp["phases"]
        cfg_a, cfg_b = configs
        run_a = Run(cfg_a, workdir / "first", full_ds)
        run_a.run()
        after_a = run_a.analyse()
        same_clusters = dataclasses.replace(cfg_b.model.output, order=run_a.cfg.model.output.order)
        cfg_b = dataclasses.replace(cfg_b, model=dataclasses.replace(cfg_b.model, output=same_clusters))
        run_b = Run(cfg_b, workdir / "second", full_ds, init_state=run_a.state)  # run_a's frequency ranks
        run_b.run()
        after_b = run_b.analyse()
        row.update({k.replace("analysis/", "analysis/first_"): v for k, v in after_a.items()})
        row.update(after_b)
        idx = lambda names: [full_ds.domains.index(d) for d in names]
        first, second = idx(ph["first"]), idx(ph["second"])
        la, lb = after_a["analysis/domain_loss"], after_b["analysis/domain_loss"]
        row["forget/first_loss_before"] = float(np.mean(la[first]))
        row["forget/first_loss_after"] = float(np.mean(lb[first]))
        row["forget/rise"] = row["forget/first_loss_after"] - row["forget/first_loss_before"]
        row["forget/second_loss_before"] = float(np.mean(la[second]))
        row["forget/second_loss_after"] = float(np.mean(lb[second]))
    row["time_s"] = time.perf_counter() - start
    row["domains"] = list(full_ds.domains)
    return jsonable(row)


def param_count(params) -> int:
    """Number of scalars in a parameter tree (every leaf: active or not, sparse rows included)."""
    import jax
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def enable_compile_cache(path: Path) -> None:
    """JAX's persistent compilation cache: the seeds of one config share their compiles."""
    import jax
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run_experiment(exp: dict, out: Path, seeds=None, only=None, steps=None, log=print,
                   parallel: ParallelCells | None = None, report: bool = True) -> list[dict]:
    """Runs every (label, seed) cell without a results.jsonl row of the same config hash (a row
    of other settings is re-run and replaced), then writes results.md and the plots (report).
    parallel: run the cells as that many processes at once (train.experiment.parallel)."""
    out.mkdir(parents=True, exist_ok=True)
    if steps is not None:
        exp = {**exp, "overrides": {**exp["overrides"], "train.steps": steps}}
        if exp["kind"] == "forgetting":
            exp["phases"] = {**exp["phases"], "first_steps": steps, "second_steps": steps}
    labels = [l for l in exp["runs"] if only is None or l in only]
    seeds = seeds or exp["seeds"]
    results_path = out / "results.jsonl"
    done = {(r["label"], r["seed"]): r for r in read_results(results_path)}  # file order; last wins
    data_cache: dict[int, tuple] = {}

    def seed_data(seed: int):
        """(held-out dataset, forgetting phase files) of a seed: shared unless vary_data."""
        key = seed if exp.get("vary_data") else seeds[0]
        if key not in data_cache:
            probe = run_config(exp, labels[0], key)
            data_dir = out / "data" / f"seed_{key}" if exp.get("vary_data") else out / "data"
            data_cache[key] = (full_dataset(probe), write_phase_data(probe, exp["phases"], data_dir)
                               if exp["kind"] == "forgetting" else None)
        return data_cache[key]

    pending: list[tuple] = []

    def record(cell: tuple, row: dict, run_dir: Path | None = None) -> None:
        """A finished cell's row into results.jsonl (replacing an old row in place, or appended);
        run_dir: where a parallel cell's run directory is, moved to out/runs/<label>/seed_<s>."""
        label, seed, want, dicts = cell
        if run_dir is not None and run_dir.is_dir():
            dest = out / "runs" / label / f"seed_{seed}"
            if dest.exists():  # a run of this config cut before its row was written: kept aside
                dest.rename(dest.with_name(f"{dest.name}.replaced-unfinished-{int(time.time())}"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            run_dir.rename(dest)
        done[(label, seed)] = row = {**row, "config_hash": want, "configs": dicts}
        write_results(results_path, list(done.values()))
        log(f"[{exp['name']}] {label} seed {seed}: {row['time_s']:.0f}s " + _short(row))

    for label in labels:
        for seed in seeds:
            full_ds, phase_paths = seed_data(seed)
            configs = cell_configs(exp, label, seed, phase_paths)
            dicts, want = cell_dicts(exp, configs), config_hash(exp, configs)
            old = done.get((label, seed))
            if old is not None and old.get("config_hash") == want:
                continue
            added = None if old is None else reusable(stored_configs(old, out, exp["kind"]), dicts, configs)
            if added is not None:
                why = (f"made before {', '.join(added)} existed; the cell leaves "
                       f"{'it at its default' if len(added) == 1 else 'them at their defaults'}"
                       if added else "its configs equal the cell's")
                log(f"[{exp['name']}] {label} seed {seed}: reusing its results.jsonl row ({why})")
                done[(label, seed)] = {**old, "config_hash": want, "configs": dicts}
                write_results(results_path, list(done.values()))
                continue
            if old is not None:
                log(f"[{exp['name']}] {label} seed {seed}: the results.jsonl row was made with other settings "
                    f"(config {old.get('config_hash') or 'unrecorded'}, now {want}); re-running and replacing it")
            moved = set_aside_stale_run(out / "runs" / label / f"seed_{seed}", configs,
                                        (old or {}).get("config_hash") or "unfinished")
            if moved is not None:
                log(f"[{exp['name']}] {label} seed {seed}: its earlier run directory (other settings) "
                    f"moved to {moved}")
            if parallel is None:
                record((label, seed, want, dicts), run_cell(exp, label, seed, out, full_ds, phase_paths))
            else:
                pending.append((label, seed, want, dicts))
    if pending:
        failed = parallel.run(pending, out, _cell_row, lambda cell, row, run_dir: record(cell, row, run_dir), log)
        if failed:
            raise ExperimentError(f"{len(failed)} of {len(pending)} cells failed: " + "; ".join(failed))
    rows = [done[(l, s)] for l in labels for s in seeds]
    if not report:
        return rows
    (out / "results.md").write_text(markdown_table(exp, rows) + "\n")
    make_plots(exp, rows, out)
    return rows


def _cell_row(cell_out: Path) -> dict | None:
    """The one row a --cell-only process wrote to its output directory, None if none."""
    rows = read_results(cell_out / "results.jsonl") if (cell_out / "results.jsonl").is_file() else []
    return rows[0] if len(rows) == 1 else None


def dry_run(exp: dict, out: Path, seeds=None, only=None, steps=None) -> str:
    """Every cell's config built and validated (ExperimentError on the first bad one), listed."""
    if steps is not None:
        exp = {**exp, "overrides": {**exp["overrides"], "train.steps": steps}}
    lines = [f"experiment {exp['name']} ({exp['kind']}): base {exp['base']}, out {out} (dry run: nothing written)"]
    common = {**exp["overrides"], **dict(exp.get("cli_overrides", ()))}
    lines.append("  every run: " + (", ".join(f"{k}={v}" for k, v in common.items()) or "(no overrides)"))
    for label in (l for l in exp["runs"] if only is None or l in only):
        for seed in seeds or exp["seeds"]:
            cfg = run_config(exp, label, seed)
            own = ", ".join(f"{k}={v}" for k, v in exp["runs"][label].items()) or "(base)"
            lines.append(f"  {label} seed {seed}: {own}; train.steps={cfg.train.steps}")
    return "\n".join(lines)


def _short(row: dict) -> str:
    keys = ("analysis/loss", "analysis/avg_k", "forget/rise")
    return " ".join(f"{k.split('/')[-1]}={row[k]:.3f}" for k in keys if isinstance(row.get(k), float))


# ------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="onn-experiment", description="Run a grid of configs x seeds.")
    p.add_argument("experiment", help="experiment file with get_experiment(), e.g. configs/experiments/routing.py")
    p.add_argument("--out", default=None, help="output dir (default runs/experiments/<name>)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds instead of the file's")
    p.add_argument("--only", default=None, help="comma-separated run labels to run")
    p.add_argument("--steps", type=int, default=None, help="train.steps (and both phase lengths) for every run")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX persistent compilation cache (default OUT/jax_cache; 'none': off)")
    p.add_argument("--dry-run", action="store_true",
                   help="check and list every run's config (label, seed, overrides); train nothing, write nothing")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run up to N cells at once, each in a process of its own (a launch-bound small "
                        "model shares a GPU or a many-core CPU; see train/experiment_parallel.py)")
    p.add_argument("--gpus", default=None, metavar="IDS",
                   help="with --parallel: comma-separated CUDA device ids; each cell sees one of them "
                        "(CUDA_VISIBLE_DEVICES), the one running the fewest cells")
    p.add_argument("--cell-only", action="store_true", help=argparse.SUPPRESS)  # a --parallel child: no report
    p.epilog = ("--config.SECTION.FIELD=VALUE overrides a config field in every run (after the "
                "experiment file's own overrides), e.g. --config.data.batch_size=4")
    try:
        cli_overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    except ConfigLoadError as e:
        print(f"onn-experiment: error: {e}", file=sys.stderr)
        return 2
    a = p.parse_args(rest)
    try:
        exp = load_experiment(a.experiment)
        exp["cli_overrides"] = cli_overrides
        only = a.only.split(",") if a.only else None
        if only and set(only) - set(exp["runs"]):
            raise ExperimentError(f"--only: unknown labels {sorted(set(only) - set(exp['runs']))}; "
                                  f"known: {list(exp['runs'])}")
        seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else None
        out = Path(a.out or Path("runs") / "experiments" / exp["name"])
        if a.parallel < 1:
            raise ExperimentError(f"--parallel must be >= 1, got {a.parallel}")
        gpus = [g.strip() for g in a.gpus.split(",")] if a.gpus else []
        if a.gpus is not None and (a.parallel < 2 or not all(g.isdigit() for g in gpus)):
            raise ExperimentError(f"--gpus needs --parallel N >= 2 and comma-separated device ids, got "
                                  f"--gpus {a.gpus!r} with --parallel {a.parallel}")
        if a.dry_run:
            print(dry_run(exp, out, seeds, only, a.steps))
            return 0
        parallel = None
        if a.parallel > 1:
            # this process only plans and merges: should it touch a GPU, it must not reserve its memory
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            cache = a.compile_cache or str(out / "jax_cache")  # one cache for every cell
            parallel = ParallelCells(a.experiment, a.parallel, cli_overrides, a.steps, cache, gpus)
        elif a.compile_cache != "none":
            enable_compile_cache(Path(a.compile_cache or out / "jax_cache"))
        from train.run.errors import TrainError
        try:
            run_experiment(exp, out, seeds, only, a.steps, parallel=parallel, report=not a.cell_only)
        except TrainError as e:
            raise ExperimentError(str(e)) from e
    except (ExperimentError, ConfigLoadError) as e:
        print(f"onn-experiment: error: {e}", file=sys.stderr)
        return 2
    if not a.cell_only:
        print(f"results: {out / 'results.md'}\n" + (out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
