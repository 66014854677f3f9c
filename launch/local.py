"""Run one multi-process JAX job on this host: N copies of a command, one per GPU (or group).

    python launch/local.py -- python -m hybridjax.train trainer=gpu hydra.run.dir=outputs/run1
    python launch/local.py --nproc 2 -- python launch/preflight.py
    python launch/local.py --nproc 2 --cpu-devices 2 -- python launch/preflight.py  # no GPU

Process i gets JAX_COORDINATOR_ADDRESS (a free localhost port), JAX_NUM_PROCESSES=N and
JAX_PROCESS_ID=i, which hybridjax.distributed reads, and JAX_LOCAL_DEVICE_IDS: its share of the
host's GPUs (G / N consecutive ones; jax then hides the rest from it). Why several processes on
one host when one process can drive every GPU: to rehearse a multi-node run on one node, and to
give each GPU its own Python host loop and data loader.

Output lines come back prefixed with the process index. SIGTERM / SIGINT go to every process (a
training run stops at one agreed step and saves). When one process fails, the others are stopped:
they would otherwise wait in their next collective until jax's heartbeat timeout.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_S = 60  # after asking the others to stop, how long until they are killed


def gpu_count() -> int:
    """GPUs this host shows the launcher: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_envs(nproc: int, gpus: int, port: int, cpu_devices: int | None) -> list[dict]:
    """The environment of each of the `nproc` processes."""
    if gpus and gpus % nproc:
        raise SystemExit(f"--nproc {nproc} does not divide the {gpus} GPUs of this host")
    per = gpus // nproc
    envs = []
    for i in range(nproc):
        env = {
            **os.environ,
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": str(nproc),
            "JAX_PROCESS_ID": str(i),
        }
        if per:
            env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(i * per + k) for k in range(per))
        if cpu_devices:
            flag = f"--xla_force_host_platform_device_count={cpu_devices}"
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
            env["JAX_PLATFORMS"] = "cpu"
        envs.append(env)
    return envs


def relay(index: int, stream, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sys.stdout.write(f"[{index}] {line}")
            sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        usage="python launch/local.py [--nproc N] [--port P] [--cpu-devices K] -- command ...",
    )
    parser.add_argument(
        "--nproc", type=int, default=None, help="processes (default: one per GPU of this host)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="coordinator port on localhost (default: a free one)"
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="run on the CPU with this many host devices per process (tests)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    gpus = 0 if args.cpu_devices else gpu_count()
    nproc = args.nproc or gpus
    if nproc < 1:
        parser.error("no GPU found: give --nproc (and --cpu-devices to run on the CPU)")
    envs = process_envs(nproc, gpus, args.port or free_port(), args.cpu_devices)

    lock = threading.Lock()
    procs, relays = [], []
    for i, env in enumerate(envs):
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        procs.append(proc)
        relays.append(threading.Thread(target=relay, args=(i, proc.stdout, lock), daemon=True))
        relays[-1].start()

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)

    status, deadline = 0, None
    while None in [p.poll() for p in procs]:  # a list: poll every one
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and deadline is None:
            status = failed[0]
            deadline = time.monotonic() + GRACE_S
            forward(signal.SIGTERM, None)
        if deadline is not None and time.monotonic() > deadline:
            forward(signal.SIGKILL, None)
        time.sleep(0.2)
    for t in relays:
        t.join()
    return status or next((p.returncode for p in procs if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
