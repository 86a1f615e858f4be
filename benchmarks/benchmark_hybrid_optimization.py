"""The design document's benchmark script, kept under its name: a thin wrapper of `hybridopt bench`.

    python benchmarks/benchmark_hybrid_optimization.py [bench flags]   # = hybridopt bench [bench flags]

Every flag of `hybridopt bench` works here (`--quick`, `--task`, `--arms`, `--out`...); see docs/GUIDE.md.
"""

from __future__ import annotations

import sys

from hybridopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
