"""The command line: `python -m hybridjax.train ...`, stopped by SIGTERM, saves and exits 0."""

import os
import signal
import subprocess
import sys
import time

from hybridjax.checkpoint import Checkpointer
from hybridjax.metrics_log import read_metrics

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_cli_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_overrides):
    cmd = [
        sys.executable,
        "-m",
        "hybridjax.train",
        *tiny_overrides,
        "trainer.steps=100000",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while len(read_metrics(tmp_path)) < 3:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no training progress within 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "stopped by SIGTERM" in output
    last = read_metrics(tmp_path)[-1]["step"]
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.latest_step() == last
    ckpt.close()
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    assert (tmp_path / "config.yaml").exists()
