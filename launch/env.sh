# Environment for multi-GPU runs on H100 / H200 nodes: `source launch/env.sh` before launching
# (launch/slurm.sbatch does). A variable exported before sourcing keeps its value; XLA_FLAGS is
# appended to. The XLA flags exist in the XLA of jax 0.10 and 0.11 (XLA rejects unknown ones at
# start-up, so `python launch/preflight.py` after sourcing this checks them).

# --- XLA: overlap collectives with compute --------------------------------------------------
xla_flags=(
  # Schedule each asynchronous collective as early as its inputs allow and its wait as late as
  # possible, so NCCL transfers run under the matmuls instead of between them.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Combine the many per-parameter collectives of one kind (data parallel's gradient
  # all-reduce; fsdp's parameter all-gathers and gradient reduce-scatters) into NCCL calls of up
  # to this many bytes: fewer, larger transfers. 128 MiB; lower it when memory is tight.
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  # The layers run as one scanned loop (nnx.scan): start the next layer's fsdp all-gather, and
  # finish the previous layer's reduce-scatter / all-reduce, during this layer's compute.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # Unroll that loop by two so the pipelined collectives get a second buffer to land in.
  --xla_gpu_enable_while_loop_double_buffering=true
)
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }${xla_flags[*]}"
unset xla_flags

# JAX preallocates this fraction of each GPU's memory at start-up (default 0.75). 0.92 leaves
# room for NCCL's buffers and cuBLAS / cuDNN workspaces (the 1B step of README's Performance
# section ran at 0.92).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

# Compiled programs are kept here and reused by the next launch (a resumed or requeued job
# starts in seconds, not minutes). Put it on storage every node sees.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/hybridjax-jax}"

# --- NCCL --------------------------------------------------------------------------------------
# NVLink SHARP (NVLS: multicast all-reduce in the NVSwitch) stays OFF. On some systems (fabric
# manager / driver combinations, GPUs shared between jobs, containers without the IMEX
# channels) NCCL's NVLS set-up hangs or fails, and a failure can leave the node's GPUs unusable
# for others until it is reset. Turn it on only on nodes whose admins support it, and measure
# that it helps (it speeds up large all-reduces inside a node): export NCCL_NVLS_ENABLE=1
# before sourcing this file, then check the run with `python launch/preflight.py`.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
# WARN prints problems only; INFO also shows the chosen transports (NVLink, IB, sockets), which
# is the first thing to look at when a multi-node all-reduce is slow.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Site-specific, set them as your cluster's documentation says, e.g.:
#   export NCCL_SOCKET_IFNAME=ib0,eth0   # the interface(s) for NCCL's bootstrap and sockets
#   export NCCL_IB_HCA=mlx5              # which InfiniBand adapters NCCL may use
