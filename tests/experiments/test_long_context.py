"""The long-context experiment: its configs, and its driver and report on a real tiny job."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from experiments import long_context

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG_DIR = os.path.join(ROOT, "configs")
TINY = [
    "model.d_model=32",
    "model.mamba_heads=2",
    "model.mamba_head_dim=16",
    "model.ssm_state=4",
    "model.chunk_size=16",
    "model.attn_heads=2",
    "model.kv_heads=1",
    "model.head_dim=16",
    "trainer.steps=2",
    "trainer.batch_size=4",
    "trainer.seq_len=32",
    "trainer.eval_seq_len=64",
    "trainer.eval_batch_size=16",
    "data.eval_context_lens=[32,64]",
    "data.num_eval_examples=16",
]
PNG = b"\x89PNG\r\n\x1a\n"


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hybridjax.train_config import register_configs, resolve

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return resolve(hydra_compose(config_name="config", overrides=list(overrides)))


def stages(experiment, pattern):
    """(short, extension) RunConfigs of one job, composed as experiments.long_context does."""
    job = [f"model.pattern={pattern}", "trainer.seed=0", f"+experiment={experiment}"]
    return compose(job), compose(
        [*job, f"+experiment/extension={experiment}", "trainer.init_from=/some/run"]
    )


@pytest.mark.parametrize("experiment", ["long_context", "long_context_gpu"])
def test_extension_continues_the_short_model_longer_at_a_constant_lr(experiment):
    for pattern in ("M*MM", "MMMM") if experiment == "long_context" else ("MMM*MMMM",):
        short, extension = stages(experiment, pattern)
        assert extension.model == short.model and extension.data == short.data
        assert extension.trainer.init_from == "/some/run"
        assert (extension.optimizer.schedule, extension.optimizer.warmup_steps) == ("constant", 0)
        lengths = [p.seq_len for p in extension.trainer.seq_len_schedule]
        assert short.trainer.seq_len in lengths and max(lengths) > short.trainer.seq_len
        grid = short.data.buckets(short.trainer.eval_seq_len, split="eval")
        assert len({d for _, d in grid}) >= 8
        assert {n for n, _ in grid} >= {short.trainer.seq_len, 8 * short.trainer.seq_len}
    if experiment == "long_context_gpu":
        assert max(n for n, _ in grid) >= 128 * 1024 and short.trainer.mesh.data == -1


def test_the_control_trains_as_many_steps_and_tokens_at_the_short_length():
    short, extension = stages("long_context", "M*MM")
    job = ["model.pattern=M*MM", "trainer.seed=0", "+experiment=long_context"]
    control = compose([*job, "+experiment/extension=long_context_control", "trainer.init_from=x"])
    assert control.optimizer == extension.optimizer and control.model == short.model
    assert control.data == short.data and control.trainer.init_from == "x"
    assert not control.trainer.seq_len_schedule
    assert control.trainer.seq_len == short.trainer.seq_len
    assert control.trainer.steps == extension.trainer.steps
    tokens = {p.seq_len * p.batch_size for p in extension.trainer.seq_len_schedule}
    assert tokens == {control.trainer.seq_len * control.trainer.batch_size}


def test_the_cpu_experiment_compares_a_hybrid_with_a_pure_ssm():
    with open(os.path.join(CONFIG_DIR, "experiment", "long_context.yaml")) as f:
        params = yaml.safe_load(f)["hydra"]["sweeper"]["params"]
    patterns = params["model.pattern"].split(",")
    assert [p.count("*") for p in patterns] == [1, 0] and len(set(map(len, patterns))) == 1
    assert len(str(params["trainer.seed"]).split(",")) >= 2


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """`python -m experiments.long_context run`, shrunk to one tiny job (M*, seed 0)."""
    out = tmp_path_factory.mktemp("long_context")
    cmd = [
        sys.executable,
        "-m",
        "experiments.long_context",
        "run",
        *TINY,
        "model.pattern=M*",
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
    assert sorted(os.listdir(out / "0")) == [
        ".hydra",
        "control",
        "extend",
        "long_context.log",
        "short",
    ]
    return out


def test_a_job_trains_short_then_extends_from_it_and_runs_the_control(job_dir):
    short, extend, control = (
        yaml.safe_load((job_dir / "0" / s / "config.yaml").read_text())
        for s in ("short", "extend", "control")
    )
    assert short["trainer"]["init_from"] is None and short["trainer"]["seq_len_schedule"] == []
    assert extend["trainer"]["init_from"] == str(job_dir / "0" / "short")
    assert extend["optimizer"]["schedule"] == "constant"
    assert [p["seq_len"] for p in extend["trainer"]["seq_len_schedule"]] == [256, 64]
    assert extend["model"] == short["model"]
    # the control: the extension's optimizer and steps from the same start, short rows only
    assert control["trainer"]["init_from"] == str(job_dir / "0" / "short")
    assert control["optimizer"] == extend["optimizer"] and control["model"] == short["model"]
    assert control["trainer"]["seq_len_schedule"] == []
    assert control["trainer"]["seq_len"] == short["trainer"]["seq_len"]
    assert control["trainer"]["steps"] == extend["trainer"]["steps"]
    for stage in ("short", "extend", "control"):
        summary = json.loads((job_dir / "0" / stage / "summary.json").read_text())
        assert (
            summary["step"] == 2
            and len([k for k in summary if k.startswith("eval/accuracy/len=")]) == 16
        )


def test_report_heatmaps_and_table(job_dir, tmp_path, capsys):
    assert long_context.main([str(job_dir), "--out", str(tmp_path)]) == 0
    assert "| model | stage | trained at | 32 | 64 | all |" in capsys.readouterr().out
    with open(tmp_path / "grid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 8  # stages x lengths x depths
    assert {(r["pattern"], r["seed"], r["stage"], r["train_lens"]) for r in rows} == {
        ("M*", "0", "short", "32"),
        ("M*", "0", "control", "32"),
        ("M*", "0", "extend", "64+256"),
    }
    summary = json.loads((job_dir / "0" / "extend" / "summary.json").read_text())
    cell = next(
        r for r in rows if r["stage"] == "extend" and r["length"] == "64" and r["depth"] == "0.0"
    )
    assert float(cell["accuracy"]) == summary["eval/accuracy/len=64,depth=0.00"]
    md = (tmp_path / "report.md").read_text()
    assert "| M\\* | before | 32 |" in md and "| M\\* | after | 64+256 |" in md
    order = [md.index(f"| M\\* | {stage} |") for stage in ("before", "control", "after")]
    assert order == sorted(order) and "| M\\* | control | 32 |" in md
    assert "![M*](niah_Mx.png)" in md
    assert (tmp_path / "niah_Mx.png").read_bytes()[:8] == PNG


def test_report_averages_seeds(job_dir, tmp_path):
    """A second seed (a copy of the job whose extension recalled everything)."""
    runs = tmp_path / "runs"
    shutil.copytree(job_dir, runs)
    shutil.copytree(runs / "0", runs / "1")
    config = yaml.safe_load((runs / "1" / "extend" / "config.yaml").read_text())
    config["trainer"]["seed"] = 1
    (runs / "1" / "extend" / "config.yaml").write_text(yaml.safe_dump(config))
    summary = json.loads((runs / "1" / "extend" / "summary.json").read_text())
    first = summary["eval/accuracy/len=32,depth=1.00"]
    summary.update({k: 1.0 for k in summary if k.startswith("eval/accuracy/len=")})
    (runs / "1" / "extend" / "summary.json").write_text(json.dumps(summary))

    result = long_context.report([str(runs)], str(tmp_path / "out"))
    _, _, means = long_context.mean_grid(result["rows"], "M*", "extend")
    assert means[(32, 1.0)] == pytest.approx((first + 1.0) / 2)
    assert len(means) == 16
