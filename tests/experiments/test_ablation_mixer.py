"""+experiment=ablation_mixer: every job composes (Mamba-2 / Mamba-3 SISO / MIMO / no rotations,
alone and with attention, x parity / sums mod 5 / MQAR) at one state size, and the report of two
tiny state-tracking runs writes the table and the accuracy-vs-length plot."""

import csv
import itertools
import os
import subprocess
import sys

from experiments import report

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG_DIR = os.path.join(ROOT, "configs")
PNG = b"\x89PNG\r\n\x1a\n"


def compose(overrides, hydra_config=False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hybridjax.train_config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(
            config_name="config", overrides=list(overrides), return_hydra_config=hydra_config
        )


def test_every_job_composes_at_equal_state_size():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hybridjax.train_config import resolve

    params = compose(["+experiment=ablation_mixer"], hydra_config=True).hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = {o.get_key_element(): list(o.sweep_string_iterator()) for o in parsed}
    assert len(axes["+experiment/mixer"]) == 8 and len(axes["trainer.seed"]) == 2
    assert axes["+experiment/mixer_task"] == ["parity", "modular_add", "mqar"]
    seen = {}
    for task, mixer in itertools.product(axes["+experiment/mixer_task"], axes["+experiment/mixer"]):
        overrides = [f"+experiment/mixer_task={task}", f"+experiment/mixer={mixer}"]
        run = resolve(compose([*overrides, "+experiment=ablation_mixer"]))
        m, t = run.model, run.trainer
        assert (m.mamba_heads, m.mamba_head_dim, m.ssm_state) == (4, 16, 8)
        assert m.pattern.count("*") == ("hybrid" in mixer)
        assert set(m.pattern) - set("*-") == ({"M"} if mixer.startswith("mamba2") else {"3"})
        if "3" in m.pattern:
            assert m.mamba3_mimo == ("mimo" in mixer)
            assert m.mamba3_angles == (0 if "norope" in mixer else 2)
        if task == "mqar":
            assert run.data.buckets(t.seq_len) == ((2, 64), (4, 64), (8, 64))
        else:
            assert run.data.task == task and t.seq_len == 64 and t.eval_seq_len == 1024
            assert run.data.buckets(t.seq_len) == ((64, "all"),)
            assert [b[0] for b in run.data.buckets(t.eval_seq_len, "eval")] == [
                64,
                128,
                256,
                512,
                1024,
            ]
        seen[(task, mixer)] = (m, run.data)
    assert len({(m, d) for m, d in seen.values()}) == 24, "two jobs train the same model"


def test_report_of_two_tiny_runs_plots_accuracy_vs_length(tmp_path):
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "hybridjax.train",
        "+experiment=ablation_mixer",
        "+experiment/mixer_task=parity",
        "+experiment/mixer=mamba2,mamba3_norope_hybrid",
        "trainer.seed=0",
        "model.d_model=16",
        "model.mamba_heads=2",
        "model.mamba_head_dim=8",
        "model.ssm_state=4",
        "model.ffn=16",
        "trainer.steps=2",
        "trainer.batch_size=4",
        "trainer.seq_len=16",
        "trainer.eval_seq_len=64",
        "data.eval_lens=[16,32,64]",
        "data.num_eval_examples=12",
        "trainer.eval_batch_size=12",
        "optimizer.warmup_steps=1",
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

    result = report.report([str(out)], str(tmp_path / "report"))
    assert result["settings"][0] == "model.pattern"
    with open(tmp_path / "report" / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert [(r["pattern"], r["attn_fraction"], r["n_mixers"]) for r in runs] == [
        ("M-M-", "0", "2"),
        ("3-*-", "0.5", "2"),  # Mamba-3 counts as a mixer
    ]
    for r in runs:
        for n in (16, 32, 64):
            assert 0 <= float(r[f"eval/accuracy/len={n}"]) <= 1
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| len=16 | len=32 | len=64 |" in md
    assert "![accuracy vs test length](accuracy_vs_length.png)" in md
    plot = result["files"]["accuracy_vs_length.png"]
    with open(plot, "rb") as f:
        assert f.read(8) == PNG
