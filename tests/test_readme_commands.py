"""README.md's commands run as written: every `python -m hybridjax...` / `python -m experiments...`
command of its bash blocks and inline code runs here, at a tiny size, in its own process from a
temporary folder, or is listed in SKIPPED with the reason it cannot run on a CPU.

A command runs as README.md writes it, followed by the tiny-size arguments of its tool (fewer
steps, one eval batch, the tiny bench preset; Hydra keys the command sets itself are left alone,
except trainer.steps) and by the few arguments a CPU run needs beyond that (one job of a sweep).
Placeholders such as `<time>` name the one path the previous commands of the group wrote. A
command added to README.md without an entry here fails test_every_readme_command_is_covered.
"""

import dataclasses
import glob
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hybridjax.train_config import resolve
from tests.train.conftest import compose

ROOT = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"python -m (?:hybridjax|experiments)\b")

# Hydra overrides that shrink a training run without changing what it is.
TRAIN = (
    "model.d_model=32",
    "trainer.steps=2",
    "trainer.batch_size=4",
    "trainer.eval_batches=1",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "trainer.progress=false",
    "logger=none",
)
GPU_TRAIN = (*TRAIN, "trainer.seq_len=128")  # trainer=gpu's rows are 1,024 tokens
FORCED = ("trainer.steps",)  # tiny even where the command sets them
BENCH = ("--preset", "tiny", "--steps", "2", "--warmup", "1")
SSD = (
    "--shapes",
    "b1,l128,h2,p16,n16,g1",
    "--chunk-sizes",
    "32",
    "--warmup",
    "1",
    "--repeats",
    "1",
    "--batch",
    "1",
)
TIMING = ("--warmup", "1", "--repeats", "1", "--batch", "1")
MAMBA3 = ("--shapes", "b1,l64,h2,p16,n16", *TIMING)
GROUPED_MATMUL = ("--shapes", "m256,k32,n16,e4", *TIMING)
CONV = ("--shapes", "b1,l40,c24,k4", *TIMING)
# XLA's CPU backend compiles these programs 2-3x faster without LLVM's optimisations and with its
# older loop emitters; the commands run two steps, so how fast the compiled code runs is moot.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


@dataclasses.dataclass(frozen=True)
class Step:
    readme: str  # the command as README.md writes it (comments and line breaks dropped)
    tiny: tuple[str, ...] = ()  # the tiny-size arguments of its tool
    extra: tuple[str, ...] = ()  # what a CPU run needs beyond size
    fill: tuple[tuple[str, str], ...] = ()  # README text -> what runs instead
    devices: int = 1  # CPU devices (XLA's forced host platform device count)


# name -> the commands it runs in order, in one folder (later ones read what earlier ones wrote)
GROUPS = {
    "default_and_export": (
        Step("python -m hybridjax.train", TRAIN),
        Step(
            "python -m hybridjax.export outputs/<date>/<time> exported/ [--dtype bfloat16] "
            "[--step N]",
            fill=(("[--dtype bfloat16] [--step N]", "--dtype bfloat16 --step 2"),),
        ),
    ),
    "pattern": (
        Step(
            "python -m hybridjax.train model.pattern='MM*-MM*-' trainer.steps=3000 "
            "trainer.seq_len=256",
            TRAIN,
        ),
    ),
    "small_niah": (
        Step(
            "python -m hybridjax.train model=hybrid_small data=niah "
            "optimizer=adamw_wsd logger=none",
            TRAIN,
        ),
    ),
    "text": (Step("python -m hybridjax.train data=text data.paths='[corpus/*.txt]'", TRAIN),),
    "ratio_sweep_and_report": (
        Step(
            "python -m hybridjax.train +experiment=ratio_sweep",
            TRAIN,
            extra=("model.pattern=M*M*", "trainer.seed=0"),
        ),
        Step("python -m experiments.report multirun/ratio_sweep/<time>"),
    ),
    "ablation_moe": (
        Step(
            "python -m hybridjax.train +experiment=ablation_moe",
            TRAIN,
            extra=("+experiment/moe=e8_top2", "trainer.seed=0"),
        ),
    ),
    "ablation_ssm": (
        Step(
            "python -m hybridjax.train +experiment=ablation_ssm",
            TRAIN,
            extra=("+experiment/ssm=groups2", "trainer.seed=0"),
        ),
    ),
    "ablation_mixer": (
        Step(
            "python -m hybridjax.train +experiment=ablation_mixer",
            TRAIN,
            extra=("+experiment/mixer_task=mqar", "+experiment/mixer=mamba3", "trainer.seed=0"),
        ),
    ),
    "ablation_mixer_parity": (
        Step(
            "python -m hybridjax.train +experiment=ablation_mixer '+experiment/mixer_task=parity' "
            "'+experiment/mixer=mamba2,mamba3,mamba3_norope,mamba3_mimo' trainer.steps=2000",
            TRAIN,
            extra=("trainer.seed=0",),
            fill=(("mamba2,mamba3,mamba3_norope,mamba3_mimo", "mamba3"),),
        ),
    ),
    "ratio_sweep_gpu": (
        Step(
            "python -m hybridjax.train +experiment=ratio_sweep_gpu",
            GPU_TRAIN,
            extra=(
                "model.pattern=MMM*MMM*",
                "trainer.seed=0",
                "data.num_pairs=[16,32]",
                "data.seq_lens=[128,128]",
            ),
        ),
    ),
    "data_parallel": (
        Step("python -m hybridjax.train trainer=gpu model.dtype=bfloat16", GPU_TRAIN, devices=2),
    ),
    "gpu_preset": (
        Step(
            "python -m hybridjax.train trainer=gpu model=hybrid_1b trainer.batch_size=4 "
            "trainer.seq_len=4096",
            GPU_TRAIN,
            # the preset composes and trains, at toy widths and a few periods of its pattern
            extra=(
                "model.pattern=M-M*-",
                "model.mamba_heads=2",
                "model.mamba_head_dim=16",
                "model.ssm_state=16",
                "model.n_groups=1",
                "model.chunk_size=32",
                "model.attn_heads=2",
                "model.kv_heads=1",
                "model.head_dim=16",
                "model.ffn=64",
            ),
            fill=(("trainer.seq_len=4096", "trainer.seq_len=128"),),
        ),
    ),
    "fsdp": (
        Step(
            "python -m hybridjax.train trainer=gpu trainer.mesh.data=1 trainer.mesh.fsdp=-1",
            GPU_TRAIN,
            devices=2,
        ),
    ),
    "data_x_fsdp": (
        Step(
            "python -m hybridjax.train trainer=gpu trainer.mesh.data=2 trainer.mesh.fsdp=4",
            GPU_TRAIN,
            extra=("trainer.batch_size=8",),
            devices=8,
        ),
    ),
    "short_then_long": (
        Step("python -m hybridjax.train trainer.seq_len=128 hydra.run.dir=outputs/short", TRAIN),
        Step(
            "python -m hybridjax.train trainer.init_from=outputs/short optimizer=adamw_constant "
            "'trainer.seq_len_schedule=[{seq_len: 1024, batch_size: 4, steps: 3}, "
            "{seq_len: 128}]'",
            TRAIN,
        ),
        Step(
            "python -m hybridjax.train trainer.init_from=outputs/short optimizer=adamw_constant "
            "trainer.state_passing=true 'data.seq_lens=[512]' trainer.eval_seq_len=512",
            TRAIN,
        ),
    ),
    "long_context_and_report": (
        Step(
            "python -m experiments.long_context run",
            TRAIN,
            extra=("model.pattern=M*MM", "trainer.seed=0"),
        ),
        Step("python -m experiments.long_context multirun/long_context/<time>"),
    ),
    "bench_ssd": (Step("python -m hybridjax.bench ssd --impls chunked pallas mamba_ssm", SSD),),
    "bench_mamba3": (Step("python -m hybridjax.bench mamba3", MAMBA3),),
    "bench_grouped_matmul": (Step("python -m hybridjax.bench grouped_matmul", GROUPED_MATMUL),),
    "bench_conv": (Step("python -m hybridjax.bench conv", CONV),),
    "bench_step": (
        Step("XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python -m hybridjax.bench step", BENCH),
    ),
    "bench_step_model": (
        Step(
            "python -m hybridjax.bench step --model attn_max_documents=2 attn_impl=blockwise",
            BENCH,
        ),
    ),
    "bench_mesh": (
        Step("python -m hybridjax.bench mesh --layouts 1 data=2 fsdp=2", BENCH, devices=2),
    ),
    "bench_mesh_tensor": (
        Step(
            "python -m hybridjax.bench mesh --layouts tensor=2 data=1,fsdp=2 "
            "--same-batch --batch 4",
            BENCH,
            devices=2,
        ),
    ),
    "bench_mesh_long": (
        Step(
            "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m hybridjax.bench mesh "
            "--layouts 1 --seq-len 32768 131072 --batch 1 --remat block",
            BENCH,
            fill=(("32768 131072", "256 512"),),
        ),
    ),
    "bench_mesh_long_chunked": (
        Step(
            "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m hybridjax.bench mesh --layouts 1 "
            "--seq-len 32768 131072 524288 --batch 1 --remat nested "
            "--model scan_layers=true layer_chunk_size=16384 attn_max_documents=4 attn_kv_heads_per_call=1",
            BENCH,
            fill=(
                ("32768 131072 524288", "256 512"),
                ("layer_chunk_size=16384", "layer_chunk_size=96"),
            ),
        ),
    ),
    "bench_profile": (
        Step("python -m hybridjax.bench profile --layout context=2 --out prof", BENCH, devices=2),
    ),
    "bench_profile_moe": (  # the MoE preset's layer kinds at the tiny preset's widths
        Step(
            "python -m hybridjax.bench profile --preset moe --out prof",
            BENCH,
            fill=(("--preset moe", "--model pattern=ME*- n_experts=4 top_k=2 moe_ffn=32"),),
        ),
    ),
    "bench_mesh_moe": (
        Step(
            "python -m hybridjax.bench mesh --preset moe --layouts 1 data=2 "
            "expert=2 --same-batch --batch 8",
            BENCH,
            devices=2,
        ),
    ),
}

GPU_KERNELS = (
    "the Pallas SSD kernels' GPU check and timing (Triton); tests/kernels runs the "
    "kernels on the CPU in interpret mode"
)
SKIPPED = {
    "python -m hybridjax.train trainer=gpu model.dtype=bfloat16 model.ssd_impl=pallas": "ssd_impl=pallas needs a GPU (tests/kernels checks the kernels in interpret mode)",
    "python launch/local.py -- python -m hybridjax.train trainer=gpu hydra.run.dir=outputs/run1": "one process per GPU of the host; tests/train/test_multihost.py runs launch/local.py "
    "with CPU devices",
    "python -m hybridjax.train trainer=gpu hydra.run.dir=/shared/run1 "
    "trainer.distributed.coordinator_address=node0:1234 trainer.distributed.num_processes=4 "
    "trainer.distributed.process_id=$RANK": "four processes and a coordinator host node0; tests/train/test_multihost.py runs a "
    "multi-process job on localhost",
    "python -m experiments.long_context run +experiment=long_context_gpu": "GPU scale (16K-token training rows, a grid to 128K): a tiny run would override every "
    "length it sets; tests/experiments/test_long_context.py composes its two stages",
    "python -m experiments.long_context run name=long_context_tbptt": "the long_context_and_report "
    "entry runs the experiment; tests/train/test_state_passing_run.py composes this extension "
    "stage and the short_then_long entry trains with state passing",
    "python -m hybridjax.bench mamba3 --impls mamba_ssm pallas": "the peer (mamba-ssm's Triton kernels) and the Pallas path need a GPU; the bench_mamba3 entry runs the benchmark",
    "python -m hybridjax.bench step --impls pallas": "the Pallas SSD needs a GPU; the bench_step entry runs the step benchmark",
    "python -m hybridjax.bench step --preset moe --impls pallas": "the Pallas SSD needs a GPU; the bench_step entry runs the step benchmark",
    "python -m hybridjax.bench step --impls pallas --remat dots_no_batch": "the Pallas SSD needs a GPU; the bench_step entry runs the step benchmark",
    "python -m hybridjax.bench step --impls pallas --model mamba2_glue_impl=xla": "the Pallas SSD needs a GPU; the bench_step entry runs the step benchmark",
    "python -m hybridjax.bench grouped_matmul --impls mgpu jax-linear-attention": "mgpu needs a Hopper GPU and the peer its Mosaic GPU; the bench_grouped_matmul entry runs the benchmark",
    "python -m hybridjax.bench grouped_matmul --impls mgpu persistent jax-linear-attention": "the Mosaic GPU kernels need a Hopper GPU; the bench_grouped_matmul entry runs the benchmark",
    "python -m hybridjax.bench grouped_matmul --sweep --shapes m98304,k2048,n768,e64": "jax's Mosaic GPU kernels need an sm_90 GPU; tests/bench/test_grouped_matmul_bench.py runs the sweep with stand-in kernels",
    "python -m hybridjax.kernels.check": GPU_KERNELS,
    "python -m hybridjax.kernels.check --stages": GPU_KERNELS,
    "python -m hybridjax.kernels.check --variants ...": GPU_KERNELS,
    "python -m hybridjax.kernels.check --skip-correct --variants default,hb1,hb16,dxdc_s1,...": GPU_KERNELS,
}
# The same command as another entry, written with a prefix in the prose.
SAME_AS = {"/usr/bin/time python -m hybridjax.train": "python -m hybridjax.train"}


def readme_commands() -> set[str]:
    """The commands of README.md's bash blocks (continued lines joined, comments dropped) and of
    its inline code outside blocks that run `python -m hybridjax...` or `python -m experiments...`."""
    text = (ROOT / "README.md").read_text()
    commands = set()
    blocks = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
    for lang, body in blocks.findall(text):
        if lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                commands.add(" ".join(re.sub(r"(^|\s)#.*", "", line).split()))
    for span in re.findall(r"`([^`\n]+)`", blocks.sub("", text)):
        commands.add(" ".join(span.split()))
    return {c for c in commands if COMMAND.search(c)}


def test_every_readme_command_is_covered():
    covered = {s.readme for steps in GROUPS.values() for s in steps} | set(SKIPPED) | set(SAME_AS)
    found = readme_commands()
    assert not found - covered, (
        f"README commands without a test or a reason to skip: {sorted(found - covered)}"
    )
    assert not covered - found, (
        f"entries here that README.md no longer has: {sorted(covered - found)}"
    )
    assert set(SAME_AS.values()) <= covered - set(SAME_AS)


@pytest.mark.parametrize(
    "overrides,vocab",
    [
        (["data=text", "data.paths=[corpus/*.txt]"], 384),  # the byte tokenizer's 259, padded
        (["data=text", "data.paths=[corpus/*.txt]", "model.vocab_size=259"], 259),  # as set
        (["data=niah"], 256),  # a synthetic task's own vocabulary
        (["data.vocab_size=100"], 128),
    ],
)
def test_model_vocabulary_follows_the_data_unless_set(overrides, vocab):
    cfg = compose(["model.vocab_size=null", *overrides])
    assert resolve(cfg).model.vocab_size == vocab
    assert cfg.model.vocab_size == vocab  # what config.yaml beside the run will say


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model.vocab_size=256", "data=text", "data.paths=[corpus/*.txt]"],
            "model.vocab_size: 256 is smaller than the data's vocabulary (259 ids)",
        ),
        (
            ["model.vocab_size=null", "data=memmap", "data.path=tokens.npy"],
            "data.vocab_size: the token file's vocabulary size must be given",
        ),
    ],
)
def test_vocabulary_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve(compose(overrides))


def _env(devices: int, flags: tuple[str, ...]) -> dict:
    """This environment on the CPU with `devices` host devices (the tests' conftest forces 8) and
    the XLA `flags`."""
    kept = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    ).split()
    if devices > 1:
        kept.append(f"--xla_force_host_platform_device_count={devices}")
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*kept, *flags]),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def _path(word: str, cwd: Path) -> str:
    """A README placeholder path (`outputs/<date>/<time>`) -> the one path it matches in cwd."""
    if "<" not in word:
        return word
    matches = glob.glob(re.sub(r"<[^>]+>", "*", word), root_dir=cwd)
    assert len(matches) == 1, f"{word}: expected one match in {cwd}, got {matches}"
    return matches[0]


def command_line(step: Step, cwd: Path, flags: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    """(argv, environment) that run `step` in `cwd` with the XLA `flags`."""
    text = step.readme
    for old, new in step.fill:
        text = text.replace(old, new)
    words = shlex.split(text)
    env = _env(step.devices, flags)
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before the command
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[:2] == ["python", "-m"], step.readme
    keys = {w.split("=", 1)[0] for w in words if "=" in w}
    tiny = [a for a in step.tiny if a.split("=", 1)[0] not in keys or a.startswith(FORCED)]
    args = [_path(w, cwd) for w in words[2:]]
    return [sys.executable, "-m", *args, *tiny, *step.extra], env


@pytest.fixture(scope="session")
def session_env(tmp_path_factory) -> tuple[tuple[str, ...], dict]:
    """(XLA flags, environment variables) for every command: the FAST_COMPILE flags where this
    jaxlib knows them (an unknown flag aborts), and one persistent compilation cache for the
    session, xdist workers included (a half-written entry that another worker reads is only
    compiled again, with a warning)."""
    root = tmp_path_factory.getbasetemp()
    cache = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "jax_cache"
    cache.mkdir(exist_ok=True)
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.jit(abs)(1)"],
        env=_env(1, FAST_COMPILE),
        capture_output=True,
        check=False,
    )
    return FAST_COMPILE if probe.returncode == 0 else (), {
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


@pytest.mark.parametrize("group", list(GROUPS))
def test_readme_command_runs(group, tmp_path, session_env):
    (tmp_path / "corpus").mkdir()
    for i in range(8):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"Document {i}: the quick brown fox. " * 20)
    flags, variables = session_env
    for step in GROUPS[group]:
        argv, env = command_line(step, tmp_path, flags)
        env.update(variables)
        proc = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        output = proc.stdout[-4000:] + proc.stderr[-4000:]
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{output}"
        assert "Traceback" not in proc.stderr, f"{shlex.join(argv)}\n{output}"
