"""The benchmark suite as a script: the same as ``gradstats bench`` (see gradstats/bench.py).

    python benchmarks/run_suite.py           # everything; writes results/suite_<device>.*
    python benchmarks/run_suite.py --quick   # a smoke run, prints only
    python benchmarks/run_suite.py --models mlp --no-micro --device cpu
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradstats.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
