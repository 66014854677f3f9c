"""Checkpoints with orbax: the train state (params, optimizer state, step, RNG, non-trainable model
state) and the data iterator's state, under `<run dir>/checkpoints/<step>/`.

Saves are atomic (orbax writes a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoint as the latest) and asynchronous where the backend allows:
`save` returns once the arrays are copied off the accelerator and the write finishes in the
background. Only the newest `keep` checkpoints are kept.

In a multi-process run every process calls `save` and `restore` with the same steps: orbax writes
each process's shards of the arrays, and the data states of all processes (each reads its own
shard of the data) travel as one JSON list, which orbax writes from process 0.

`find_checkpoint` and `read_model` serve `trainer.init_from`: they read the parameters and model
state of another run's checkpoint (nothing else of it, and write nothing there).

`StopSignal` turns SIGTERM (and SIGINT) into a flag the training loop polls, so a pre-empted run
saves and exits cleanly instead of dying mid-step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from hybridjax.distributed import allgather_str
from hybridjax.pytree import dotted

log = logging.getLogger(__name__)

PER_PROCESS = "per_process"  # the data item of a multi-process run: {PER_PROCESS: [state, ...]}


class Checkpointer:
    """A thin orbax CheckpointManager: one `state` pytree and one JSON `data` item per step."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict | None = None) -> None:
        """Save `state` (a pytree of arrays) and `data_state` (JSON) as checkpoint `step`."""
        data = data_state or {}
        if jax.process_count() > 1:
            data = {PER_PROCESS: [json.loads(s) for s in allgather_str(json.dumps(data))]}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, like):
        """(state, data_state) of checkpoint `step`; `like` gives the state's structure, shapes,
        dtypes and shardings (arrays or jax.ShapeDtypeStruct). The data state is this process's:
        a run resumes with as many processes as saved it, since each read its own shard."""
        abstract = jax.tree.map(_abstract, like)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        data = restored.data
        saved_by = len(data[PER_PROCESS]) if PER_PROCESS in data else 1
        if saved_by != jax.process_count():
            raise ValueError(f"checkpoint {step} in {self.directory} was saved by {saved_by} "
                             f"process(es), each with its own data position; resume it with as "
                             f"many (this run has {jax.process_count()})")
        if PER_PROCESS in data:
            data = data[PER_PROCESS][jax.process_index()]
        return restored.state, data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def find_checkpoint(path: str | os.PathLike) -> str:
    """The step directory `path` names: a run directory or its `checkpoints/` (their latest step),
    or one step directory `checkpoints/<step>`."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    if os.path.isdir(os.path.join(path, "state")):
        return path
    checkpoints = os.path.join(path, "checkpoints")
    checkpoints = checkpoints if os.path.isdir(checkpoints) else path
    steps = [int(name) for name in os.listdir(checkpoints)  # unfinished saves are not digits
             if name.isdigit() and os.path.isdir(os.path.join(checkpoints, name, "state"))]
    if not steps:
        raise FileNotFoundError(f"{checkpoints}: holds no checkpoint")
    return os.path.join(checkpoints, str(max(steps)))


def read_model(step_dir: str, params, model_state):
    """(params, model_state) of the train state saved in `step_dir`, restored straight into the
    layout of the given trees (shardings, dtypes): the rest of the state (optimizer, step, RNG)
    is not read, and nothing is written. Raises ValueError listing every leaf whose path or shape
    differs from the saved one."""
    from etils import epath

    directory = epath.Path(step_dir) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    try:
        saved = handler.metadata(directory).tree
        like = {"params": params, "model_state": model_state}
        problems = shape_mismatches({k: saved[k] for k in like}, like)
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"]
                                     if len(problems) > 20 else [])
            raise ValueError("; ".join(shown))
        abstract = jax.tree.map(_abstract, like)
        restored = handler.restore(directory, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True))
    finally:
        handler.close()
    return restored["params"], restored["model_state"]


def shape_mismatches(saved, like) -> list[str]:
    """"path: saved (shape), this model (shape)" for every leaf of either tree that the other
    lacks or holds in another shape."""
    def shapes(tree):
        return {dotted(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    a, b = shapes(saved), shapes(like)
    return [f"{k}: {f'saved {a[k]}' if k in a else 'not saved'}, "
            f"{f'this model {b[k]}' if k in b else 'not in this model'}"
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class StopSignal(contextlib.AbstractContextManager):
    """While active, SIGTERM/SIGINT set `requested` (and name the signal) instead of killing the
    process; the loop saves a checkpoint and returns. A second SIGINT interrupts as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name
        log.warning("%s received: saving a checkpoint and stopping after this step", name)

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous.clear()
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
