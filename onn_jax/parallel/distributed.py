"""Multi-host runs through JAX's own runtime: jax.distributed, per-process batch shards.

Launch one process per host (GPU hosts: one per host with all its GPUs; TPU: one per VM).
`initialize_distributed()` calls jax.distributed.initialize() when the process is one of
several, from explicit arguments, from the environment

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0|1

or from a cluster JAX detects by itself (Cloud TPU slices, SLURM, Open MPI, ...). Every
process then builds the same global mesh over jax.devices(), reads only the batch rows
that `process_batch_rows` assigns to its devices, and assembles the global batch with
`global_batch` (jax.make_array_from_process_local_data).
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from onn_jax.parallel.rules import RULES, Rules, batch_sharding, check_batch

_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _cluster_detected() -> bool:
    """A multi-process launcher JAX can read itself (several tasks / TPU workers)."""
    for name in _CLUSTER_ENV:
        value = os.environ.get(name, "")
        if name == "TPU_WORKER_HOSTNAMES":
            if len([h for h in value.split(",") if h]) > 1:
                return True
        elif value.isdigit() and int(value) > 1:
            return True
    return False


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, **kwargs) -> bool:
    """Joins the multi-process run if there is one; returns True when JAX runs distributed.

    Arguments override JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. A single
    process (nothing set, no cluster detected) is left alone. Call before any other JAX use.
    Extra keyword arguments go to jax.distributed.initialize (e.g. local_device_ids).
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if explicit:
        if num_processes == 1:
            return False
        missing = [n for n, v in (("JAX_COORDINATOR_ADDRESS", coordinator_address),
                                  ("JAX_NUM_PROCESSES", num_processes), ("JAX_PROCESS_ID", process_id))
                   if v is None]
        if missing and not _cluster_detected():
            raise ValueError(f"multi-process launch needs {', '.join(missing)} (argument or "
                             "environment variable) besides the ones given")
    elif not _cluster_detected():
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)
    return True


def shutdown_distributed() -> None:
    """Leaves a multi-process run cleanly after its work is done (no-op for one process).

    jax.distributed.shutdown() waits until every process has reached it, then stops the
    coordination service; without it process 0 (the coordinator) may exit while the others
    still talk to it, which prints gRPC CANCELLED / heartbeat errors at the end of a good run.
    Call it on success only: after a failure the other processes may never arrive."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def process_batch_rows(mesh: Mesh, global_batch_size: int, rules: Rules = RULES) -> slice:
    """The contiguous rows of the global batch that this process's devices hold.

    Each process reads exactly these rows from its data source (no process loads the whole
    global batch). Raises if the mesh gives this process non-contiguous rows.
    """
    check_batch(global_batch_size, mesh, rules)
    sharding = batch_sharding(mesh, rules)
    spans = sorted({index[0].indices(global_batch_size)[:2] if index else (0, global_batch_size)
                    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values()})
    start, stop = spans[0][0], spans[0][0]
    for a, b in spans:
        if a > stop:
            raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows "
                             f"{spans}; order the mesh so each process's devices are adjacent")
        stop = max(stop, b)
    return slice(start, stop)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, global_batch_size: int,
                 rules: Rules = RULES) -> dict[str, jax.Array]:
    """Global sharded arrays from this process's rows (`process_batch_rows`) of each field."""
    sharding: NamedSharding = batch_sharding(mesh, rules)
    out = {}
    for key, local in local_batch.items():
        local = np.asarray(local)
        shape = (global_batch_size,) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out
