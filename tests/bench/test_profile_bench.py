"""`python -m hybridjax.bench profile`: every kernel of a traced step is attributed to its layer."""

from hybridjax.bench.__main__ import main as bench_main
from hybridjax.bench.profile import classify, hlo_ops

HLO = """HloModule jit_step, entry_computation_layout={()}
ENTRY %main {
  %fusion.3 = (bf16[8,16]{1,0}, f32[8]{0}) fusion(%p0, %p1), kind=kCustom, calls=%fc, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}, metadata={op_name="jit(step)/transpose(jvp())/while/body/checkpoint/mlp/dot_general"}
  ROOT %all-reduce-start.1 = f32[8]{0} all-reduce-start(%x), replica_groups={}, metadata={op_name="jit(step)/optimizer/psum"}
  %custom-call.2 = bf16[4]{0} custom-call(%y), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/jvp()/while/body/checkpoint/rematted_computation/mamba2/ssd"}
}
"""


def test_hlo_instructions_are_classified_by_scope_pass_and_work():
    ops = hlo_ops(HLO)
    assert ops["fusion.3"][0] == "fusion"  # the tuple shape is skipped
    assert classify(*ops["fusion.3"], "triton_gemm_kernel") == ("mlp", "backward", "matmul")
    assert classify(*ops["all-reduce-start.1"], "nccl_kernel") == (
        "optimizer",
        "forward",
        "collective",
    )
    assert classify(*ops["custom-call.2"], "ssd_fwd") == ("mamba2", "recompute", "kernel")


def test_tiny_profile_attributes_time_to_every_layer_kind(capsys, tmp_path):
    assert (
        bench_main(
            [
                "profile",
                "--preset",
                "tiny",
                "--impl",
                "chunked",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--top",
                "3",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    layers = {line.split("|")[1].strip() for line in out.splitlines() if line.count("|") == 4}
    assert {"mamba2", "attention", "mlp", "loss", "optimizer"} <= layers
    assert (tmp_path / "profile.md").read_text().startswith("preset tiny")
    # the last table details the largest non-matmul groups of the first, in its order, each
    # with its jax names (each name's ops summed; no more time than the group's)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.count("|") == 6]
    groups = [(" / ".join(c.strip() for c in r[:3]), float(r[3])) for r in rows[2:]]
    groups = [(g, ms) for g, ms in groups if not g.endswith("matmul")][:6]
    detail = out[out.index("| largest non-matmul groups") :].splitlines()[2:]
    heads = [i for i, line in enumerate(detail) if line.startswith("| **")]
    assert [detail[i].split("**")[1] for i in heads] == [g for g, _ in groups]
    counts = []
    for (_, ms), i, j in zip(groups, heads, heads[1:] + [len(detail)]):
        named = [line.split("|")[1:4] for line in detail[i + 1 : j] if line.startswith("| ")]
        assert named and sum(float(r[2]) for r in named) <= ms + 0.01 * len(named)
        assert len({r[0] for r in named}) == len(named)  # each jax name once
        counts += [int(r[1]) for r in named]
    assert max(counts) > 1  # a name sums the ops that share it
