"""The long-context extension experiment: train short, extend, test recall at length.

    python -m experiments.long_context run                            # +experiment=long_context
    python -m experiments.long_context run +experiment=long_context_gpu
    python -m experiments.long_context multirun/long_context/<time>   # the report

`run` is a Hydra multirun (configs/experiment/long_context.yaml: models x seeds). Each job trains
in its directory: `short/`, the job's config as composed (short rows, NIAH), then `extend/`,
the same overrides plus `experiment/extension/<name>.yaml` (constant lr, long batches mixed with
short ones) started from `short/`'s parameters (trainer.init_from), and, where
`experiment/extension/<name>_control.yaml` exists, `control/`: as many steps and tokens from the
same parameters at the short length only, which separates what the longer rows teach from what
more training does. Every run ends with the same held-out NIAH grid (context length x needle
depth, up to 8x the short length). Command-line overrides apply to every run.

The report reads every `short/`, `control/` and `extend/` run under the given directories and writes in
--out (default: <first directory>/report):
  grid.csv                 one row per run and grid cell: pattern, seed, stage, length, depth,
                           accuracy
  niah_<pattern>.png       per model: accuracy over length x depth (mean over seeds), before
                           and after the extension side by side ("*" is written "x")
  report.md                accuracy per context length (mean over depths and seeds), per model
                           and stage, with the figures linked
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import sys
from collections.abc import Sequence

from experiments.report import BUCKET_PREFIX, _pyplot, find_run_dirs, load_run, print_report

STAGES = ("short", "control", "extend")
STAGE_NAMES = {"short": "before", "control": "control", "extend": "after"}  # in the table
TITLES = {"short": "before extension", "control": "control", "extend": "after extension"}
BUCKET = re.compile(r"len=(\d+),depth=([0-9.]+)")


# --- the experiment --------------------------------------------------------------------------
def run_job(cfg) -> float | None:
    """One Hydra job: the short run, then its extension (and control); returns the extension's
    accuracy."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from hybridjax.train import CONFIG_DIR, run_from_config

    hydra = HydraConfig.get()
    short = os.path.join(hydra.runtime.output_dir, "short")
    done = run_from_config(cfg, short)["step"]
    if done < cfg.trainer.steps:  # stopped early (a signal, stop_at): extend the whole run only
        raise RuntimeError(
            f"{short} stopped at step {done} of {cfg.trainer.steps}; run the "
            f"experiment again in its sweep directory to continue"
        )

    def continue_short(extension_name, stage):
        overrides = [f"+experiment/extension={extension_name}", f"trainer.init_from={short}"]
        composed = compose(config_name="config", overrides=[*hydra.overrides.task, *overrides])
        return run_from_config(composed, os.path.join(hydra.runtime.output_dir, stage))

    summary = continue_short(cfg.name, "extend")
    control = f"{cfg.name}_control"
    if os.path.exists(os.path.join(CONFIG_DIR, "experiment", "extension", f"{control}.yaml")):
        continue_short(control, "control")
    return summary.get("eval/accuracy")


def main_run(overrides: Sequence[str]) -> None:
    """`run_job` as a Hydra app over configs/, +experiment=long_context unless one is given."""
    import hydra

    from hybridjax.train import CONFIG_DIR
    from hybridjax.train_config import register_configs

    if not any(o.startswith("+experiment=") for o in overrides):
        overrides = ["+experiment=long_context", *overrides]
    sys.argv = [sys.argv[0], *overrides]
    register_configs()
    hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")(run_job)()


# --- reading the runs ------------------------------------------------------------------------
def load_grid(roots: Sequence[str]) -> list[dict]:
    """One row per finished run and NIAH grid cell: run_dir, pattern, seed, stage, length,
    depth, accuracy, and the run's training lengths (train_lens)."""
    rows = []
    for run_dir in find_run_dirs(roots):
        stage = os.path.basename(run_dir)
        if stage not in STAGES:
            continue
        run = load_run(run_dir)
        config = run["config"]
        schedule = config.get("trainer.seq_len_schedule") or ()
        train_lens = sorted({p["seq_len"] for p in schedule} or {config["trainer.seq_len"]})
        for key, accuracy in run.items():
            match = (
                BUCKET.fullmatch(key[len(BUCKET_PREFIX) :])
                if key.startswith(BUCKET_PREFIX)
                else None
            )
            if match and accuracy is not None:
                rows.append(
                    {
                        "run_dir": run_dir,
                        "pattern": config["model.pattern"],
                        "seed": run["seed"],
                        "stage": stage,
                        "train_lens": "+".join(map(str, train_lens)),
                        "length": int(match[1]),
                        "depth": float(match[2]),
                        "accuracy": accuracy,
                    }
                )
    return rows


def mean_grid(rows: Sequence[dict], pattern: str, stage: str):
    """(lengths, depths, {(length, depth): mean accuracy over seeds}) of one model and stage."""
    cells = {}
    for r in rows:
        if r["pattern"] == pattern and r["stage"] == stage:
            cells.setdefault((r["length"], r["depth"]), []).append(r["accuracy"])
    means = {k: statistics.fmean(v) for k, v in cells.items()}
    return sorted({k[0] for k in means}), sorted({k[1] for k in means}), means


# --- writing -----------------------------------------------------------------------------------
def plot_model(path: str, rows: Sequence[dict], pattern: str) -> None:
    """Heatmaps of one model: depth (rows) x context length (columns), one per stage."""
    plt = _pyplot()
    stages = [s for s in STAGES if any(r["pattern"] == pattern and r["stage"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(stages), figsize=(5.2 * len(stages), 4.4), squeeze=False)
    for i, (ax, stage) in enumerate(zip(axes[0], stages)):
        lengths, depths, means = mean_grid(rows, pattern, stage)
        grid = [[means.get((n, d), float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper")
        for row, line in enumerate(grid):
            for col, value in enumerate(line):
                ax.text(
                    col,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value < 0.6 else "black",
                )
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("context length")
        if i == 0:
            ax.set_ylabel("needle depth (0: first token, 1: just before the query)")
        trained = next(
            r["train_lens"] for r in rows if r["pattern"] == pattern and r["stage"] == stage
        )
        ax.set_title(f"{pattern}: {TITLES[stage]} (trained at {trained})", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="NIAH accuracy (mean over seeds)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def markdown_table(rows: Sequence[dict]) -> str:
    """Accuracy per context length (mean over depths, then seeds), per model and stage."""
    lengths = sorted({r["length"] for r in rows})
    head = ["model", "stage", "trained at", *map(str, lengths), "all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pattern in dict.fromkeys(r["pattern"] for r in rows):
        for stage in STAGES:
            cells = [r for r in rows if r["pattern"] == pattern and r["stage"] == stage]
            if not cells:
                continue
            by_length = [[r["accuracy"] for r in cells if r["length"] == n] for n in lengths]
            shown = [f"{statistics.fmean(v):.3f}" if v else "–" for v in by_length]
            total = statistics.fmean(r["accuracy"] for r in cells)
            lines.append(
                "| "
                + " | ".join(
                    [
                        pattern.replace("*", "\\*"),
                        STAGE_NAMES[stage],
                        cells[0]["train_lens"],
                        *shown,
                        f"{total:.3f}",
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def report(roots: Sequence[str], out_dir: str) -> dict:
    """Read the runs under `roots`, write grid.csv, the heatmaps and report.md into `out_dir`;
    returns {"rows", "files"}."""
    rows = load_grid(roots)
    if not rows:
        raise FileNotFoundError(
            f"no finished short/ or extend/ runs with NIAH grid accuracies under {list(roots)}"
        )
    os.makedirs(out_dir, exist_ok=True)
    files = {"grid.csv": os.path.join(out_dir, "grid.csv")}
    columns = ["pattern", "seed", "stage", "train_lens", "length", "depth", "accuracy", "run_dir"]
    with open(files["grid.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    figures = []
    for pattern in dict.fromkeys(r["pattern"] for r in rows):
        name = f"niah_{pattern.replace('*', 'x')}.png"
        files[name] = os.path.join(out_dir, name)
        plot_model(files[name], rows, pattern)
        figures += [f"![{pattern}]({name})", ""]
    seeds = sorted({r["seed"] for r in rows})
    text = [
        "# Long-context extension: NIAH recall before and after",
        "",
        (
            f"Runs under {', '.join(roots)}; seeds {', '.join(map(str, seeds))}. Held-out "
            f"needle-in-a-haystack answer accuracy per context length (mean over needle "
            f"depths, then over seeds), at the end of the short run (before), of its "
            f"extension (after) and of the control (as many steps from the short run at the "
            f"short length only, where the experiment has one); 'trained at' lists the "
            f"training lengths."
        ),
        "",
        markdown_table(rows),
        "",
        *figures,
    ]
    files["report.md"] = os.path.join(out_dir, "report.md")
    with open(files["report.md"], "w") as f:
        f.write("\n".join(text))
    return {"rows": rows, "files": files}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        main_run(argv[1:])
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m experiments.long_context",
        description="Report of the long-context experiment (`run` first runs it).",
    )
    parser.add_argument("roots", nargs="+", help="multirun directory (or job directories)")
    parser.add_argument("--out", help="output directory (default: <first root>/report)")
    args = parser.parse_args(argv)
    try:
        result = report(args.roots, args.out or os.path.join(args.roots[0], "report"))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
