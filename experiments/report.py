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
The layer pattern also yields `attn_fraction` (attention layers / sequence-mixing layers).

Writes in --out (default: <first root>/report):
  runs.csv               one row per run (unfinished runs included, status column)
  summary.csv            one row per group: <metric>_mean, <metric>_std, n_seeds
  report.md              the group table in markdown, with the figures linked
  accuracy.png           held-out accuracy per difficulty bucket: against the attention fraction
                         when it varies, else per group
  throughput_memory.png  tokens/s, memory and parameter count, on the same x axis
  learning_curves.png    held-out accuracy against training step, one line per group
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence

import yaml

SEED_KEY = "trainer.seed"
# Never settings: bookkeeping that may differ between runs without changing what is measured.
IGNORED_PREFIXES = ("hydra.", "logger.")
IGNORED_KEYS = {SEED_KEY, "trainer.resume", "trainer.progress", "trainer.log_every",
                "trainer.checkpoint_every", "trainer.keep_checkpoints",
                "trainer.async_checkpoint"}
# Model keys that mean something only when the pattern holds their layer letter; elsewhere they are
# leftover defaults (a dense run's n_experts), shown as "–" and left out of labels.
LAYER_KEYS = {
    "M": ("mamba_heads", "mamba_head_dim", "ssm_state", "n_groups", "conv_kernel", "chunk_size",
          "time_step_min", "time_step_max", "time_step_floor", "clamp_dt", "ssd_impl"),
    "*": ("attn_heads", "kv_heads", "head_dim", "rope_theta", "rope_scaling", "rope_factor",
          "rope_original_max_len", "attn_impl"),
    "E": ("n_experts", "top_k", "moe_ffn", "shared_ffn", "router", "router_groups",
          "router_topk_groups", "norm_topk_prob", "routed_scaling_factor", "expert_act",
          "moe_latent", "moe_dispatch", "capacity_factor", "grouped_matmul"),
    "-": ("ffn", "mlp_act"),
}
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
    ("peak_memory_bytes", ("peak device memory (on CPU: the process's peak RSS — in a one-process "
                           "Hydra multirun this only grows from run to run)")),
)


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
    with open(os.path.join(run_dir, "config.yaml")) as f:
        config = yaml.safe_load(f) or {}
    row = {"run_dir": run_dir, "config": flatten(config)}
    summary_path = os.path.join(run_dir, "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    row["status"] = "done" if summary else "unfinished"
    row["seed"] = row["config"].get(SEED_KEY)
    row["step"] = summary.get("step", records[-1]["step"] if records else 0)

    pattern = row["config"].get("model.pattern")
    row.update(pattern_stats(pattern) if isinstance(pattern, str) else {})
    row["params_total"] = summary.get("params_total")
    row["params_active"] = summary.get("params_active")
    for key, value in summary.items():
        if key == ACC or key.startswith(BUCKET_PREFIX) or key == "eval/loss":
            row[key] = value
    speeds = [r["tokens_per_sec"] for r in records if _number(r.get("tokens_per_sec"))]
    row["tokens_per_sec"] = (statistics.median(speeds) if speeds
                             else summary.get("tokens_per_sec"))
    row["memory_mb"], row["memory_kind"] = None, None
    for key, kind in MEMORY_KEYS:
        if _number(summary.get(key)):
            row["memory_mb"], row["memory_kind"] = summary[key] / 2**20, key
            break
    row["wall_s"] = None
    if summary:  # config.yaml is written before training starts, summary.json after it ends
        row["wall_s"] = (os.path.getmtime(summary_path)
                         - os.path.getmtime(os.path.join(run_dir, "config.yaml")))
    row["curve"] = [(r["step"], r[ACC]) for r in records if _number(r.get(ACC))]
    return row


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a killed run
                    continue
    return records


def pattern_stats(pattern: str) -> dict:
    """Layer counts of a pattern; attn_fraction = attention / (attention + Mamba) layers."""
    n_attn, n_mamba = pattern.count("*"), pattern.count("M")
    mixers = n_attn + n_mamba
    return {"n_layers": len(pattern), "n_mixers": mixers, "n_attn": n_attn,
            "attn_fraction": n_attn / mixers if mixers else None}


def flatten(tree, prefix: str = "") -> dict:
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = tuple(tree) if isinstance(tree, list) else tree
    return out


# --- settings and groups ----------------------------------------------------------------------
def settings_of(runs: Sequence[dict]) -> list[str]:
    """Config keys whose value differs between runs (seed and bookkeeping excluded), minus keys
    that equal an earlier setting in every run; the pattern first, then model and data keys."""
    keys = sorted({k for r in runs for k in r["config"]},
                  key=lambda k: (k != "model.pattern", not k.startswith("model."),
                                 not k.startswith("data."), k))
    kept = []
    for key in keys:
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        values = [r["config"].get(key) for r in runs]
        if len(set(map(_hashable, values))) < 2:
            continue
        if any(values == [r["config"].get(k) for r in runs] for k in kept):
            continue
        kept.append(key)
    return kept


def group_runs(runs: Sequence[dict], settings: Sequence[str]) -> list[dict]:
    """Finished runs grouped by their settings; each group: settings values, runs, label."""
    groups = {}
    done = [r for r in runs if r["status"] == "done"]
    for run in done:
        key = tuple(_hashable(run["config"].get(k)) for k in settings)
        groups.setdefault(key, []).append(run)
    show_fraction = len({r.get("attn_fraction") for r in done}) > 1
    out = []
    for key, members in groups.items():
        values = dict(zip(settings, key))
        out.append({"settings": values, "runs": members,
                    "label": label(values, members[0], show_fraction)})
    out.sort(key=lambda g: _sort_key(g))
    return out


def label(values: dict, run: dict, show_fraction: bool = False) -> str:
    if not values:
        return "all runs"
    pattern = run["config"].get("model.pattern")
    parts = []
    for key, value in values.items():
        if not applies(key, pattern):
            continue
        if key == "model.pattern":
            fraction = run.get("attn_fraction")
            shown = f" (attn {fraction:.3g})" if show_fraction and fraction is not None else ""
            parts.append(f"{value}{shown}")
        else:
            parts.append(f"{short(key)}={_show(value)}")
    return ", ".join(parts)


def applies(key: str, pattern) -> bool:
    """Whether a setting means anything for a model of `pattern` (see LAYER_KEYS)."""
    if isinstance(pattern, str) and key.startswith("model."):
        for letter, names in LAYER_KEYS.items():
            if key[len("model."):] in names:
                return letter in pattern
    return True


def short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def bucket_columns(runs: Sequence[dict]) -> list[str]:
    """The per-bucket accuracy columns present in any run, in first-seen order."""
    seen = []
    for run in runs:
        for key in run:
            if key.startswith(BUCKET_PREFIX) and key not in seen:
                seen.append(key)
    return seen


def aggregate(groups: Sequence[dict], metrics: Sequence[str]) -> list[dict]:
    """Per group: its settings, attn_fraction, and <metric>_mean / <metric>_std over seeds."""
    rows = []
    for g in groups:
        first = g["runs"][0]
        row = {**g["settings"], "label": g["label"], "n_seeds": len(g["runs"]),
               "pattern": first["config"].get("model.pattern"),
               "seeds": " ".join(str(r["seed"]) for r in g["runs"]),
               "attn_fraction": first.get("attn_fraction"), "n_mixers": first.get("n_mixers"),
               "steps": first.get("step")}
        for m in metrics:
            values = [r[m] for r in g["runs"] if _number(r.get(m))]
            row[f"{m}_mean"] = statistics.fmean(values) if values else None
            row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else (
                0.0 if values else None)
        rows.append(row)
    return rows


# --- writing --------------------------------------------------------------------------------------
def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])


def markdown_table(summary: Sequence[dict], settings: Sequence[str], buckets: Sequence[str]
                   ) -> str:
    varies = len({r["attn_fraction"] for r in summary}) > 1
    head = [short(k) for k in settings]
    if varies:
        head.append("attn frac")
    head += [b[len(BUCKET_PREFIX):] for b in buckets]
    metric_cols = [(m, h, fmt) for m, h, fmt in METRICS]
    head += [h for _, h, _ in metric_cols] + ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary:
        cells = [_show(row[k]) if applies(k, row["pattern"]) else "–" for k in settings]
        if varies:
            cells.append(f"{row['attn_fraction']:.3g}" if row["attn_fraction"] is not None
                         else "")
        cells += [_mean_std(row, b, "{:.3f}") for b in buckets]
        cells += [_mean_std(row, m, fmt) for m, _, fmt in metric_cols]
        cells.append(str(row["n_seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(row: dict, metric: str, fmt: str) -> str:
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if mean is None:
        return "–"
    if row["n_seeds"] > 1 and std:
        return f"{fmt.format(mean)} ± {fmt.format(std)}"
    return fmt.format(mean)


# --- plots ----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def x_axis(summary: Sequence[dict], settings: Sequence[str]):
    """(kind, series): kind "fraction" when the attention fraction varies (series: labels of the
    other settings per row), else "group" (one bar per row)."""
    fractions = {r["attn_fraction"] for r in summary}
    if len(fractions) > 1 and None not in fractions:
        others = [k for k in settings if k != "model.pattern"]
        series = [", ".join(f"{short(k)}={_show(r[k])}" for k in others
                            if applies(k, r["pattern"])) for r in summary]
        return "fraction", series
    return "group", None


def plot_accuracy(path: str, summary, settings, buckets) -> None:
    plt = _pyplot()
    kind, series = x_axis(summary, settings)
    columns = list(buckets) or [ACC]
    if kind == "fraction":
        names = list(dict.fromkeys(series))
        fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
        for ax, name in zip(axes[0], names):
            rows = sorted((r for r, s in zip(summary, series) if s == name),
                          key=lambda r: r["attn_fraction"])
            xs = [r["attn_fraction"] for r in rows]
            for col in columns:
                _errorline(ax, xs, rows, col, _bucket_name(col))
            if buckets:
                _errorline(ax, xs, rows, ACC, "all buckets", style="k--")
            ax.set_xlabel("attention fraction of the sequence-mixing layers")
            ax.set_ylabel("held-out recall accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xticks(sorted(set(xs)))
            ax.set_xticklabels([f"{x:.3g}" for x in sorted(set(xs))])
            ax.set_title(name or "accuracy vs attention fraction")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(summary) * max(len(columns), 1) / 2),
                                        4.5))
        width = 0.8 / len(columns)
        for i, col in enumerate(columns):
            xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(summary))]
            means = [r.get(f"{col}_mean") or 0.0 for r in summary]
            stds = [r.get(f"{col}_std") or 0.0 for r in summary]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=_bucket_name(col))
        _group_ticks(ax, summary)
        ax.set_ylabel("held-out recall accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(path: str, summary, settings) -> None:
    plt = _pyplot()
    kind, series = x_axis(summary, settings)
    panels = [("tokens_per_sec", "training tokens/s"), ("memory_mb", "memory (MB)"),
              ("params_total", "parameters")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (col, name) in zip(axes[0], panels):
        if kind == "fraction":
            for s in dict.fromkeys(series):
                rows = sorted((r for r, t in zip(summary, series) if t == s),
                              key=lambda r: r["attn_fraction"])
                _errorline(ax, [r["attn_fraction"] for r in rows], rows, col, s or None)
            ax.set_xlabel("attention fraction of the sequence-mixing layers")
            if any(series):
                ax.legend(fontsize=8)
        else:
            means = [r.get(f"{col}_mean") or 0.0 for r in summary]
            stds = [r.get(f"{col}_std") or 0.0 for r in summary]
            ax.bar(range(len(summary)), means, yerr=stds, capsize=2)
            _group_ticks(ax, summary)
        ax.set_ylabel(name)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(path: str, groups) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        by_step = {}
        for run in g["runs"]:
            for step, acc in run["curve"]:
                by_step.setdefault(step, []).append(acc)
        if by_step:
            steps = sorted(by_step)
            ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], marker=".",
                    label=g["label"])
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out recall accuracy (mean over seeds)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _errorline(ax, xs, rows, col, name, style="o-"):
    means = [r.get(f"{col}_mean") for r in rows]
    if all(m is None for m in means):
        return
    stds = [r.get(f"{col}_std") or 0.0 for r in rows]
    means = [math.nan if m is None else m for m in means]
    ax.errorbar(xs, means, yerr=stds, fmt=style, capsize=3, label=name)


def _group_ticks(ax, summary):
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels([r["label"] for r in summary], rotation=30, ha="right", fontsize=8)


def _bucket_name(col: str) -> str:
    return col[len(BUCKET_PREFIX):] if col.startswith(BUCKET_PREFIX) else "accuracy"


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
        raise RuntimeError(f"none of the {len(runs)} runs under {list(roots)} finished "
                           f"(no summary.json)")
    settings = settings_of(done)
    buckets = bucket_columns(done)
    groups = group_runs(runs, settings)
    metric_names = [m for m, _, _ in METRICS] + buckets
    summary = aggregate(groups, metric_names)
    os.makedirs(out_dir, exist_ok=True)
    files = {}

    run_cols = ["run_dir", "status", "seed", *settings, "pattern", "n_mixers", "n_attn",
                "attn_fraction", "step", *[m for m, _, _ in METRICS], *buckets, "memory_kind"]
    run_rows = [{**r, **{k: r["config"].get(k) for k in settings},
                 "pattern": r["config"].get("model.pattern")} for r in runs]
    files["runs.csv"] = os.path.join(out_dir, "runs.csv")
    write_csv(files["runs.csv"], run_rows, run_cols)

    summary_cols = [*settings, "attn_fraction", "n_mixers", "steps", "n_seeds", "seeds",
                    *[f"{m}_{s}" for m in metric_names for s in ("mean", "std")]]
    files["summary.csv"] = os.path.join(out_dir, "summary.csv")
    write_csv(files["summary.csv"], summary, summary_cols)

    files["accuracy.png"] = os.path.join(out_dir, "accuracy.png")
    plot_accuracy(files["accuracy.png"], summary, settings, buckets)
    files["throughput_memory.png"] = os.path.join(out_dir, "throughput_memory.png")
    plot_cost(files["throughput_memory.png"], summary, settings)
    files["learning_curves.png"] = os.path.join(out_dir, "learning_curves.png")
    plot_curves(files["learning_curves.png"], groups)

    files["report.md"] = os.path.join(out_dir, "report.md")
    with open(files["report.md"], "w") as f:
        f.write(markdown_report(title, roots, runs, settings, buckets, summary))
    return {"runs": runs, "settings": settings, "summary": summary, "files": files}


def markdown_report(title, roots, runs, settings, buckets, summary) -> str:
    done = [r for r in runs if r["status"] == "done"]
    lines = [f"# {title or 'Sweep report'}", "",
             (f"{len(done)} finished runs of {len(runs)} under {', '.join(roots)}; "
              f"{len(summary)} groups. Settings that differ: "
              f"{', '.join(f'`{k}`' for k in settings) or 'none'}. Cells are the mean ± "
              f"standard deviation over seeds; accuracy is held-out answer accuracy at the last "
              f"step (per difficulty bucket, then over all buckets); tokens/s is the median over "
              f"the run's logged steps."), "",
             markdown_table(summary, settings, buckets), ""]
    kinds = {r["memory_kind"] for r in done if r["memory_kind"]}
    for key, what in MEMORY_KEYS:
        if key in kinds:
            lines.append(f"Memory: `{key}`, {what}.")
    unfinished = [r["run_dir"] for r in runs if r["status"] != "done"]
    if unfinished:
        lines.append(f"Unfinished runs (no summary.json), left out: {', '.join(unfinished)}.")
    lines += ["", "![accuracy](accuracy.png)", "",
              "![throughput and memory](throughput_memory.png)", "",
              "![learning curves](learning_curves.png)", ""]
    return "\n".join(lines)


# --- small helpers ----------------------------------------------------------------------------
def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


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


def _sort_key(group: dict):
    run = group["runs"][0]
    frac = run.get("attn_fraction")
    return ((frac if frac is not None else -1.0),
            tuple(_natural_key(_show(v)) for v in group["settings"].values()))


def _natural_key(text: str):
    """'run10' after 'run9'; numbers compare as numbers."""
    import re

    return [(0, float(p), "") if re.fullmatch(r"-?\d+(\.\d+)?", p) else (1, 0.0, p)
            for p in re.split(r"(-?\d+(?:\.\d+)?)", str(text)) if p]


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
                    "report.md and PNG plots.")
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


if __name__ == "__main__":
    sys.exit(main())
