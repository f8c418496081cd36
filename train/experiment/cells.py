"""One cell of the grid, a (label, seed) pair: its Config(s), the hash that identifies them in
results.jsonl, and training it into its result row.

A routing cell is one run; a forgetting cell trains on the first phase's domains, then continues
(parameters and optimizer state) on the second's. Each run is an onn-train Run whose periodic
evaluation also logs `analysis/*` (train.experiment.analysis) on all domains.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from train.common.metrics_file import to_jsonable
from train.experiment.analysis import analyse, make_analysis_step
from train.experiment.spec import ExperimentError, run_config


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
    """A result row JSON-ready: numbers and arrays as JSON values (strings, lists and dicts kept)."""
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
