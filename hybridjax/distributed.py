"""Multi-process runs: decide whether this process is one of several and join the others.

`jax.distributed.initialize` must run before anything touches a JAX backend, and only when there
really are several processes (it waits for all of them). `initialize(config)` decides from, in
order: `trainer.distributed` (`DistributedConfig`), the variables JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID / JAX_LOCAL_DEVICE_IDS (jax itself reads the first and the last;
the launchers in `launch/` set all four), and the cluster: a SLURM step with SLURM_NTASKS > 1 or
an Open MPI job with OMPI_COMM_WORLD_SIZE > 1, whose coordinator jax finds on its own. Anything
else is one process and nothing happens, so `python -m hybridjax.train` on one machine is untouched.

The string helpers below let processes agree on host-side values (the run directory, the data
iterators' states) through one small collective over all devices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np

log = logging.getLogger(__name__)


def plan(config, environ: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments of `jax.distributed.initialize` for this process, or None when it
    runs alone. `config` is a `DistributedConfig`; a missing value raises ValueError naming the
    config field that would supply it.

    In a SLURM step or an Open MPI 4 job jax reads the cluster's variables itself (coordinator on
    the first node, one GPU per task), so only what the config or JAX_* variables set is passed.
    Elsewhere every value is explicit and jax's cluster detection is off, so a launcher run
    inside a one-task allocation is not mistaken for task 0 of SLURM."""
    env = os.environ if environ is None else environ
    coordinator = config.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    num = _int_or_none(config.num_processes, env, "JAX_NUM_PROCESSES")
    pid = _int_or_none(config.process_id, env, "JAX_PROCESS_ID")
    common = {
        "local_device_ids": config.local_device_ids,
        "initialization_timeout": config.initialization_timeout,
    }
    cluster = _cluster(env)
    if cluster is not None and cluster.jax_detects:
        if (cluster.size if num is None else num) == 1:
            return None
        kwargs = {
            "coordinator_address": coordinator,
            "num_processes": num,
            "process_id": pid,
            **common,
        }
        return {k: v for k, v in kwargs.items() if v is not None}
    if cluster is not None:  # Open MPI 5: its ranks, but the coordinator must be given
        num = cluster.size if num is None else num
        pid = cluster.rank if pid is None else pid
    if num is None:
        if coordinator is not None:
            raise ValueError(
                "trainer.distributed.num_processes: needed with a coordinator "
                "address (or JAX_NUM_PROCESSES)"
            )
        return None
    if num == 1:
        return None
    if pid is None:
        raise ValueError(
            f"trainer.distributed.process_id: needed for {num} processes (or "
            f"JAX_PROCESS_ID); each process gets its own id in [0, {num})"
        )
    if not 0 <= pid < num:
        raise ValueError(f"trainer.distributed.process_id: {pid} is not in [0, {num})")
    if coordinator is None:
        where = (
            " (this Open MPI sets no OMPI_MCA_orte_hnp_uri, from which jax would find it)"
            if cluster is not None
            else ""
        )
        raise ValueError(
            f"trainer.distributed.coordinator_address: needed for {num} processes"
            f"{where}; give host:port of process 0 (or JAX_COORDINATOR_ADDRESS)"
        )
    kwargs = {
        "coordinator_address": coordinator,
        "num_processes": num,
        "process_id": pid,
        "cluster_detection_method": "deactivate",
        **common,
    }
    return {k: v for k, v in kwargs.items() if v is not None}


def initialize(config) -> bool:
    """Join the other processes of a multi-process run (see `plan`); True when this process is
    one of several. Does nothing when jax.distributed is already up or the run is one process."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    kwargs = plan(config)
    if kwargs is None:
        return False
    # Cross-process collectives between CPU devices need an implementation; gloo is jax's own
    # default in 0.10 and later, but an older default was none at all.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    shown = ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)
    log.info("jax.distributed.initialize(%s)", shown)
    jax.distributed.initialize(**kwargs)
    return True


def is_primary() -> bool:
    """True on the process that writes the run's shared files (metrics, summary, wandb)."""
    return jax.process_index() == 0


def allgather_str(text: str) -> list[str]:
    """Every process's `text`, by process index (all processes must call it together)."""
    data = np.frombuffer(text.encode(), np.uint8)
    lengths = np.asarray(_allgather(np.int32(data.size))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(_allgather(padded)).reshape(len(lengths), -1)
    return [bytes(row[:n]).decode() for row, n in zip(rows, lengths, strict=True)]


def broadcast_str(text: str) -> str:
    """Process 0's `text` on every process."""
    return allgather_str(text)[0]


def first_process(flag: bool) -> int | None:
    """The lowest index of a process whose `flag` is set, the same on every process; None when
    no process's is. One collective: call it at steps every process chooses by the same rule."""
    flags = np.asarray(_allgather(np.int32(bool(flag)))).reshape(-1)
    hits = np.flatnonzero(flags)
    return int(hits[0]) if hits.size else None


def _allgather(x):
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x)


class Cluster(NamedTuple):
    size: int  # processes
    rank: int  # this process's index
    jax_detects: bool  # jax.distributed.initialize finds everything itself


def _cluster(env: Mapping[str, str]) -> Cluster | None:
    """A SLURM step or Open MPI job of more than one task, else None (the tests jax makes)."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
        return Cluster(int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), True)
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return Cluster(
            int(env["OMPI_COMM_WORLD_SIZE"]),
            int(env["OMPI_COMM_WORLD_RANK"]),
            "OMPI_MCA_orte_hnp_uri" in env,
        )
    return None


def _int_or_none(value, env: Mapping[str, str], name: str) -> int | None:
    if value is not None:
        return int(value)
    raw = env.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: must be an int, got {raw!r}") from None
