"""tools/stacks.bzl is the one list of JAX stacks: what repeats it must agree with it."""

from __future__ import annotations

import pathlib
import re

from tools import stacks as stacks_table

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _stacks() -> dict:
    return stacks_table.stacks(ROOT)


def _pin(lock: str, package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)", (ROOT / lock).read_text(), re.M)
    assert match, f"{lock} pins no {package}"
    return match.group(1)


def test_the_table_is_each_lock_s_pins():
    """``python3 tools/stacks.py``: a row per stack of stacks.bzl, its versions from its lock."""
    text = stacks_table.table(ROOT)
    lines = text.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {line.split("|")[1].strip().strip("`"): line for line in lines[2:]}
    assert sorted(rows) == sorted(_stacks())
    for name, stack in _stacks().items():
        cells = dict(zip(head, (c.strip() for c in rows[name].strip("|").split("|")), strict=True))
        assert cells["CPython"] == stack["python"], name
        assert cells["lock"] == f"`{stack['lock']}`", name
        for package in ("jax", "jaxlib", "triton", "jax-triton", "flax"):
            assert cells[package] == _pin(stack["lock"], package), (name, package)


def test_readme_names_no_stack_versions_the_locks_do_not():
    """README's range is the range of the locks' jax pins (tools/stacks.bzl's ends)."""
    text = (ROOT / "README.md").read_text()
    versions = sorted(
        (_pin(s["lock"], "jax") for s in _stacks().values()),
        key=lambda v: [int(p) for p in v.split(".")],
    )
    low, high = versions[0], ".".join(versions[-1].split(".")[:2]) + ".x"
    assert f"jax/jaxlib {low} to {high}" in text, (low, high)


def test_each_lock_is_for_its_stacks_python():
    for stack in _stacks().values():
        header = (ROOT / stack["lock"]).read_text().splitlines()[0]
        assert f"CPython {stack['python']}" in header, (stack["lock"], header)


def test_no_other_build_file_lists_the_stacks():
    """WORKSPACE, the rules, .bazelrc and .ci/run read stacks.bzl instead of naming them."""
    names = [re.escape(n) for n in _stacks() if n != "min"]
    for path in ("WORKSPACE", "tools/pytest.bzl", "tools/BUILD", ".bazelrc", ".ci/run"):
        text = (ROOT / path).read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        found = re.findall(rf"\b(?:{'|'.join(names)})\b", code)
        assert not found, (path, found)
        for stack in _stacks().values():
            assert stack["lock"] not in code, (path, stack["lock"])
