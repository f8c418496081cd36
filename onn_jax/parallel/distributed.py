"""Multi-host runs through JAX's own runtime: jax.distributed, per-process batch shards.

Launch one process per host (GPU hosts: one per host with all its GPUs; TPU: one per VM).
`initialize_distributed()` calls jax.distributed.initialize() when the process is one of
several, from explicit arguments, from the environment

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0|1

or from a cluster JAX detects by itself (Cloud TPU slices, SLURM, Open MPI, ...). Every
process then builds the same global mesh over jax.devices(), reads only the batch rows
that `process_batch_rows` assigns to its devices, and assembles the global batch with
`global_batch` (jax.make_array_from_process_local_data).

Bounded failures (`DistributedConfig` timeouts): `initialize_distributed(timeouts=...)` passes
them to jax.distributed.initialize (the parameters the installed jax has), first waits for the
coordinator's port (`CoordinatorUnreachable` past the initialization timeout) and, given
`on_init_timeout`, calls it should the join not finish in time (jax's runtime would abort the
process a few seconds later). `PeerWatchdog` notices a lost process before the runtime's own
abort (heartbeat_timeout_s) and lets the processes leave together (`PeerWatchdog.leave`).
"""
from __future__ import annotations

import inspect
import os
import socket
import threading
import time
from typing import Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from onn_jax.config.run import DistributedConfig
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


class CoordinatorUnreachable(ValueError):
    """The coordinator's address did not accept a connection within the initialization timeout."""


# DistributedConfig field -> the names jax.distributed.initialize has used for it (first found wins)
_TIMEOUT_PARAMS = {"initialization_timeout_s": ("initialization_timeout",),
                   "heartbeat_timeout_s": ("heartbeat_timeout_seconds", "heartbeat_timeout"),
                   "shutdown_timeout_s": ("shutdown_timeout_seconds", "shutdown_timeout")}
INIT_MARGIN_S = 10  # jax's own join deadline is set this much later than ours, so ours fires first


def runtime_timeouts(timeouts: DistributedConfig, params=None) -> dict[str, int]:
    """The keyword arguments of jax.distributed.initialize for `timeouts`: only those the
    installed jax accepts (the names differ between versions; a missing one keeps jax's default)."""
    params = set(inspect.signature(jax.distributed.initialize).parameters) if params is None else set(params)
    out = {}
    for field, names in _TIMEOUT_PARAMS.items():
        name = next((n for n in names if n in params), None)
        if name is not None:
            value = int(getattr(timeouts, field))
            out[name] = value + INIT_MARGIN_S if field == "initialization_timeout_s" else value
    return out


def wait_for_coordinator(address: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Returns once `address` (host:port) accepts a TCP connection; CoordinatorUnreachable
    (naming the address and the last error) if it does not within `timeout_s` seconds. Process 0
    may start a moment after the others, so refusals are retried until the deadline."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise CoordinatorUnreachable(f"coordinator address {address!r} is not HOST:PORT")
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=max(min(left, 5.0), 0.1)):
                return
        except OSError as e:  # refused, unknown host, unreachable network, timed out
            last = e.strerror or str(e) or type(e).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise CoordinatorUnreachable(
                f"cannot reach the coordinator at {address} within distributed.initialization_timeout_s = "
                f"{timeout_s:g} s ({last}); start process 0 there, or fix JAX_COORDINATOR_ADDRESS")
        time.sleep(min(poll_s, left))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, timeouts: DistributedConfig | None = None,
                           on_init_timeout: Callable[[str], None] | None = None, **kwargs) -> bool:
    """Joins the multi-process run if there is one; returns True when JAX runs distributed.

    Arguments override JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. A single
    process (nothing set, no cluster detected) is left alone. Call before any other JAX use.
    Extra keyword arguments go to jax.distributed.initialize (e.g. local_device_ids).

    timeouts: passed to jax.distributed.initialize (runtime_timeouts); a process other than 0
    first waits for the coordinator's port (CoordinatorUnreachable past the initialization
    timeout). on_init_timeout(message): called from a timer thread if the join has not finished
    within the initialization timeout (jax's runtime would abort the process soon after, with a
    C++ stack trace); it is expected to end the process (onn-train prints the message, exits 2).
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
    guard = None
    if timeouts is not None:
        kwargs = {**runtime_timeouts(timeouts), **kwargs}
        limit = float(timeouts.initialization_timeout_s)
        start = time.monotonic()
        if coordinator_address and process_id not in (None, 0):
            wait_for_coordinator(coordinator_address, limit)
        if on_init_timeout is not None:
            where = f"the coordinator at {coordinator_address}" if coordinator_address else "the coordinator"
            expected = f"not all {num_processes} processes" if num_processes else "not every process"
            message = (f"{expected} joined {where} within distributed.initialization_timeout_s = "
                       f"{limit:g} s (this is process {process_id if process_id is not None else '?'}); "
                       "start every process with the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES")
            guard = threading.Timer(max(limit - (time.monotonic() - start), 0.0), on_init_timeout, (message,))
            guard.daemon = True
            guard.start()
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, **kwargs)
    finally:
        if guard is not None:
            guard.cancel()
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


# ---------------------------------------------------------------- a lost process, noticed in time

HEARTBEAT_DIR, EXIT_DIR = "onn_jax/heartbeat/", "onn_jax/exit/"
DONE = "done"  # a heartbeat key's value once its process finished its work (not lost)


class PeerWatchdog:
    """Notices a lost process of a multi-process run before jax's runtime aborts every process.

        dog = PeerWatchdog(cfg.distributed.heartbeat_timeout_s, on_stop).start()
        ...                       # on_stop(message, lost, peer's exit code) runs in the watchdog thread
        dog.finish()                          # work done: the others stop watching this process
        dog.leave(code)                       # or: an error; leave together, then end the process

    Every process writes a counter to the coordination service's key-value store every
    `interval` seconds (a Python thread: it runs while the main thread waits in a collective or
    compiles). Process 0 reads all of them; one unchanged for `lost_after` = heartbeat_timeout / 2
    seconds is lost, before the runtime's own verdict at heartbeat_timeout (which aborts every
    process with a C++ stack trace). Process 0 then announces the lost processes under EXIT_DIR,
    and every process's watchdog calls `on_stop(message, lost, None)` on seeing it; a process
    whose peer left with an error (`leave`) gets `on_stop(message, (), its exit code)`. on_stop
    is expected to end the process (after `leave`). The coordinator's own death cannot be
    noticed this way: the other processes' runtime aborts them within a second (jax 0.10.2
    gives Python no callback for it: a missed_heartbeat_callback ends in std::bad_cast).
    """

    def __init__(self, heartbeat_timeout_s: float, on_stop: Callable[[str, tuple[int, ...], int | None], None],
                 client=None, process_id: int | None = None, num_processes: int | None = None):
        self.lost_after = heartbeat_timeout_s / 2.0
        self.interval = max(self.lost_after / 5.0, 0.1)
        self.on_stop = on_stop
        self.client = client if client is not None else _client()
        self.me = jax.process_index() if process_id is None else process_id
        self.n = jax.process_count() if num_processes is None else num_processes
        self._beats, self._halt, self._leaving = 0, threading.Event(), threading.Lock()
        self._seen: dict[int, tuple[str, float]] = {}  # process -> (last value, when it changed)
        self._thread = threading.Thread(target=self._run, name="onn-peer-watchdog", daemon=True)

    def start(self) -> "PeerWatchdog":
        self._beat()
        self._thread.start()
        return self

    def _beat(self, value: str | None = None) -> None:
        self._beats += 1
        self.client.key_value_set(HEARTBEAT_DIR + str(self.me), value or str(self._beats), allow_overwrite=True)

    def _dir(self, prefix: str) -> dict[int, str]:
        return {int(k.rsplit("/", 1)[-1]): v for k, v in self.client.key_value_dir_get(prefix)
                if k.rsplit("/", 1)[-1].isdigit()}

    def _run(self) -> None:
        failing_since = None
        while not self._halt.wait(self.interval):
            try:
                self._beat()
                verdict = self._verdict()
                failing_since = None
            except Exception as e:  # noqa: BLE001 - the coordinator does not answer
                now = time.monotonic()
                failing_since = failing_since or now
                verdict = None
                if now - failing_since > self.lost_after:
                    first = str(e).splitlines()[0][:200] if str(e) else ""
                    verdict = (f"the coordinator (process 0 of {self.n}) does not answer ({type(e).__name__}: "
                               f"{first})", (0,), None)
            if verdict is not None and not self._halt.is_set():
                if verdict[2] is not None and self._halt.wait(self.interval):
                    return  # a peer left with an error and so does this process, by itself (hold/leave)
                self._halt.set()
                self.on_stop(*verdict)
                return

    def _verdict(self) -> tuple[str, tuple[int, ...], int | None] | None:
        """(message, lost processes, a peer's exit code) when this process must stop, else None."""
        exits = {p: parse_exit(v) for p, v in self._dir(EXIT_DIR).items() if p != self.me}
        if exits:
            p, (code, lost) = min(exits.items())
            if lost:
                return (f"{_names(lost)} of {self.n} {'is' if len(lost) == 1 else 'are'} lost (noticed by "
                        f"process {p})", lost, None)
            return (f"process {p} of {self.n} stopped with exit code {code} (its own output says why)", (), code)
        if self.me != 0:
            return None
        now, beats = time.monotonic(), self._dir(HEARTBEAT_DIR)
        lost = []
        for p in range(self.n):
            if p == self.me:
                continue
            value = beats.get(p, "")
            last = self._seen.get(p)
            if last is None or last[0] != value:
                self._seen[p] = (value, now)
            elif value != DONE and now - last[1] > self.lost_after:
                lost.append(p)
        if not lost:
            return None
        self.client.key_value_set(EXIT_DIR + str(self.me), exit_value(None, lost), allow_overwrite=True)
        return (f"{_names(lost)} of {self.n} {'is' if len(lost) == 1 else 'are'} lost (no heartbeat for "
                f"{self.lost_after:g} s: killed, crashed, or its host is down)", tuple(lost), None)

    def hold(self) -> None:
        """No more verdicts: this process is ending by itself (an error of its own, a stop signal)
        and will `leave`; the others' exit codes are no news then."""
        self._halt.set()

    def finish(self) -> None:
        """This process's work is done (it goes on to jax.distributed.shutdown): stop watching,
        and mark it finished so that the others do not take its silence for a loss."""
        if self._halt.is_set():
            return
        self._halt.set()
        self._thread.join(timeout=self.interval * 2 + 5)
        try:
            self._beat(DONE)
        except Exception:  # noqa: BLE001 - the shutdown that follows reports a dead coordinator
            pass

    def leave(self, code: int, lost: tuple[int, ...] = (), timeout: float | None = None) -> bool:
        """Leaves the run after a failure: records exit `code` (the others' watchdogs stop them
        too), waits up to `timeout` (default lost_after) until every process not `lost` has left
        or finished, then, if none is lost, shuts jax.distributed down together (its barrier
        passes at once). Returns True if it did; the caller then ends the process with os._exit
        either way (jax's exit handler would wait at a shutdown barrier the lost never reach).
        A second caller (the main thread while the watchdog leaves) waits here for good: the
        first one ends the process."""
        if not self._leaving.acquire(blocking=False):
            while True:
                time.sleep(3600)
        self._halt.set()
        try:
            self.client.key_value_set(EXIT_DIR + str(self.me), exit_value(code, lost), allow_overwrite=True)
        except Exception:  # noqa: BLE001 - no coordinator: nobody to leave with
            return False
        deadline = time.monotonic() + (self.lost_after if timeout is None else timeout)
        pending = [p for p in range(self.n) if p != self.me and p not in lost]
        while pending and time.monotonic() < deadline:
            try:
                exits, beats = self._dir(EXIT_DIR), self._dir(HEARTBEAT_DIR)
            except Exception:  # noqa: BLE001
                return False
            pending = [p for p in pending if p not in exits and beats.get(p) != DONE]
            if pending:
                time.sleep(min(self.interval / 4, 0.25))
        if pending or lost:
            if self.me == 0 and not pending:  # the service lives here: let the others go first
                time.sleep(min(self.interval, 1.0))
            return False
        jax.distributed.shutdown()
        return True


def exit_value(code: int | None, lost) -> str:
    """An EXIT_DIR value: the process's exit code (if known) and the processes it found lost."""
    return " ".join(([str(code)] if code is not None else []) + ([f"lost:{','.join(map(str, lost))}"] if lost else []))


def parse_exit(value: str) -> tuple[int | None, tuple[int, ...]]:
    """(exit code or None, lost processes) of an EXIT_DIR value."""
    code, lost = None, ()
    for part in value.split():
        if part.startswith("lost:"):
            lost = tuple(int(x) for x in part[5:].split(",") if x.isdigit())
        elif part.lstrip("-").isdigit():
            code = int(part)
    return code, lost


def _names(processes) -> str:
    return ("process " if len(processes) == 1 else "processes ") + ", ".join(map(str, processes))


def _client():
    """The coordination service's client of this process (jax.distributed's own)."""
    from jax._src import distributed as jax_distributed  # no public accessor in jax 0.10 / 0.11
    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client
