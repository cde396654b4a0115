"""The JAX stacks, as a table: what each stack of tools/stacks.bzl pins in its lock.

    python3 tools/stacks.py            # from a checkout (or: bazel run //tools:stacks)

tools/stacks.bzl is the one list of stacks; this reads it (``STACKS`` is a Python
literal) and each stack's lock, so adding a stack is an entry there and its lock.
"""

from __future__ import annotations

import ast
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The packages whose versions tell the stacks apart.
PACKAGES = ("jax", "jaxlib", "triton", "jax-triton", "flax", "jax-cuda13-plugin", "torch")


def stacks(root: pathlib.Path = ROOT) -> dict[str, dict]:
    """``STACKS`` of tools/stacks.bzl: name -> {"python", "lock", "repo", "about"}."""
    tree = ast.parse((root / "tools/stacks.bzl").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "STACKS":
            return ast.literal_eval(node.value)
    raise ValueError(f"{root / 'tools/stacks.bzl'} has no STACKS literal")


def pins(lock: pathlib.Path) -> dict[str, str]:
    """``name==version`` lines of a lock, by normalised name."""
    found = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock.read_text(), re.M)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in found}


def table(root: pathlib.Path = ROOT) -> str:
    """A Markdown table: each stack, its CPython, the pins of ``PACKAGES``, its lock."""
    head = ["stack", "CPython", *PACKAGES, "lock", "what it is"]
    rows = [head, ["---"] * len(head)]
    for name, stack in stacks(root).items():
        pinned = pins(root / stack["lock"])
        versions = [pinned.get(package, "-") for package in PACKAGES]
        rows.append([f"`{name}`", stack["python"], *versions, f"`{stack['lock']}`", stack["about"]])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


if __name__ == "__main__":
    root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    print(table(root))
