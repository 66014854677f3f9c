"""The experiment configs (configs/experiment) and experiments/report.py on real training runs."""

import csv
import glob
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from experiments import report
from hybridjax import make_pattern

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG_DIR = os.path.join(ROOT, "configs")
EXPERIMENTS = sorted(
    os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIG_DIR, "experiment", "*.yaml"))
)
# A model and task small enough that a step takes milliseconds; compile dominates each run.
TINY = [
    "model.d_model=32",
    "model.mamba_heads=2",
    "model.mamba_head_dim=16",
    "model.ssm_state=4",
    "model.chunk_size=16",
    "model.attn_heads=2",
    "model.kv_heads=1",
    "model.head_dim=16",
    "trainer.steps=3",
    "trainer.batch_size=4",
    "trainer.seq_len=32",
    "trainer.log_every=1",
    "trainer.eval_every=2",
    "optimizer.warmup_steps=1",
    "data.num_pairs=[2,4]",
    "data.seq_lens=null",
    "data.num_eval_examples=16",
]
BUCKETS = ["pairs=2,len=32", "pairs=4,len=32"]


def compose(overrides, hydra_config=False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hybridjax.train_config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(
            config_name="config", overrides=list(overrides), return_hydra_config=hydra_config
        )


def sweep_jobs(experiment):
    """The override lists of the jobs that `+experiment=<experiment>` launches."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = compose([f"+experiment={experiment}"], hydra_config=True).hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    return [list(job) for job in itertools.product(*axes)]


# --- the experiment configs ----------------------------------------------------------------------
def test_every_experiment_is_a_multirun_over_valid_configs_and_seeds():
    from hybridjax.train_config import resolve

    assert {"ratio_sweep", "ratio_sweep_gpu", "ablation_moe", "ablation_ssm"} <= set(EXPERIMENTS)
    for experiment in EXPERIMENTS:
        cfg = compose([f"+experiment={experiment}"], hydra_config=True)
        assert cfg.hydra.mode.name == "MULTIRUN", experiment
        jobs = sweep_jobs(experiment)
        runs = set()
        for job in jobs:
            run = resolve(compose([*job, f"+experiment={experiment}"]))  # Hydra's order
            runs.add((run.model, run.data, run.trainer.seed))
        assert len(runs) == len(jobs), f"{experiment}: two jobs train the same model"
        assert len({seed for _, _, seed in runs}) >= 2, experiment


@pytest.mark.parametrize("experiment, n_mixers", [("ratio_sweep", 4), ("ratio_sweep_gpu", 8)])
def test_ratio_sweeps_span_attention_fractions_at_equal_depth(experiment, n_mixers):
    from hybridjax.train_config import resolve

    patterns = {j[0].split("=", 1)[1] for j in sweep_jobs(experiment)}
    fractions = [0, 1 / 8, 1 / 4, 1 / 2, 1] if n_mixers == 8 else [0, 1 / 4, 1 / 2, 1]
    assert patterns == {make_pattern(n_mixers, attn_fraction=f) for f in fractions}
    run = resolve(compose([f"+experiment={experiment}"]))
    buckets = run.data.buckets(run.trainer.seq_len)
    assert len(buckets) >= 3 and len({p for p, _ in buckets}) == len(buckets)


def test_gpu_sweep_is_larger_and_uses_the_gpu_trainer():
    from hybridjax.train_config import resolve

    cpu, gpu = (resolve(compose([f"+experiment={e}"])) for e in ("ratio_sweep", "ratio_sweep_gpu"))
    assert gpu.trainer.mesh.data == -1
    assert gpu.model.d_model > cpu.model.d_model
    assert gpu.trainer.seq_len > cpu.trainer.seq_len
    assert max(gpu.data.num_pairs) > max(cpu.data.num_pairs)


# --- the report on real runs ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """The plain ratio_sweep command, shrunk: two tiny runs (patterns MM and M*, seed 0)."""
    out = tmp_path_factory.mktemp("sweep")
    cmd = [
        sys.executable,
        "-m",
        "hybridjax.train",
        "+experiment=ratio_sweep",
        *TINY,
        "model.pattern=MM,M*",
        "trainer.seed=0",
        f"hydra.sweep.dir={out}",
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert sorted(os.listdir(out)) == ["0", "1", "multirun.yaml"]
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_of_a_sweep(sweep_dir, tmp_path, capsys):
    assert report.main([str(sweep_dir), "--out", str(tmp_path), "--title", "Tiny sweep"]) == 0
    assert "Tiny sweep" in capsys.readouterr().out

    runs = read_csv(tmp_path / "runs.csv")
    assert [(r["pattern"], r["status"], r["attn_fraction"]) for r in runs] == [
        ("MM", "done", "0"),
        ("M*", "done", "0.5"),
    ]
    for r in runs:
        assert int(r["params_total"]) > 0 and float(r["tokens_per_sec"]) > 0
        assert r["memory_kind"] == "step_memory_bytes" and float(r["memory_mb"]) > 0
        assert r["step"] == "3"
        for b in BUCKETS:
            assert 0 <= float(r[f"eval/accuracy/{b}"]) <= 1

    summary = read_csv(tmp_path / "summary.csv")
    assert [(s["model.pattern"], s["n_seeds"]) for s in summary] == [("MM", "1"), ("M*", "1")]
    with open(os.path.join(sweep_dir, "1", "summary.json")) as f:
        acc = json.load(f)["eval/accuracy"]
    assert float(summary[1]["eval/accuracy_mean"]) == pytest.approx(acc, rel=1e-5)

    md = (tmp_path / "report.md").read_text()
    assert "| pattern | attn frac | " + " | ".join(BUCKETS) + " | params |" in md
    assert "| MM | 0 |" in md and "| M* | 0.5 |" in md
    assert "step_memory_bytes" in md
    for png in ("accuracy.png", "throughput_memory.png", "learning_curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def copy_run(src, dst, config=None, summary=None):
    """A copy of run `src` as `dst` with `config` ({section: {key: value}}) and `summary` changed."""
    shutil.copytree(src, dst)
    changed = yaml.safe_load((dst / "config.yaml").read_text())
    for section, values in (config or {}).items():
        changed[section].update(values)
    (dst / "config.yaml").write_text(yaml.safe_dump(changed))
    if summary:
        first = json.loads((dst / "summary.json").read_text())
        (dst / "summary.json").write_text(json.dumps({**first, **summary}))


def test_report_groups_seeds_and_lists_unfinished_runs(sweep_dir, tmp_path):
    """A second seed of M* (a copy with another seed and accuracy) and a run cut short."""
    runs = tmp_path / "runs"
    shutil.copytree(sweep_dir, runs)
    copy_run(runs / "1", runs / "2", {"trainer": {"seed": 7}}, {"eval/accuracy": 0.25})
    copy_run(runs / "0", runs / "3")
    (runs / "3" / "summary.json").unlink()

    result = report.report([str(runs)], str(tmp_path / "out"))
    assert result["settings"] == ["model.pattern"]
    summary = {s["model.pattern"]: s for s in result["summary"]}
    assert summary["M*"]["n_seeds"] == 2 and summary["M*"]["seeds"] == "0 7"
    first = json.loads((runs / "1" / "summary.json").read_text())["eval/accuracy"]
    assert summary["M*"]["eval/accuracy_mean"] == pytest.approx((first + 0.25) / 2)
    assert summary["MM"]["n_seeds"] == 1
    statuses = [r["status"] for r in read_csv(tmp_path / "out" / "runs.csv")]
    assert statuses == ["done", "done", "done", "unfinished"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Unfinished runs" in md and " ± " in md


def test_report_blanks_settings_a_pattern_does_not_use(sweep_dir, tmp_path):
    """An MoE ablation's dense run has an n_experts too; it is no setting of that run."""
    runs = tmp_path / "runs"
    copy_run(sweep_dir / "0", runs / "dense", {"model": {"pattern": "M-", "n_experts": 8}})
    copy_run(sweep_dir / "0", runs / "moe", {"model": {"pattern": "ME", "n_experts": 4}})
    result = report.report([str(runs)], str(tmp_path / "out"))
    assert result["settings"] == ["model.pattern", "model.n_experts"]
    assert [g["label"] for g in result["summary"]] == ["M-", "ME, n_experts=4"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| M- | – |" in md and "| ME | 4 |" in md
