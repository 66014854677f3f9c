"""HybridConfig: the one plain dataclass that describes a hybrid model.

Field defaults follow `transformers` NemotronH semantics so that export is exact. The config is
frozen (hashable, safe as a static jit argument) and validated on construction: a bad value raises
a ValueError naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses

# The implementation names, defined beside their implementations.
from hybridjax.ops.attention import IMPLS as ATTN_IMPLS
from hybridjax.ops.grouped_matmul import IMPLS as GROUPED_MATMULS
from hybridjax.ops.mamba3 import IMPLS as MAMBA3_IMPLS
from hybridjax.ops.norms import NORM_IMPLS
from hybridjax.ops.ssd import IMPLS as SSD_IMPLS

LAYER_LETTERS = {"M": "mamba2", "3": "mamba3", "*": "attention", "E": "moe", "-": "mlp"}
DTYPES = ("float32", "bfloat16", "float16", "float64")
ROUTERS = ("sigmoid", "softmax")
ACTIVATIONS = ("relu2", "swiglu", "silu", "gelu")
ROPE_SCALINGS = (None, "linear", "ntk", "yarn")
MOE_DISPATCH = ("dropless", "capacity")
MAMBA3_A_ACTS = ("softplus", "heavy_tail")  # mamba_ssm 2.3.2 | its repository's HEAD
MAMBA3_ROPE_FRACTIONS = (0.0, 0.5, 1.0)  # 0: no rotation (the ablation of the angles)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "block", "offload", "nested")


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    # --- stack -------------------------------------------------------------------------------
    vocab_size: int = 256
    d_model: int = 128
    pattern: str = "M-M*M-M-"  # one letter per layer: M mamba2, 3 mamba3, * attention, E moe, - mlp
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # master parameter dtype
    # nnx.scan over repeats of the pattern's period (compile time flat in depth); False runs the
    # layers one after another: no stacked copies of what remat saves, faster on a GPU when it
    # saves matmul outputs (the GPU presets), at a longer compile
    scan_layers: bool = True
    # activation checkpointing: "full"/"dots"/"dots_no_batch" per period; "block" keeps only each
    # block's input (one block's internals live at a time in the backward), "offload" keeps
    # those inputs in pinned host memory, "nested" keeps only each period's input and recomputes
    # the period's block inputs in its backward (one more forward pass, for the longest sequences)
    remat: str = "none"
    loss_chunk_size: int = 4096  # tokens whose logits the loss forms at a time
    # tokens of a row the dense MLP and Mamba-2 layers take at a time, each chunk rematerialised
    # on its own (Mamba-2 carries its conv window and SSM state from chunk to chunk), so a
    # layer's backward holds one chunk's internals instead of the row's; 0 = the whole row
    layer_chunk_size: int = 0

    # --- Mamba-2 (d_inner = mamba_heads * mamba_head_dim) -----------------------------------
    mamba_heads: int = 8
    mamba_head_dim: int = 32
    ssm_state: int = 32
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 64
    time_step_min: float = 1e-3
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    clamp_dt: bool = True  # dt >= time_step_min after softplus, as transformers NemotronH
    ssd_impl: str = "auto"
    # the conv + SiLU and the gated RMSNorm around the scan: auto (fused Pallas kernels on a GPU,
    # `hybridjax.kernels`), xla or pallas
    mamba2_glue_impl: str = "auto"

    # --- Mamba-3 (letter 3): sizes from the Mamba-2 fields above (mamba_heads, mamba_head_dim,
    # ssm_state, n_groups, chunk_size, time_step_*; no conv) ---------------------------------
    mamba3_mimo: bool = False  # MIMO (rank mamba3_mimo_rank) instead of SISO
    mamba3_mimo_rank: int = 4
    mamba3_rope_fraction: float = 0.5  # fraction of ssm_state channels the angles rotate (0: none)
    mamba3_a_floor: float = 1e-4  # A = min(-act(dd_A), -mamba3_a_floor)
    mamba3_a_act: str = "softplus"  # act of dd_A: softplus | heavy_tail
    mamba3_impl: str = "auto"  # the scan: auto | reference | chunked | pallas (SISO, GPU)

    # --- attention (GQA) ----------------------------------------------------------------------
    attn_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    rope_theta: float | None = None  # None = NoPE, as NemotronH
    rope_scaling: str | None = None  # context extension: linear | ntk | yarn
    rope_factor: float = 1.0
    rope_original_max_len: int = 4096
    attn_impl: str = "auto"  # cuDNN (packed documents too) on a GPU, else blockwise: O(L) memory
    # packed rows with more documents than this take the blockwise kernel instead of cuDNN's (its
    # backward workspace grows with it: rows x max x length x heads x head_dim in float32)
    attn_max_documents: int = 8
    # kv heads (with their query heads) one attention call takes, the calls one after another: the
    # kernels' buffers grow with their heads (cuDNN's packed backward workspace: rows x
    # attn_max_documents x length x heads x head_dim in float32), so long rows take fewer at a
    # time; 0 = all heads in one call
    attn_kv_heads_per_call: int = 0

    # --- MoE ----------------------------------------------------------------------------------
    n_experts: int = 8
    top_k: int = 2
    moe_ffn: int = 128
    shared_ffn: int = 0  # 0 = no shared expert
    router: str = "sigmoid"
    router_groups: int = 1  # expert groups for group-limited routing (NemotronH n_group)
    router_topk_groups: int = 1  # groups kept per token (NemotronH topk_group)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    expert_act: str = "relu2"
    moe_latent: int | None = None  # latent projection size for the routed experts
    moe_dispatch: str = "dropless"
    capacity_factor: float = 1.25
    grouped_matmul: str = "auto"
    ep_capacity_factor: float | None = None  # expert-parallel buffer bound; None = dropless

    # --- dense MLP ----------------------------------------------------------------------------
    ffn: int = 256
    mlp_act: str = "relu2"

    def __post_init__(self):
        _check_choice("pattern", set(self.pattern), LAYER_LETTERS, each=True)
        if not self.pattern:
            raise ValueError("pattern: must hold at least one layer letter (M, 3, *, E, -)")
        for name in ("dtype", "param_dtype"):
            _check_choice(name, getattr(self, name), DTYPES)
        _check_choice("ssd_impl", self.ssd_impl, SSD_IMPLS)
        _check_choice("mamba2_glue_impl", self.mamba2_glue_impl, NORM_IMPLS)
        _check_choice("mamba3_impl", self.mamba3_impl, MAMBA3_IMPLS)
        _check_choice("mamba3_a_act", self.mamba3_a_act, MAMBA3_A_ACTS)
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        _check_choice("router", self.router, ROUTERS)
        _check_choice("expert_act", self.expert_act, ACTIVATIONS)
        _check_choice("mlp_act", self.mlp_act, ACTIVATIONS)
        _check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        _check_choice("moe_dispatch", self.moe_dispatch, MOE_DISPATCH)
        _check_choice("grouped_matmul", self.grouped_matmul, GROUPED_MATMULS)
        _check_choice("remat", self.remat, REMAT_POLICIES)
        if self.remat == "nested" and not self.scan_layers:
            raise ValueError(
                "remat='nested' keeps one input per period of the layer scan, and with "
                "scan_layers=False the whole pattern is one period: set scan_layers=True"
            )
        for name in (
            "vocab_size",
            "d_model",
            "norm_eps",
            "initializer_range",
            "loss_chunk_size",
            "attn_max_documents",
        ):
            _check_positive(name, getattr(self, name))
        if self.attn_kv_heads_per_call < 0:
            raise ValueError(
                f"attn_kv_heads_per_call: must be >= 0 (0 = all heads in one call), got "
                f"{self.attn_kv_heads_per_call!r}"
            )
        if self.layer_chunk_size < 0:
            raise ValueError(
                f"layer_chunk_size: must be >= 0 (0 = the whole row), got {self.layer_chunk_size!r}"
            )
        if self.has("M"):
            self._check_mamba_sizes()
            _check_positive("conv_kernel", self.conv_kernel)
        if self.has("3"):
            self._check_mamba3()
        if self.has("*"):
            for name in ("attn_heads", "kv_heads", "head_dim"):
                _check_positive(name, getattr(self, name))
            if self.attn_heads % self.kv_heads:
                raise ValueError(
                    f"kv_heads: {self.kv_heads} must divide attn_heads ({self.attn_heads})"
                )
            if self.rope_theta is not None and self.head_dim % 2:
                raise ValueError(f"head_dim: must be even with RoPE, got {self.head_dim}")
            if self.rope_scaling is not None and self.rope_theta is None:
                raise ValueError("rope_scaling: needs rope_theta (RoPE); NoPE has nothing to scale")
        if self.has("E"):
            for name in ("n_experts", "top_k", "moe_ffn", "capacity_factor"):
                _check_positive(name, getattr(self, name))
            if self.ep_capacity_factor is not None:
                _check_positive("ep_capacity_factor", self.ep_capacity_factor)
            if self.top_k > self.n_experts:
                raise ValueError(f"top_k: {self.top_k} exceeds n_experts ({self.n_experts})")
            if self.n_experts % self.router_groups:
                raise ValueError(
                    f"router_groups: {self.router_groups} must divide n_experts ({self.n_experts})"
                )
            if not 1 <= self.router_topk_groups <= self.router_groups:
                raise ValueError(
                    f"router_topk_groups: must be in [1, router_groups="
                    f"{self.router_groups}], got {self.router_topk_groups}"
                )
        if self.has("-"):
            _check_positive("ffn", self.ffn)

    def _check_mamba_sizes(self):
        """The sizes Mamba-2 and Mamba-3 layers share."""
        for name in (
            "mamba_heads",
            "mamba_head_dim",
            "ssm_state",
            "n_groups",
            "chunk_size",
            "time_step_min",
            "time_step_max",
        ):
            _check_positive(name, getattr(self, name))
        if self.mamba_heads % self.n_groups:
            raise ValueError(
                f"n_groups: {self.n_groups} must divide mamba_heads ({self.mamba_heads})"
            )

    def _check_mamba3(self):
        self._check_mamba_sizes()
        for name in ("mamba3_mimo_rank", "mamba3_a_floor"):
            _check_positive(name, getattr(self, name))
        if self.ssm_state % 2:
            raise ValueError(
                f"ssm_state: must be even for Mamba-3 (its channels rotate in pairs), got "
                f"{self.ssm_state}"
            )
        _check_choice("mamba3_rope_fraction", self.mamba3_rope_fraction, MAMBA3_ROPE_FRACTIONS)
        if self.mamba3_rope_fraction and self.mamba3_angles < 1:
            raise ValueError(
                f"ssm_state: {self.ssm_state} x mamba3_rope_fraction "
                f"{self.mamba3_rope_fraction} leaves no channel pair to rotate; needs >= 2"
            )

    @property
    def mamba3_angles(self) -> int:
        """Rotation angles per Mamba-3 head (mamba_ssm's num_rope_angles): the rotated channels,
        ssm_state x mamba3_rope_fraction rounded down to even, in pairs."""
        rotated = int(self.ssm_state * self.mamba3_rope_fraction)
        return (rotated - rotated % 2) // 2

    def has(self, letter: str) -> bool:
        return letter in self.pattern

    @property
    def n_layers(self) -> int:
        return len(self.pattern)

    @property
    def d_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    def replace(self, **changes) -> HybridConfig:
        return dataclasses.replace(self, **changes)


def _check_choice(name, value, allowed, each=False):
    values = value if each else [value]
    bad = [v for v in values if v not in allowed]
    if bad:
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}: {bad[0]!r} is not allowed; choose from {shown}")


def _check_positive(name, value):
    if value is None or value <= 0:
        raise ValueError(f"{name}: must be > 0, got {value!r}")
