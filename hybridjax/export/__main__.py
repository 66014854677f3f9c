"""`python -m hybridjax.export CHECKPOINT_DIR OUT_DIR [--dtype bfloat16] [--step N]`

Writes a trainer checkpoint as a `transformers` NemotronH checkpoint (`hybridjax.export.to_hf`).
CHECKPOINT_DIR is a training run directory (holding `config.yaml` and `checkpoints/`), its
`checkpoints/` directory, or one step directory `checkpoints/<step>`. The model is the `model`
section of the run's `config.yaml`; the weights are the train state's parameters and router biases
at the latest checkpoint (or `--step`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hybridjax.export.hf import EXPORT_DTYPES, to_hf


def find_run(path: Path, step: int | None) -> tuple[Path, Path, int | None]:
    """(config.yaml, checkpoints directory, step or None) for a run, checkpoints or step dir."""
    path = path.resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    if path.name.isdigit() and (path / "state").is_dir():  # checkpoints/<step>
        if step is not None and step != int(path.name):
            raise ValueError(f"--step {step} contradicts the step directory {path}")
        path, step = path.parent, int(path.name)
    checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for candidate in (checkpoints.parent / "config.yaml", checkpoints / "config.yaml"):
        if candidate.is_file():
            return candidate, checkpoints, step
    raise FileNotFoundError(f"no config.yaml (the run's resolved config) beside {checkpoints}")


def load_trainer_model(path, step: int | None = None):
    """The HybridLM saved by `python -m hybridjax.train` (see `find_run` for `path`)."""
    import orbax.checkpoint as ocp
    import yaml
    from flax import nnx

    from hybridjax.checkpoint import Checkpointer
    from hybridjax.config import HybridConfig
    from hybridjax.model import HybridLM

    config_yaml, checkpoints, step = find_run(Path(path), step)
    cfg = HybridConfig(**yaml.safe_load(config_yaml.read_text())["model"])
    ckpt = Checkpointer(checkpoints, async_save=False)
    try:
        steps = ckpt.all_steps()
        step = ckpt.latest_step() if step is None else step
        if not steps:
            raise FileNotFoundError(f"{checkpoints}: holds no checkpoint")
        if step not in steps:
            raise FileNotFoundError(
                f"{checkpoints}: no checkpoint for step {step}; saved steps: {sorted(steps)}"
            )
        # Restored without a target: the train state as saved (pure dicts of arrays).
        state = ckpt.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        ).state
    finally:
        ckpt.close()
    model = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, state["params"])
    nnx.replace_by_pure_dict(rest, state["model_state"])
    return nnx.merge(graphdef, params, rest), step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hybridjax.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--bos-token-id", type=int, default=None)
    parser.add_argument("--eos-token-id", type=int, default=None)
    parser.add_argument("--pad-token-id", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        model, step = load_trainer_model(args.checkpoint_dir, args.step)
        out = to_hf(
            model,
            args.out_dir,
            args.dtype,
            bos_token_id=args.bos_token_id,
            eos_token_id=args.eos_token_id,
            pad_token_id=args.pad_token_id,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"exported step {step} of {args.checkpoint_dir} to {out} ({args.dtype}); load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
