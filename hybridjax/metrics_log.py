"""Where metrics go: `metrics.jsonl` in the run directory (always), wandb (offline unless asked),
and the console's progress (tqdm: rate, ETA and the loss).

`metrics.jsonl` holds one JSON object per logged step, `{"step": ..., "loss": ..., ...}`; eval
metrics are merged into the object of the step they were computed at. On resume the file is cut
back to the checkpoint's step, so it always describes one consistent history.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import uuid

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("hybridjax.train")

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(
        self,
        run_dir: str,
        *,
        total_steps: int,
        start_step: int = 0,
        logger=None,
        config: dict | None = None,
        progress: bool = True,
    ):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.total_steps = total_steps
        self.start_step = start_step
        _truncate_after(self.path, start_step)
        self.file = open(self.path, "a")  # noqa: SIM115  (open for the run; closed in close())
        self.wandb = (
            _start_wandb(run_dir, logger, config) if logger and logger.name == "wandb" else None
        )
        self.progress = Progress(total_steps, start_step) if progress else None

    def write(self, step: int, metrics: dict) -> None:
        """One line of metrics.jsonl (and one wandb log call) for `step`."""
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=int(step))

    def show(self, step: int, loss=None, *, logged: bool = False, final: bool = False) -> None:
        """Update the console progress line."""
        if self.progress is not None:
            self.progress.update(step, loss, logged=logged, final=final)

    def message(self, text: str) -> None:
        log.info(text)  # through tqdm.write while a bar is drawn (see Progress)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_metrics(run_dir: str) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: str, step: int) -> None:
    """Drop records past `step` (written after the checkpoint a resumed run restarts from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _plain(value):
    """A JSON-friendly scalar: numpy/jax scalars -> float/int; NaN/inf -> None."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    value = float(value)
    return value if math.isfinite(value) else None


def _start_wandb(run_dir: str, logger, config: dict | None):
    """wandb.init in `run_dir/wandb`, offline unless logger.mode says otherwise; one wandb run id
    per run directory, so a resumed run continues the same wandb run."""
    import wandb

    id_file = os.path.join(run_dir, "wandb_id.txt")
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_file, "w") as f:
            f.write(run_id)
    return wandb.init(
        project=logger.project,
        entity=logger.entity,
        group=logger.group,
        name=logger.run_name,
        tags=list(logger.tags) or None,
        config=config,
        dir=run_dir,
        mode=logger.mode,
        id=run_id,
        resume="allow",
        settings=wandb.Settings(quiet=True),
    )


class Progress:
    """Training progress with tqdm: steps done, rate, ETA and the loss.

    On a terminal: tqdm's bar, redrawn in place, with console log records written above it (tqdm's
    logging redirect) rather than through it. Elsewhere (log files, CI) no bar, since its
    carriage-return redraws would pile up in the file: each logged step (`logged=True`) and the
    last log tqdm's meter as a plain line instead, e.g.
    `step 120/1000 (12%) [00:10<01:12, 12.30step/s, loss=1.2340]`.

    The clock starts at the first update, after the first (compiling) step, so the rate and ETA
    are of training alone."""

    LOG_FORMAT = (
        "step {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    )

    def __init__(self, total: int, start: int = 0, stream=None):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = None  # (time, step) of the first update
        self.bar = None  # the terminal's tqdm bar, from the first update until close()
        self.redirect = contextlib.ExitStack()

    def update(self, step: int, loss=None, *, logged: bool = False, final: bool = False) -> None:
        postfix = f"loss={float(loss):.4f}" if loss is not None else ""
        if self.started is None:
            self.started = (time.perf_counter(), step)
            if self.tty:
                self.bar = tqdm(
                    total=self.total,
                    initial=step,
                    unit="step",
                    file=self.stream,
                    dynamic_ncols=True,
                )
                self.redirect.enter_context(logging_redirect_tqdm())
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
        elif logged or final:
            t0, s0 = self.started
            log.info(
                tqdm.format_meter(
                    step,
                    self.total,
                    time.perf_counter() - t0,
                    initial=s0,
                    unit="step",
                    postfix=postfix,
                    bar_format=self.LOG_FORMAT,
                )
            )
        if final:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.redirect.close()
