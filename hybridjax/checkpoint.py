"""Checkpoints with orbax: the train state (params, optimizer state, step, RNG, non-trainable model
state) and the data iterator's state, under `<run dir>/checkpoints/<step>/`.

Saves are atomic (orbax writes a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoint as the latest) and asynchronous where the backend allows:
`save` returns once the arrays are copied off the accelerator and the write finishes in the
background. Only the newest `keep` checkpoints are kept.

Every checkpoint carries a fingerprint of its state (a checksum per array, in orbax's step
metadata), and `restore` checks what it read against it: orbax notices a garbled or truncated file
only where the compressed stream breaks, and reads some damage (a flipped bit in the data) as other,
plausible values. `restore_latest` resumes from the newest checkpoint that restores intact and
renames the damaged ones newer than it to `<step>.damaged`: kept on disk for inspection, but no
longer steps of orbax's, so they are neither "latest" nor counted by `keep` (which would otherwise
delete good older checkpoints to make room for them), and the step can be saved again.

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
import sys
import warnings

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from hybridjax import distributed
from hybridjax.pytree import dotted

log = logging.getLogger(__name__)

PER_PROCESS = "per_process"  # the data item of a multi-process run: {PER_PROCESS: [state, ...]}
FINGERPRINT = "fingerprint"  # key of the state's fingerprint in orbax's custom step metadata
DAMAGED = ".damaged"  # suffix of a damaged step directory that `restore_latest` set aside


class DamagedCheckpoint(Exception):
    """A checkpoint that does not restore intact; the message says why, in one line."""


class NoIntactCheckpoint(RuntimeError):
    """No checkpoint of the directory restores intact."""


class Checkpointer:
    """A thin orbax CheckpointManager: one `state` pytree and one JSON `data` item per step."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict | None = None) -> None:
        """Save `state` (a pytree of arrays) and `data_state` (JSON) as checkpoint `step`."""
        data = data_state or {}
        if jax.process_count() > 1:
            gathered = distributed.allgather_str(json.dumps(data))
            data = {PER_PROCESS: [json.loads(s) for s in gathered]}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
        self.manager.save(
            step, args=args, force=True, custom_metadata={FINGERPRINT: fingerprint(state)}
        )

    def restore(self, step: int, like):
        """(state, data_state) of checkpoint `step`; `like` gives the state's structure, shapes,
        dtypes and shardings (arrays or jax.ShapeDtypeStruct). The data state is this process's:
        a run resumes with as many processes as saved it, since each read its own shard.

        Raises DamagedCheckpoint when the checkpoint does not read back as it was saved, and
        ValueError when it holds another state than `like` (another model or optimizer)."""
        saved = self._saved_arrays(step)
        problems = shape_mismatches(
            saved, {dotted(p): x for p, x in jax.tree_util.tree_leaves_with_path(like)}
        )
        if problems:
            raise ValueError(
                f"checkpoint {step} in {self.directory} holds another state than "
                f"this run's: {_listed(problems)}; resume with the model and "
                f"optimizer it was saved with, or choose a new hydra.run.dir"
            )
        # Read each array as saved, so its bits can be checked, then cast to this run's dtype.
        abstract = jax.tree_util.tree_map_with_path(
            lambda p, x: _abstract(x, saved[dotted(p)].dtype), like
        )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:  # tensorstore, zstd, JSON: whatever the damaged bytes broke
            raise DamagedCheckpoint(_first_line(err)) from err
        self._check(step, restored.state)
        state = jax.tree.map(
            lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), restored.state, like
        )
        data = restored.data
        saved_by = len(data[PER_PROCESS]) if PER_PROCESS in data else 1
        if saved_by != jax.process_count():
            raise ValueError(
                f"checkpoint {step} in {self.directory} was saved by {saved_by} "
                f"process(es), each with its own data position; resume it with as "
                f"many (this run has {jax.process_count()})"
            )
        if PER_PROCESS in data:
            data = data[PER_PROCESS][jax.process_index()]
        return state, data

    def restore_latest(self, like) -> tuple[int, object, dict]:
        """(step, state, data_state) of the newest checkpoint that restores intact (see
        `restore`). Damaged newer ones are logged and, once an older one restored, renamed to
        `<step>.damaged`; raises NoIntactCheckpoint naming every step tried when none restores
        (and then renames nothing)."""
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data = self.restore(step, like)
                problem = None
            except DamagedCheckpoint as err:
                problem = str(err)
                _mute_orbax_leftovers()
            if jax.process_count() > 1:  # damage one process read is damage for all
                problems = distributed.allgather_str(problem or "")
                problem = next((p for p in problems if p), None)
            if problem is None:
                if damaged:
                    kept = self._set_aside([s for s, _ in damaged])
                    log.warning(
                        "resuming from checkpoint step %d in %s, the newest that restores "
                        "intact; kept on disk, out of the rotation: %s",
                        step,
                        self.directory,
                        ", ".join(kept),
                    )
                return step, state, data
            log.warning("checkpoint step %d in %s is damaged: %s", step, self.directory, problem)
            damaged.append((step, problem))
        raise NoIntactCheckpoint(
            f"no checkpoint in {self.directory} restores intact: tried steps "
            f"{', '.join(str(s) for s, _ in damaged)} ("
            + "; ".join(f"step {s}: {p}" for s, p in damaged)
            + "). Nothing was changed there: move the step directories away to train from "
            "scratch in this run directory, or choose another hydra.run.dir"
        )

    def _saved_arrays(self, step: int) -> dict:
        """{leaf path: orbax's ArrayMetadata} of checkpoint `step`'s state."""
        handler = ocp.PyTreeCheckpointHandler()
        try:
            tree = handler.metadata(self.manager.directory / str(step) / "state").tree
        except Exception as err:
            raise DamagedCheckpoint(f"its metadata does not read: {_first_line(err)}") from err
        finally:
            handler.close()
        return {dotted(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    def _check(self, step: int, state) -> None:
        """Raise DamagedCheckpoint unless `state` is what checkpoint `step` saved: its fingerprint,
        or (checkpoints saved before fingerprints) finite floating-point values, as every
        checkpoint's were."""
        try:
            expected = self.manager.metadata(step).custom_metadata.get(FINGERPRINT)
        except Exception as err:
            raise DamagedCheckpoint(f"its step metadata does not read: {_first_line(err)}") from err
        if expected is None:
            if not bool(all_finite(state)):
                raise DamagedCheckpoint(
                    "it holds NaN or infinite values, which no checkpoint is saved with"
                )
            return
        found = fingerprint(state)
        changed = [
            k for k in sorted(expected.keys() | found.keys()) if expected.get(k) != found.get(k)
        ]
        if changed:
            raise DamagedCheckpoint(
                f"the values read differ from those saved (fingerprint) in {_listed(changed)}"
            )

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Rename the step directories `steps` to `<step>.damaged` (`.damaged.2`, ... when that
        name is taken), make orbax forget them, and return the new paths."""
        targets = []
        if distributed.is_primary():
            for step in steps:
                path = os.path.join(self.directory, str(step))
                target, n = path + DAMAGED, 1
                while os.path.exists(target):
                    n += 1
                    target = f"{path}{DAMAGED}.{n}"
                os.rename(path, target)
                targets.append(target)
        if jax.process_count() > 1:  # also makes the others list the directory after the rename
            targets = json.loads(distributed.broadcast_str(json.dumps(targets)))
        self.manager.reload()
        return targets

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
    steps = [
        int(name)
        for name in os.listdir(checkpoints)  # unfinished saves are not digits
        if name.isdigit() and os.path.isdir(os.path.join(checkpoints, name, "state"))
    ]
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
            raise ValueError(_listed(problems))
        abstract = jax.tree.map(_abstract, like)
        restored = handler.restore(
            directory,
            args=ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True,
            ),
        )
    finally:
        handler.close()
    return restored["params"], restored["model_state"]


def shape_mismatches(saved, like) -> list[str]:
    """ "path: saved (shape), this model (shape)" for every leaf of either tree that the other
    lacks or holds in another shape."""

    def shapes(tree):
        return {dotted(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    a, b = shapes(saved), shapes(like)
    return [
        f"{k}: {f'saved {a[k]}' if k in a else 'not saved'}, "
        f"{f'this model {b[k]}' if k in b else 'not in this model'}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


def _abstract(x, dtype=None):
    """`x`'s shape, sharding and dtype (or `dtype`) as a jax.ShapeDtypeStruct."""
    return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=getattr(x, "sharding", None))


def _listed(items: list[str], limit: int = 20) -> str:
    """The first `limit` of `items`, "; "-joined, and how many more there are."""
    more = [f"... and {len(items) - limit} more"] if len(items) > limit else []
    return "; ".join(items[:limit] + more)


_muted = False


def _mute_orbax_leftovers() -> None:
    """From now on, drop the reports of what a failed orbax restore leaves behind; others pass.

    orbax reads the arrays in concurrent asyncio tasks, and when one read fails it closes their
    event loop with the rest pending. Each of those is reported as it finishes or is collected,
    at any later time and long after the one error that counts was logged: "Exception ignored
    in: <coroutine ...>" with kilobytes of tensorstore spec, "Event loop is closed" (from
    tensorstore's callback into the closed loop), asyncio's "Task exception was never
    retrieved", and "coroutine ... was never awaited" for those that never started."""
    global _muted
    if _muted:
        return
    _muted = True
    previous = sys.unraisablehook
    orbax = os.path.join("orbax", "checkpoint", "")

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        leftover = (code is not None and orbax in code.co_filename) or (
            unraisable.object is None
            and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
        )
        if not leftover:
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(lambda record: orbax not in record.getMessage())
    warnings.filterwarnings(
        "ignore", "coroutine '_read_array_index_and_device_put' was never awaited", RuntimeWarning
    )


def _first_line(err: BaseException) -> str:
    """The first line of the innermost cause of `err`: what tensorstore or orbax actually hit,
    without the several-kilobyte spec dump their outer errors carry."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    lines = str(err).strip().splitlines() or [""]
    line = lines[0] if len(lines[0]) <= 300 else lines[0][:297] + "..."
    return f"{type(err).__name__}: {line}"


@jax.jit
def _checksums(tree):
    return jax.tree.map(_checksum, tree)


def _checksum(x) -> jax.Array:
    """A uint32 checksum of the bits of `x`: the sum, wrapping, of its 8-, 16- or 32-bit words
    each times an odd weight that depends on its position. Integer sums are exact in any order,
    so the value does not depend on the sharding, and any one changed word changes it."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)  # 8 bytes: a trailing 2
    # Each word's flat index from iotas rather than a reshape, which would gather a sharded
    # array onto every device.
    index, stride = jnp.zeros(words.shape, jnp.uint32), 1
    for axis in reversed(range(words.ndim)):
        index += jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
        stride = stride * words.shape[axis] % 2**32
    return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


def fingerprint(state) -> dict[str, int]:
    """{leaf path: checksum of its bits} of a pytree of arrays (all processes call it together)."""
    sums = jax.device_get(_checksums(state))
    return {dotted(p): int(v) for p, v in jax.tree_util.tree_leaves_with_path(sums)}


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
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
