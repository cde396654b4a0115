#!/usr/bin/env python3
"""Fetch the wheels gpu_check installs on a CUDA machine, into DIR (default .whl).

    python3 tools/gpu_check/wheels.py [DIR]
    python3 tools/gpu_check --out OUT --wheels DIR        # then, on the CUDA machine

The CUDA machines this project is checked on run CPython 3.12 with jax/jaxlib 0.11.2
and the CUDA 13 plugin, triton 3.6.0, flax, pytest and matplotlib (the versions of the
``gpu_image`` stack, requirements_gpu_image.in), but no jax-triton, which the ``triton``
backend needs: jax-triton 0.3.1 is the release for triton 3.6 (0.4 needs triton >= 3.7).
Such a machine may have no network, so the wheel is fetched beforehand on a machine
that has one: ``pip download`` for CPython 3.12 on manylinux x86_64, with ``--no-deps``.
Each wheel's Requires-Dist is then checked against the machine's recorded versions
(MACHINE), so that nothing installed needs, or brings, another jax. It exits non-zero
when a requirement is not met by the machine (name it in WHEELS too) or when DIR holds a
wheel of a package the machine already has (it would shadow the machine's own).

DIR is ignored by git (.whl/ in .gitignore); copy it to the CUDA machine with the
checkout. See README, "GPU tests".
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = ("jax-triton==0.3.1",)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# The CUDA machine's packages, as read on such a machine in 2026-11; None: installed,
# version not recorded.
MACHINE = {
    "jax": "0.11.2",
    "jaxlib": "0.11.2",
    "jax-cuda13-plugin": "0.11.2",
    "jax-cuda13-pjrt": "0.11.2",
    "triton": "3.6.0",
    "numpy": "2.5.2",
    "torch": "2.11.0",
    "absl-py": None,
    "flax": None,
    "optax": None,
    "pytest": None,
    "hypothesis": None,
    "matplotlib": None,
    "ml-dtypes": None,
    "typing-extensions": None,
}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_cls():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it.
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines that apply without extras."""
    with zipfile.ZipFile(wheel) as z:
        [metadata] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        text = z.read(metadata).decode()
    found = re.findall(r"^Requires-Dist: (.+)$", text, re.M)
    return [r.strip() for r in found if "extra ==" not in r]


def check(directory: Path) -> list[str]:
    """Problems with the wheels in ``directory`` on the CUDA machine; empty when none."""
    Requirement = _requirement_cls()
    wheels = sorted(directory.glob("*.whl"))
    fetched = {_normalize(w.name.split("-")[0]): w for w in wheels}
    problems = []
    if not wheels:
        problems.append(f"{directory} holds no *.whl")
    for name, wheel in fetched.items():
        if name in MACHINE:
            problems.append(
                f"{wheel.name}: the machine has {name} already; installing it shadows it"
            )
    for wheel in wheels:
        for text in requirements(wheel):
            req = Requirement(text)
            name = _normalize(req.name)
            if name in fetched:
                print(f"  {wheel.name}: {text}: fetched too")
                continue
            if name not in MACHINE:
                problems.append(f"{wheel.name} needs {text}: not on the machine; fetch it too")
                continue
            have = MACHINE[name]
            if have is None:
                print(f"  {wheel.name}: {text}: on the machine (version not recorded)")
            elif req.specifier.contains(have, prereleases=True):
                print(f"  {wheel.name}: {text}: the machine has {have}")
            else:
                problems.append(f"{wheel.name} needs {text}; the machine has {name} {have}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(__doc__, file=sys.stderr)
        return 2
    directory = Path(argv[0] if argv else ".whl")
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += ["-d", str(directory), *WHEELS]
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode:
        print("wheels: pip download failed", file=sys.stderr)
        return 1
    problems = check(directory)
    total = sum(w.stat().st_size for w in directory.glob("*.whl"))
    for problem in problems:
        print(f"wheels: {problem}", file=sys.stderr)
    names = ", ".join(w.name for w in sorted(directory.glob("*.whl")))
    print(f"wheels: {directory}: {names} ({total / 1024:.0f} KiB)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
