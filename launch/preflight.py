"""Check a (multi-process) JAX setup in seconds, before a long run finds out the hard way.

    python launch/preflight.py                                  # one process
    python launch/local.py --nproc 2 -- python launch/preflight.py
    srun python launch/preflight.py                              # inside launch/slurm.sbatch

Joins the other processes exactly as `python -m hybridjax.train` does (hybridjax.distributed:
SLURM, Open MPI, JAX_* variables), prints from process 0 which process drives which devices on
which host, then sums known values over every device with one psum (device i contributes i + 1)
and compares the result with n (n + 1) / 2 on every process, and times a larger all-reduce for
its bus bandwidth. Exit status 1 when any process saw a wrong sum.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridjax import distributed
from hybridjax.train_config import DistributedConfig


def device_map() -> list[dict]:
    """One record per process: index, host, pid and its devices (global ids and kinds)."""
    mine = {
        "process": jax.process_index(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "devices": [f"{d.id}:{d.device_kind}" for d in jax.local_devices()],
    }
    if jax.process_count() == 1:
        return [mine]
    return [json.loads(s) for s in distributed.allgather_str(json.dumps(mine))]


def all_reduce(values_per_device: int) -> tuple[bool, float, float]:
    """psum over every device of a (values_per_device,) float32 block filled with the device's
    index + 1: (every local result equals n (n + 1) / 2, the value seen, seconds per call)."""
    devices = jax.devices()
    n = len(devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    x = jax.make_array_from_callback(
        (n, values_per_device),
        NamedSharding(mesh, P("d")),
        lambda index: np.full((1, values_per_device), (index[0].start or 0) + 1, np.float32),
    )
    psum = jax.jit(
        jax.shard_map(
            lambda block: jax.lax.psum(block, "d"), mesh=mesh, in_specs=P("d"), out_specs=P()
        )
    )
    out = jax.block_until_ready(psum(x))  # compile and warm up
    calls = 5
    t0 = time.perf_counter()
    for _ in range(calls):
        out = psum(x)
    out = jax.block_until_ready(out)
    seconds = (time.perf_counter() - t0) / calls
    expected = n * (n + 1) / 2
    seen = [np.asarray(shard.data) for shard in out.addressable_shards]
    ok = all(np.all(s == expected) for s in seen)
    return ok, float(seen[0].flat[0]), seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mib",
        type=float,
        default=None,
        help="MiB per device of the timed all-reduce (default: 256 on accelerators, 1 on the CPU)",
    )
    args = parser.parse_args(argv)
    distributed.initialize(DistributedConfig())
    primary = jax.process_index() == 0
    say = print if primary else (lambda *a, **k: None)

    processes = device_map()
    say(
        f"jax {jax.__version__}, backend {jax.default_backend()}: {jax.process_count()} "
        f"process(es), {jax.device_count()} device(s)"
    )
    for p in processes:
        say(
            f"  process {p['process']:>3}  host {p['host']}  pid {p['pid']}  devices "
            f"{', '.join(p['devices'])}"
        )

    ok, seen, _ = all_reduce(1)
    n = jax.device_count()
    say(
        f"psum of 1..{n} over {n} devices: {seen:g} (expected {n * (n + 1) // 2}) "
        f"{'OK' if ok else 'WRONG'}"
    )
    mib = args.mib if args.mib is not None else (1 if jax.default_backend() == "cpu" else 256)
    count = max(int(mib * 2**20 / 4), 1)
    big_ok, _, seconds = all_reduce(count)
    size = count * 4
    bus = size / seconds * 2 * (n - 1) / n / 1e9  # bytes each device sends and receives
    say(
        f"all-reduce of {size / 2**20:.1f} MiB per device: {seconds * 1e3:.2f} ms, bus bandwidth "
        f"{bus:.1f} GB/s {'OK' if big_ok else 'WRONG'}"
    )

    good = ok and big_ok
    if jax.process_count() > 1:
        bad = distributed.first_process(not good)
        good = bad is None
        if not good:
            say(f"process {bad} saw a wrong sum")
    say("preflight OK" if good else "preflight FAILED")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
