"""``python3 tools/gpu_check [flags]`` (or ``python3 -m tools.gpu_check``): see __init__.py."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a directory: the repository root, not tools/gpu_check/, must be importable.
    sys.path.insert(0, str(Path(__file__).absolute().parents[2]))

from tools.gpu_check.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
