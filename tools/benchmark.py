"""``python tools/benchmark.py [flags]``: the main benchmark job, ``bench.lookup``, from a checkout.

The same as ``python -m bench.lookup [flags]`` from the repository root, and as
``bazel run //tools:benchmark -- [flags]``; bench/lookup.py documents the flags.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: the repository root, not tools/, must be on the import path.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import lookup  # noqa: E402

if __name__ == "__main__":
    lookup.main()
