"""Training run directories -> a CSV, a markdown table and PNG plots.

    python -m experiments.report multirun/2026-11-22/16-00-00 --out reports/ratio_sweep

A run directory is what `python -m hybridjax.train` writes: `config.yaml` (the resolved config),
`summary.json` (final metrics, parameter counts, memory) and `metrics.jsonl` (one JSON object per
logged step). Every directory under the given roots that holds a `config.yaml` is a run; a run
without `summary.json` is listed as unfinished and left out of the tables and plots.

What the runs differ in is read from their configs, not from the sweep: every config key whose
value is not the same in all runs is a *setting* (a column of the table), except the seed and
keys that only echo another setting (`data.vocab_size: ${model.vocab_size}`). Runs equal in
every setting form a *group*; the tables give each metric's mean and spread over its seeds.
The layer pattern also yields `attn_fraction` (attention layers / sequence-mixing layers, Mamba-2
`M` and Mamba-3 `3` both count as mixers).

Writes in --out (default: <first root>/report):
  runs.csv               one row per run (unfinished runs included, status column)
  summary.csv            one row per group: <metric>_mean, <metric>_std, n_seeds
  report.md              the group table in markdown, with the figures linked
  accuracy.png           held-out accuracy per difficulty bucket: against the attention fraction
                         when it varies, else per group
  throughput_memory.png  tokens/s, memory and parameter count, on the same x axis
  learning_curves.png    held-out accuracy against training step, one line per group
  accuracy_vs_length.png only when buckets are lengths alone (`len=N`, the state-tracking
                         tasks): held-out accuracy against the test length, a line per group,
                         a panel per task (`data.task`)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import yaml

SEED_KEY = "trainer.seed"
# Never settings: bookkeeping that may differ between runs without changing what is measured.
IGNORED_PREFIXES = ("hydra.", "logger.")
IGNORED_KEYS = {
    SEED_KEY,
    "trainer.resume",
    "trainer.progress",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.async_checkpoint",
}
# Model keys that mean something only when the pattern holds one of their layer letters; elsewhere
# they are leftover defaults (a dense run's n_experts), shown as "–" and left out of labels.
MAMBA_KEYS = (  # the sizes Mamba-2 and Mamba-3 share
    "mamba_heads",
    "mamba_head_dim",
    "ssm_state",
    "n_groups",
    "chunk_size",
    "time_step_min",
    "time_step_max",
    "time_step_floor",
)
LAYER_KEYS = {
    "M3": MAMBA_KEYS,
    "M": ("conv_kernel", "clamp_dt", "ssd_impl"),
    "3": (
        "mamba3_mimo",
        "mamba3_mimo_rank",
        "mamba3_rope_fraction",
        "mamba3_a_floor",
        "mamba3_a_act",
        "mamba3_impl",
    ),
    "*": (
        "attn_heads",
        "kv_heads",
        "head_dim",
        "rope_theta",
        "rope_scaling",
        "rope_factor",
        "rope_original_max_len",
        "attn_impl",
    ),
    "E": (
        "n_experts",
        "top_k",
        "moe_ffn",
        "shared_ffn",
        "router",
        "router_groups",
        "router_topk_groups",
        "norm_topk_prob",
        "routed_scaling_factor",
        "expert_act",
        "moe_latent",
        "moe_dispatch",
        "capacity_factor",
        "grouped_matmul",
    ),
    "-": ("ffn", "mlp_act"),
}
LAYER_OF = {f"model.{name}": letters for letters, names in LAYER_KEYS.items() for name in names}
MIXERS = "M3"  # the sequence-mixing layers besides attention
ACC = "eval/accuracy"
BUCKET_PREFIX = ACC + "/"
# Per-run metrics, in table order: (column, header in report.md, format).
METRICS = (
    ("params_total", "params", "{:,.0f}"),
    ("params_active", "active", "{:,.0f}"),
    (ACC, "accuracy", "{:.3f}"),
    ("eval/loss", "eval loss", "{:.3f}"),
    ("tokens_per_sec", "tokens/s", "{:,.0f}"),
    ("memory_mb", "memory MB", "{:,.1f}"),
    ("wall_s", "wall s", "{:.0f}"),
)
MEMORY_KEYS = (  # summary.json keys, best first: (key, what it measures)
    ("step_memory_bytes", "compiled train step (XLA buffers: arguments + outputs + temporaries)"),
    (
        "peak_memory_bytes",
        (
            "peak device memory (on CPU: the process's peak RSS — in a one-process "
            "Hydra multirun this only grows from run to run)"
        ),
    ),
)
FRACTION_AXIS = "attention fraction of the sequence-mixing layers"
LENGTH_BUCKET = re.compile(r"len=(\d+)")  # a bucket that is a test length alone


# --- reading run directories ---------------------------------------------------------------------
def find_run_dirs(roots: Iterable[str]) -> list[str]:
    """Directories under `roots` (or the roots themselves) that hold a config.yaml, sorted."""
    found = set()
    for root in roots:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"run directory root {root!r} does not exist")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in ("checkpoints", "wandb", ".hydra")]
            if "config.yaml" in filenames:
                found.add(os.path.normpath(dirpath))
    return sorted(found, key=_natural_key)


def load_run(run_dir: str) -> dict:
    """One run directory -> a flat row: config keys (dotted), metrics and derived fields."""
    config_path = os.path.join(run_dir, "config.yaml")
    summary_path = os.path.join(run_dir, "summary.json")
    with open(config_path) as f:
        config = flatten(yaml.safe_load(f) or {})
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    pattern = config.get("model.pattern")
    speeds = [r["tokens_per_sec"] for r in records if _number(r.get("tokens_per_sec"))]
    memory_key = next((k for k, _ in MEMORY_KEYS if _number(summary.get(k))), None)
    return {
        "run_dir": run_dir,
        "config": config,
        "status": "done" if summary else "unfinished",
        "seed": config.get(SEED_KEY),
        "step": summary.get("step", records[-1]["step"] if records else 0),
        **(pattern_stats(pattern) if isinstance(pattern, str) else {}),
        "params_total": summary.get("params_total"),
        "params_active": summary.get("params_active"),
        **{
            k: v
            for k, v in summary.items()
            if k in (ACC, "eval/loss") or k.startswith(BUCKET_PREFIX)
        },
        "tokens_per_sec": statistics.median(speeds) if speeds else summary.get("tokens_per_sec"),
        "memory_mb": summary[memory_key] / 2**20 if memory_key else None,
        "memory_kind": memory_key,
        # config.yaml is written before training starts, summary.json after it ends
        "wall_s": os.path.getmtime(summary_path) - os.path.getmtime(config_path)
        if summary
        else None,
        "curve": [(r["step"], r[ACC]) for r in records if _number(r.get(ACC))],
    }


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in filter(None, map(str.strip, f)):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
    return records


def pattern_stats(pattern: str) -> dict:
    """Layer counts of a pattern; attn_fraction = attention / (attention + Mamba-2 and Mamba-3)
    layers."""
    n_attn, n_mamba = pattern.count("*"), sum(pattern.count(letter) for letter in MIXERS)
    mixers = n_attn + n_mamba
    return {
        "n_layers": len(pattern),
        "n_mixers": mixers,
        "n_attn": n_attn,
        "attn_fraction": n_attn / mixers if mixers else None,
    }


def flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tuple(tree) if isinstance(tree, list) else tree}
    return {
        k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()
    }


# --- settings and groups ----------------------------------------------------------------------
def settings_of(runs: Sequence[dict]) -> list[str]:
    """Config keys whose value differs between runs (seed and bookkeeping excluded), minus keys
    that equal an earlier setting in every run; the pattern first, then model and data keys."""
    keys = sorted(
        {k for r in runs for k in r["config"]},
        key=lambda k: (
            k != "model.pattern",
            not k.startswith("model."),
            not k.startswith("data."),
            k,
        ),
    )
    keys = [k for k in keys if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)]
    # Every key of every run (None where missing: pandas would fill NaN, which differs from None).
    configs = pd.DataFrame([{k: r["config"].get(k) for k in keys} for r in runs], dtype=object)
    kept = []
    for key in keys:
        column = configs[key]
        if column.nunique(dropna=False) > 1 and not any(column.equals(configs[k]) for k in kept):
            kept.append(key)
    return kept


def run_table(
    runs: Sequence[dict], settings: Sequence[str], metrics: Sequence[str]
) -> pd.DataFrame:
    """One row per run, in runs.csv's column order, plus its learning curve."""
    columns = [
        "run_dir",
        "status",
        "seed",
        *settings,
        "pattern",
        "n_mixers",
        "n_attn",
        "attn_fraction",
        "step",
        *metrics,
        "memory_kind",
        "curve",
    ]
    rows = [
        {
            **run,
            **{k: run["config"].get(k) for k in settings},
            "pattern": run["config"].get("model.pattern"),
        }
        for run in runs
    ]
    # object columns keep ints ints and None None (runs.csv writes them as they are)
    return pd.DataFrame([{c: row.get(c) for c in columns} for row in rows], dtype=object)


def summarize(
    finished: pd.DataFrame, settings: Sequence[str], metrics: Sequence[str]
) -> pd.DataFrame:
    """One row per group (finished runs equal in every setting): its settings, label, pattern,
    seeds, mean learning curve and <metric>_mean / <metric>_std over its seeds; ordered by
    attention fraction, then by setting values. Missing values are None."""
    # Group ids in first-seen order; with no settings all runs form one group.
    group = finished.groupby(list(settings) or (lambda _: 0), sort=False, dropna=False).ngroup()
    by_group = finished.groupby(group)
    values = finished[metrics].apply(pd.to_numeric).replace([math.inf, -math.inf], math.nan)
    stats = values.groupby(group)
    std = stats.std().mask(stats.count() == 1, 0.0)  # one seed has no spread (pandas: NaN)
    summary = pd.concat(
        [
            by_group[[*settings, "pattern", "attn_fraction", "n_mixers", "step"]]
            .first(skipna=False)
            .rename(columns={"step": "steps"}),
            by_group.size().rename("n_seeds"),
            by_group["seed"].agg(lambda seeds: " ".join(map(str, seeds))).rename("seeds"),
            by_group["curve"].agg(_mean_curve),
            stats.mean().add_suffix("_mean"),
            std.add_suffix("_std"),
        ],
        axis=1,
    )
    summary = summary.astype(object).where(summary.notna(), None)  # as load_run's rows have it
    show_fraction = summary["attn_fraction"].nunique(dropna=False) > 1
    summary["label"] = [label(row, settings, show_fraction) for _, row in summary.iterrows()]
    return summary.iloc[
        sorted(range(len(summary)), key=lambda i: _sort_key(summary.iloc[i], settings))
    ]


def _mean_curve(curves: pd.Series) -> list[tuple]:
    """(step, accuracy) points of a group's runs -> (step, mean over the runs), by step."""
    points = pd.DataFrame([p for curve in curves for p in curve], columns=["step", "acc"])
    return list(points.groupby("step")["acc"].mean().items())


def label(row: pd.Series, settings: Sequence[str], show_fraction: bool = False) -> str:
    """A group's settings as text: its pattern (with the attention fraction when that varies)
    and key=value for each other setting that the pattern uses."""
    if not settings:
        return "all runs"
    parts = _other_settings(row, settings)
    if "model.pattern" in settings:  # the first setting when it is one
        fraction = row["attn_fraction"]
        shown = f" (attn {fraction:.3g})" if show_fraction and fraction is not None else ""
        parts.insert(0, f"{row['pattern']}{shown}")
    return ", ".join(parts)


def _other_settings(row: pd.Series, settings: Sequence[str]) -> list[str]:
    return [
        f"{short(k)}={_show(row[k])}"
        for k in settings
        if k != "model.pattern" and applies(k, row["pattern"])
    ]


def applies(key: str, pattern) -> bool:
    """Whether a setting means anything for a model of `pattern` (see LAYER_KEYS)."""
    letters = LAYER_OF.get(key)
    return not isinstance(pattern, str) or letters is None or any(c in pattern for c in letters)


def short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


# --- writing --------------------------------------------------------------------------------------
def write_csv(path: str, table: pd.DataFrame, columns: Sequence[str]) -> None:
    # csv.writer's line ends, as the files have always had
    table[list(columns)].map(_cell).to_csv(path, index=False, lineterminator="\r\n")


def markdown_table(summary: pd.DataFrame, settings: Sequence[str], buckets: Sequence[str]) -> str:
    # (header, cells) pairs, not DataFrame columns: two settings may share a short name.
    columns = [
        (
            short(k),
            [_show(v) if applies(k, p) else "–" for v, p in zip(summary[k], summary["pattern"])],
        )
        for k in settings
    ]
    if summary["attn_fraction"].nunique(dropna=False) > 1:
        columns.append(
            ("attn frac", ["" if f is None else f"{f:.3g}" for f in summary["attn_fraction"]])
        )
    for metric, header, fmt in [
        *((b, b[len(BUCKET_PREFIX) :], "{:.3f}") for b in buckets),
        *METRICS,
    ]:
        columns.append(
            (
                header,
                [
                    _mean_std(mean, std, n, fmt)
                    for mean, std, n in zip(
                        summary[f"{metric}_mean"], summary[f"{metric}_std"], summary["n_seeds"]
                    )
                ],
            )
        )
    columns.append(("seeds", [str(n) for n in summary["n_seeds"]]))
    headers, cells = zip(*columns)
    rows = ["| " + " | ".join(row) + " |" for row in zip(*cells)]
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers), *rows])


def _mean_std(mean, std, n_seeds: int, fmt: str) -> str:
    if mean is None:
        return "–"
    if n_seeds > 1 and std:
        return f"{fmt.format(mean)} ± {fmt.format(std)}"
    return fmt.format(mean)


def markdown_report(title, roots, table, settings, buckets, summary) -> str:
    done = table[table["status"] == "done"]
    lines = [
        f"# {title or 'Sweep report'}",
        "",
        (
            f"{len(done)} finished runs of {len(table)} under {', '.join(roots)}; "
            f"{len(summary)} groups. Settings that differ: "
            f"{', '.join(f'`{k}`' for k in settings) or 'none'}. Cells are the mean ± "
            f"standard deviation over seeds; accuracy is held-out answer accuracy at the last "
            f"step (per difficulty bucket, then over all buckets); tokens/s is the median over "
            f"the run's logged steps."
        ),
        "",
        markdown_table(summary, settings, buckets),
        "",
    ]
    kinds = set(done["memory_kind"].dropna())
    lines += [f"Memory: `{key}`, {what}." for key, what in MEMORY_KEYS if key in kinds]
    unfinished = table.loc[table["status"] != "done", "run_dir"]
    if len(unfinished):
        lines.append(f"Unfinished runs (no summary.json), left out: {', '.join(unfinished)}.")
    lines += [
        "",
        "![accuracy](accuracy.png)",
        "",
        "![throughput and memory](throughput_memory.png)",
        "",
        "![learning curves](learning_curves.png)",
        "",
    ]
    if length_buckets(buckets):
        lines += ["![accuracy vs test length](accuracy_vs_length.png)", ""]
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fraction_lines(summary: pd.DataFrame, settings: Sequence[str]) -> list[tuple] | None:
    """When the attention fraction varies (and is known for every group) it is the plots' x axis,
    with a line per value of the other settings: [(their text, the line's groups by fraction, its
    x values)]; else None (a bar per group). The summary is ordered by fraction already."""
    fractions = summary["attn_fraction"]
    if fractions.nunique(dropna=False) < 2 or fractions.isna().any():
        return None
    names = summary.apply(lambda row: ", ".join(_other_settings(row, settings)), axis=1)
    return [
        (name, rows, rows["attn_fraction"].astype(float).tolist())
        for name, rows in summary.groupby(names, sort=False)
    ]


def _stat(rows: pd.DataFrame, metric: str, stat: str, missing: float = math.nan) -> np.ndarray:
    """The rows' <metric>_<stat> as floats, `missing` where a group has none."""
    return rows[f"{metric}_{stat}"].astype(float).fillna(missing).to_numpy()


def _errorline(ax, xs, rows, metric, name, style="o-"):
    means = _stat(rows, metric, "mean")
    if not np.isnan(means).all():
        ax.errorbar(
            xs, means, yerr=_stat(rows, metric, "std", 0.0), fmt=style, capsize=3, label=name
        )


def _bars(ax, summary, metric, offset=0.0, width=0.8, **kwargs):
    ax.bar(
        np.arange(len(summary)) + offset,
        _stat(summary, metric, "mean", 0.0),
        width,
        yerr=_stat(summary, metric, "std", 0.0),
        capsize=2,
        **kwargs,
    )
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels(summary["label"].tolist(), rotation=30, ha="right", fontsize=8)


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(path: str, summary, settings, buckets) -> None:
    plt = _pyplot()
    lines = fraction_lines(summary, settings)
    columns = list(buckets) or [ACC]
    names = [c[len(BUCKET_PREFIX) :] if c in buckets else "accuracy" for c in columns]
    if lines is None:  # per group, a bar per bucket
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(summary) * len(columns) / 2), 4.5))
        width = 0.8 / len(columns)
        for i, (col, name) in enumerate(zip(columns, names)):
            _bars(ax, summary, col, (i - (len(columns) - 1) / 2) * width, width, label=name)
        ax.set(ylabel="held-out recall accuracy", ylim=(0, 1.02))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    else:  # a panel per line, a line per bucket
        fig, axes = plt.subplots(1, len(lines), figsize=(5.5 * len(lines), 4), squeeze=False)
        for ax, (title, rows, xs) in zip(axes[0], lines):
            for col, name in zip(columns, names):
                _errorline(ax, xs, rows, col, name)
            if buckets:
                _errorline(ax, xs, rows, ACC, "all buckets", style="k--")
            ticks = sorted(set(xs))
            ax.set(
                xlabel=FRACTION_AXIS,
                ylabel="held-out recall accuracy",
                ylim=(-0.02, 1.02),
                xticks=ticks,
                xticklabels=[f"{x:.3g}" for x in ticks],
                title=title or "accuracy vs attention fraction",
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    _save(plt, fig, path)


def length_buckets(buckets: Sequence[str]) -> dict[str, int]:
    """The buckets that are a test length alone (`eval/accuracy/len=N`) -> N."""
    lengths = {b: LENGTH_BUCKET.fullmatch(b[len(BUCKET_PREFIX) :]) for b in buckets}
    return {b: int(m.group(1)) for b, m in lengths.items() if m}


def plot_length(path: str, summary, lengths: dict[str, int]) -> None:
    """Held-out accuracy against the test length (log2 axis): a line per group, a panel per task
    (`data.task` where the runs have one), groups without length buckets left out."""
    plt = _pyplot()
    columns = sorted(lengths, key=lengths.get)
    xs = [lengths[c] for c in columns]
    tasks = summary["data.task"] if "data.task" in summary else pd.Series([None] * len(summary))
    panels = list(dict.fromkeys(tasks.tolist()))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, task in zip(axes[0], panels):
        for i in np.flatnonzero((tasks == task).to_numpy() if task is not None else tasks.isna()):
            row = summary.iloc[i]
            means = np.array(
                [math.nan if row[f"{c}_mean"] is None else row[f"{c}_mean"] for c in columns], float
            )
            if np.isnan(means).all():
                continue
            stds = np.array([row[f"{c}_std"] or 0.0 for c in columns], float)
            ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=3, label=row["label"])
        ax.set_xscale("log", base=2)
        ax.set(
            xlabel="test length (tokens)",
            ylabel="held-out accuracy",
            ylim=(-0.02, 1.02),
            xticks=xs,
            xticklabels=[str(x) for x in xs],
            title=task or "accuracy vs test length",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_cost(path: str, summary, settings) -> None:
    plt = _pyplot()
    lines = fraction_lines(summary, settings)
    panels = [
        ("tokens_per_sec", "training tokens/s"),
        ("memory_mb", "memory (MB)"),
        ("params_total", "parameters"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (metric, name) in zip(axes[0], panels):
        if lines is None:
            _bars(ax, summary, metric)
        else:
            for line, rows, xs in lines:
                _errorline(ax, xs, rows, metric, line or None)
            ax.set_xlabel(FRACTION_AXIS)
            if any(line for line, _, _ in lines):
                ax.legend(fontsize=8)
        ax.set(ylabel=name, ylim=(0, None))
        ax.grid(alpha=0.3)
    _save(plt, fig, path)


def plot_curves(path: str, summary) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve, name in zip(summary["curve"], summary["label"]):
        if curve:
            ax.plot(*zip(*curve), marker=".", label=name)
    ax.set(
        xlabel="training step",
        ylabel="held-out recall accuracy (mean over seeds)",
        ylim=(-0.02, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


# --- the whole report -------------------------------------------------------------------------
def report(roots: Sequence[str], out_dir: str, title: str | None = None) -> dict:
    """Read the runs under `roots`, write the report files into `out_dir`; returns
    {"runs", "settings", "summary", "files"}."""
    run_dirs = find_run_dirs(roots)
    if not run_dirs:
        raise FileNotFoundError(f"no run directories (with a config.yaml) under {list(roots)}")
    runs = [load_run(d) for d in run_dirs]
    done = [r for r in runs if r["status"] == "done"]
    if not done:
        raise RuntimeError(
            f"none of the {len(runs)} runs under {list(roots)} finished (no summary.json)"
        )
    settings = settings_of(done)
    buckets = list(dict.fromkeys(k for r in done for k in r if k.startswith(BUCKET_PREFIX)))
    metrics = [m for m, _, _ in METRICS] + buckets
    table = run_table(runs, settings, metrics)
    summary = summarize(table[table["status"] == "done"], settings, metrics)

    os.makedirs(out_dir, exist_ok=True)
    files = {
        name: os.path.join(out_dir, name)
        for name in (
            "runs.csv",
            "summary.csv",
            "accuracy.png",
            "throughput_memory.png",
            "learning_curves.png",
            "report.md",
        )
    }
    lengths = length_buckets(buckets)
    if lengths:
        files["accuracy_vs_length.png"] = os.path.join(out_dir, "accuracy_vs_length.png")
    write_csv(files["runs.csv"], table, table.columns.drop("curve"))
    write_csv(
        files["summary.csv"],
        summary,
        [
            *settings,
            "attn_fraction",
            "n_mixers",
            "steps",
            "n_seeds",
            "seeds",
            *[f"{m}_{s}" for m in metrics for s in ("mean", "std")],
        ],
    )
    plot_accuracy(files["accuracy.png"], summary, settings, buckets)
    plot_cost(files["throughput_memory.png"], summary, settings)
    plot_curves(files["learning_curves.png"], summary)
    if lengths:
        plot_length(files["accuracy_vs_length.png"], summary, lengths)
    with open(files["report.md"], "w") as f:
        f.write(markdown_report(title, roots, table, settings, buckets, summary))
    return {
        "runs": runs,
        "settings": settings,
        "summary": summary.to_dict("records"),
        "files": files,
    }


def print_report(result: dict) -> None:
    """Print a report's report.md and the files it wrote."""
    with open(result["files"]["report.md"]) as f:
        print(f.read())
    print("wrote " + ", ".join(result["files"].values()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Turn training run directories (a Hydra multirun, or any directories holding "
        "config.yaml + summary.json + metrics.jsonl) into runs.csv, summary.csv, "
        "report.md and PNG plots.",
    )
    parser.add_argument("roots", nargs="+", help="multirun directory (or run directories)")
    parser.add_argument("--out", help="output directory (default: <first root>/report)")
    parser.add_argument("--title", help="heading of report.md")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.roots[0], "report")
    try:
        result = report(args.roots, out, args.title)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_report(result)
    return 0


# --- small helpers ----------------------------------------------------------------------------
def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _show(value) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cell(value):
    if isinstance(value, tuple):
        return _show(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _sort_key(row: pd.Series, settings: Sequence[str]):
    fraction = row["attn_fraction"]
    return (
        -1.0 if fraction is None else fraction,
        tuple(_natural_key(_show(row[k])) for k in settings),
    )


def _natural_key(text: str):
    """'run10' after 'run9'; numbers compare as numbers."""
    return [
        (0, float(p), "") if re.fullmatch(r"-?\d+(\.\d+)?", p) else (1, 0.0, p)
        for p in re.split(r"(-?\d+(?:\.\d+)?)", str(text))
        if p
    ]


if __name__ == "__main__":
    sys.exit(main())
