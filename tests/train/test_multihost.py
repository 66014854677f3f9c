"""Multi-process training on the CPU: two `jax.distributed` processes of two host devices each.

The processes agree on a SIGTERM that only one of them received, save one checkpoint together,
resume through `launch/local.py`, and match a one-process run over the same global batches.
Also: when `hybridjax.distributed` joins processes (SLURM, Open MPI, config, JAX_* variables),
the launch/ tools, and the config's errors.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hybridjax.checkpoint import PER_PROCESS, Checkpointer
from hybridjax.distributed import plan
from hybridjax.metrics_log import read_metrics
from hybridjax.train import build
from hybridjax.train_config import DistributedConfig, resolve

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TIMEOUT_S = 240  # per launch; one takes 10-20 s on 2 cores

# One MLP block: the plumbing under test does not depend on the mixers, and this compiles fastest.
# 8 rows: 2 per device of the 2 x 2, 1 per device of the one-process reference's 8.
MULTI = [
    "model.pattern=-",
    "trainer.batch_size=8",
    "trainer.mesh.data=-1",
    "trainer.steps=1000",
    "trainer.eval_every=4",
    "data.num_eval_examples=17",
]  # 17 in batches of 4 rows: one process reads 3, one 2


def child_env(tmp_path) -> dict:
    """Two CPU devices per process (the test process has 8) and a compile cache the launches
    share, so the resumed launch does not compile again."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    return {
        **env,
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def free_port() -> int:
    import portpicker

    return portpicker.pick_unused_port()


def start(cmd, env, log_path):
    log = open(log_path, "w")  # noqa: SIM115  (closed by finish)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log


def finish(procs, timeout=TIMEOUT_S) -> list[str]:
    """Wait for every (process, log); kill stragglers; each one's output."""
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = []
    for _, log in procs:
        log.close()
        with open(log.name) as f:
            outputs.append(f.read())
    return outputs


def check_exit(procs, outputs):
    for i, ((proc, _), out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{out[-4000:]}"


def test_two_processes_agree_on_a_stop_resume_and_match_one_process(
    tmp_path, tiny_overrides, tiny_run, tiny_compose
):
    run_dir, env = tmp_path / "multi", child_env(tmp_path)
    train = [
        sys.executable,
        "-m",
        "hybridjax.train",
        *tiny_overrides,
        *MULTI,
        f"hydra.run.dir={run_dir}",
    ]

    # 1. Two processes joined by config overrides; SIGTERM reaches process 1 alone.
    port = free_port()
    procs = [
        start(
            [
                *train,
                f"trainer.distributed.coordinator_address=localhost:{port}",
                "trainer.distributed.num_processes=2",
                f"trainer.distributed.process_id={i}",
            ],
            env,
            tmp_path / f"first_{i}.log",
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(read_metrics(run_dir)) < 5:  # past the first eval (step 4)
            if any(p.poll() is not None for p, _ in procs) or time.monotonic() > deadline:
                check_exit(procs, finish(procs, timeout=1))
                pytest.fail("no training progress")
            time.sleep(0.1)
        procs[1][0].send_signal(signal.SIGTERM)
    finally:
        outputs = finish(procs)
    check_exit(procs, outputs)
    stopped = read_metrics(run_dir)[-1]["step"]
    assert f"stopped by SIGTERM after step {stopped}" in outputs[1], outputs[1][-3000:]
    assert f"stopped by a stop request on process 1 after step {stopped}" in outputs[0], outputs[0][
        -3000:
    ]
    ckpt = Checkpointer(run_dir / "checkpoints")
    assert ckpt.all_steps() == [stopped]
    ckpt.close()

    # 2. Resume through the local launcher (JAX_* variables), to a planned stop 3 steps on.
    end = stopped + 3
    launcher = [
        sys.executable,
        "launch/local.py",
        "--nproc",
        "2",
        "--cpu-devices",
        "2",
        "--",
        *train,
        f"trainer.stop_at={end}",
    ]
    procs = [start(launcher, env, tmp_path / "resumed.log")]
    outputs = finish(procs)
    check_exit(procs, outputs)
    assert f"resumed from checkpoint step {stopped}" in outputs[0]
    assert "[0] " in outputs[0] and "[1] " in outputs[0]

    # 3. One process over the same global batches: 8 devices of this test process, 1 row each.
    ref_dir = tmp_path / "one"
    tiny_run(ref_dir, [*MULTI, f"trainer.stop_at={end}"])
    multi, one = read_metrics(run_dir), read_metrics(ref_dir)
    assert [r["step"] for r in multi] == list(range(1, end + 1))  # process 0 alone wrote them
    assert [r["step"] for r in one] == list(range(1, end + 1))
    for a, b in zip(multi, one, strict=True):
        for key in ("loss", "grad_norm", "lr"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=f"{key} {a['step']}")
        assert a.get("eval/accuracy") == b.get("eval/accuracy"), a["step"]
        assert a.get("eval/answers") == b.get("eval/answers"), a["step"]
    assert sum("eval/accuracy" in r for r in multi) == end // 4

    a, b = final_state(run_dir, end, tiny_compose), final_state(ref_dir, end, tiny_compose)
    assert int(a["state"].step) == int(b["state"].step) == end
    close = jax.tree.map(
        lambda x, y: np.allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6),
        a["state"].params,
        b["state"].params,
    )
    assert all(jax.tree.leaves(close))
    assert len(a["data"][PER_PROCESS]) == 2 and PER_PROCESS not in b["data"]


def final_state(run_dir, step, compose):
    """Checkpoint `step`'s state (on this process's devices) and raw data item."""
    state = build(resolve(compose(MULTI)), str(run_dir)).state
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        return ckpt.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
    finally:
        ckpt.close()


# --- launch/ ---------------------------------------------------------------------------------
def test_preflight_one_process_of_eight_devices():
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    out = subprocess.run(
        [sys.executable, "launch/preflight.py"],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 process(es), 8 device(s)" in out.stdout
    assert "psum of 1..8 over 8 devices: 36 (expected 36) OK" in out.stdout
    assert "preflight OK" in out.stdout


def test_local_launcher_runs_preflight_on_two_processes(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "launch/local.py",
            "--nproc",
            "2",
            "--cpu-devices",
            "2",
            "--",
            sys.executable,
            "launch/preflight.py",
        ],
        cwd=ROOT,
        env=child_env(tmp_path),
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[0] jax" in out.stdout and "2 process(es), 4 device(s)" in out.stdout
    assert "[0]   process   1" in out.stdout
    assert "[0] psum of 1..4 over 4 devices: 10 (expected 10) OK" in out.stdout
    assert "[0] preflight OK" in out.stdout


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
    script = (
        "import os, sys, time\n"
        "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "launch/local.py",
            "--nproc",
            "2",
            "--cpu-devices",
            "1",
            "--",
            sys.executable,
            "-c",
            script,
        ],
        cwd=ROOT,
        env=child_env(tmp_path),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3, out.stdout + out.stderr
    assert time.monotonic() - t0 < 30


# --- hybridjax.distributed.plan --------------------------------------------------------------
SLURM = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
}


@pytest.mark.parametrize(
    "env,config,expected",
    [
        ({}, {}, None),  # one process: nothing happens
        ({**SLURM, "SLURM_NTASKS": "1"}, {}, None),  # a one-task SLURM step
        ({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, {}, None),
        ({}, {"num_processes": 1}, None),
        # SLURM / Open MPI 4: jax.distributed.initialize() finds everything itself
        (SLURM, {}, {"initialization_timeout": 300}),
        (
            {
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_RANK": "2",
                "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1234",
            },
            {},
            {"initialization_timeout": 300},
        ),
        (
            SLURM,
            {"local_device_ids": [0, 1]},
            {"local_device_ids": [0, 1], "initialization_timeout": 300},
        ),
        # Open MPI 5 (no orte URI): its ranks, the coordinator from the config
        (
            {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"},
            {"coordinator_address": "h:1"},
            {
                "coordinator_address": "h:1",
                "num_processes": 4,
                "process_id": 2,
                "cluster_detection_method": "deactivate",
                "initialization_timeout": 300,
            },
        ),
        # explicit: the config, else the JAX_* variables
        (
            {},
            {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1},
            {
                "coordinator_address": "h:1",
                "num_processes": 2,
                "process_id": 1,
                "cluster_detection_method": "deactivate",
                "initialization_timeout": 300,
            },
        ),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "0"},
            {"process_id": 2, "initialization_timeout": 9},
            {
                "coordinator_address": "h:2",
                "num_processes": 3,
                "process_id": 2,
                "cluster_detection_method": "deactivate",
                "initialization_timeout": 9,
            },
        ),
    ],
)
def test_plan(env, config, expected):
    assert plan(DistributedConfig(**config), env) == expected


@pytest.mark.parametrize(
    "env,config,message",
    [
        ({}, {"coordinator_address": "h:1"}, "trainer.distributed.num_processes: needed"),
        (
            {},
            {"coordinator_address": "h:1", "num_processes": 2},
            "trainer.distributed.process_id: needed for 2 processes",
        ),
        ({}, {"num_processes": 2, "process_id": 0}, "trainer.distributed.coordinator_address"),
        (
            {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"},
            {},
            "coordinator_address: needed for 4 processes .this Open MPI sets no",
        ),
        (
            {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"},
            {"coordinator_address": "h:1"},
            r"process_id: 5 is not in \[0, 2\)",
        ),
        ({"JAX_NUM_PROCESSES": "two"}, {}, "JAX_NUM_PROCESSES: must be an int"),
    ],
)
def test_plan_names_what_is_missing(env, config, message):
    with pytest.raises(ValueError, match=message):
        plan(DistributedConfig(**config), env)


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.distributed.process_id=-1", "trainer.distributed.process_id: must be >= 0"),
        (
            "trainer.distributed.coordinator_address=nohost",
            "trainer.distributed.coordinator_address",
        ),
        ("trainer.distributed.local_device_ids=[1,1]", "trainer.distributed.local_device_ids"),
        (
            "trainer.distributed.initialization_timeout=0",
            "trainer.distributed.initialization_timeout: must be > 0",
        ),
    ],
)
def test_bad_distributed_config_fails_naming_it(tiny_compose, override, message):
    with pytest.raises(ValueError, match=message):
        resolve(tiny_compose([override, "trainer.distributed.num_processes=2"]))
