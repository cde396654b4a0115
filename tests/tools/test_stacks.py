"""tools/stacks.bzl is the one list of JAX stacks: what repeats it must agree with it."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _stacks() -> dict:
    tree = ast.parse((ROOT / "tools/stacks.bzl").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "STACKS":
            return ast.literal_eval(node.value)
    raise AssertionError("tools/stacks.bzl has no STACKS literal")


def _pin(lock: str, package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)", (ROOT / lock).read_text(), re.M)
    assert match, f"{lock} pins no {package}"
    return match.group(1)


def _readme_rows() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Supported stacks") :]
    section = section[: section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.match(r"`(\w+)`", cells[0]) if len(cells) > 1 else None
        if name and re.fullmatch(r"\d+\.\d+", cells[1]):
            rows[name.group(1)] = cells
    return rows


def test_readme_table_is_the_stacks_of_stacks_bzl():
    stacks, rows = _stacks(), _readme_rows()
    assert sorted(rows) == sorted(stacks)
    for name, stack in stacks.items():
        python, jax, triton, jax_triton, flax, lock = rows[name][1:7]
        assert python == stack["python"], name
        assert lock == f"`{stack['lock']}`", name
        for package, shown in (
            ("jax", jax.split(" ")[0]),
            ("triton", triton),
            ("jax-triton", jax_triton),
            ("flax", flax),
        ):
            assert _pin(stack["lock"], package) == shown, (name, package)


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
