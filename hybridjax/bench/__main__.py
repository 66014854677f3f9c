"""`python -m hybridjax.bench <benchmark> [options]`; benchmarks: ssd, mamba3, step, mesh,
attention, profile, grouped_matmul, conv."""

import importlib
import sys

BENCHMARKS = {
    "ssd": "hybridjax.bench.ssd",
    "mamba3": "hybridjax.bench.mamba3",
    "step": "hybridjax.bench.step",
    "mesh": "hybridjax.bench.mesh",
    "attention": "hybridjax.bench.attention",
    "profile": "hybridjax.bench.profile",
    "grouped_matmul": "hybridjax.bench.grouped_matmul",
    "conv": "hybridjax.bench.conv",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(
            f"usage: python -m hybridjax.bench {{{','.join(BENCHMARKS)}}} [options] "
            f"(add --help after the name for its options)",
            file=sys.stderr,
        )
        return 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
