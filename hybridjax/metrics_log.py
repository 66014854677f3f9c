"""Where metrics go: `metrics.jsonl` in the run directory (always), wandb (offline unless asked),
and a one-line console progress display with ETA.

`metrics.jsonl` holds one JSON object per logged step, `{"step": ..., "loss": ..., ...}`; eval
metrics are merged into the object of the step they were computed at. On resume the file is cut
back to the checkpoint's step, so it always describes one consistent history.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid

log = logging.getLogger("hybridjax.train")

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: str, *, total_steps: int, start_step: int = 0,
                 logger=None, config: dict | None = None, progress: bool = True):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.total_steps = total_steps
        self.start_step = start_step
        _truncate_after(self.path, start_step)
        self.file = open(self.path, "a")  # noqa: SIM115  (open for the run; closed in close())
        self.wandb = _start_wandb(run_dir, logger, config) if logger and logger.name == "wandb" \
            else None
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
        if self.progress is not None:
            self.progress.clear()
        log.info(text)

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
    """wandb.init in `run_dir/wandb`, offline unless logger.mode says otherwise; one wandb run id per
    run directory, so a resumed run continues the same wandb run."""
    import wandb

    id_file = os.path.join(run_dir, "wandb_id.txt")
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_file, "w") as f:
            f.write(run_id)
    return wandb.init(project=logger.project, entity=logger.entity, group=logger.group,
                      name=logger.run_name, tags=list(logger.tags) or None, config=config,
                      dir=run_dir, mode=logger.mode, id=run_id, resume="allow",
                      settings=wandb.Settings(quiet=True))


class Progress:
    """A console progress line: `[#####.....] 120/1000 loss 1.234 | 12.3 it/s | ETA 1m12s`.

    On a terminal it redraws in place (at most ~10 times a second); elsewhere (CI logs, files) it
    prints a line only at logged steps (`logged=True`) and at the end."""

    WIDTH = 24

    def __init__(self, total: int, start: int = 0, stream=None):
        self.total, self.start = total, start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = None  # time of the first update (after the first, compiling, step)
        self.s0 = start
        self.last_draw = 0.0
        self.drawn = False

    def rate(self, step: int) -> float | None:
        if self.t0 is None or step <= self.s0:
            return None
        return (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)

    def line(self, step: int, loss=None) -> str:
        frac = min(step / max(self.total, 1), 1.0)
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        parts = [f"[{bar}] {step}/{self.total}"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        rate = self.rate(step)
        if rate:
            parts.append(f"{rate:.2f} it/s")
            parts.append(f"ETA {format_duration((self.total - step) / rate)}")
        return " | ".join(parts)

    def update(self, step: int, loss=None, *, logged: bool = False, final: bool = False) -> None:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.s0 = now, step
        if self.tty:
            if final or now - self.last_draw > 0.1:
                self.stream.write("\r\033[K" + self.line(step, loss))
                self.stream.flush()
                self.last_draw, self.drawn = now, True
            if final:
                self.close()
        elif logged or final:
            self.stream.write(self.line(step, loss) + "\n")
            self.stream.flush()

    def clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
