"""Running a grid: every (label, seed) cell without a results.jsonl row of its config is trained
(here, or as parallel processes) and its row recorded; then results.md and the plots are written.

A row of other settings is re-run and replaced (its run directory set aside), unless it differs
only by fields added to the code since, at their defaults (train.experiment.reuse).
"""
from __future__ import annotations

import time
from pathlib import Path

from train.experiment.cells import cell_configs, cell_dicts, config_hash, full_dataset, run_cell, write_phase_data
from train.experiment.parallel import ParallelCells
from train.experiment.report import make_plots, markdown_table
from train.experiment.results import read_results, write_results
from train.experiment.reuse import reusable, set_aside_stale_run, stored_configs
from train.experiment.spec import ExperimentError, run_config


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
