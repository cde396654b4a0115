"""//tools:lint_test: `ruff check` and `ruff format --check` over the repo's *.py files.

Usage: lint_runner.py RUFF CONFIG   (runfiles-relative paths)

It lints every *.py file and Python script (by shebang) of this repo in its
runfiles, i.e. the lint test's data: //:all_py and the per-package targets listed
in tools/BUILD. As a guard, it also lists the Python files of the source tree
(found through the runfiles' links) and fails if some are not among its inputs,
naming the packages to add.
"""

import os
import subprocess
import sys


def _is_python(path: str) -> bool:
    """A *.py file, or an extensionless script whose shebang runs Python."""
    if path.endswith(".py"):
        return True
    if "." in os.path.basename(path):
        return False
    with open(path, "rb") as f:
        first = f.readline(200)
    return first.startswith(b"#!") and b"python" in first


def _py_files(top: str, skip: tuple[str, ...]) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not d.startswith(skip)]
        for f in filenames:
            if _is_python(os.path.join(dirpath, f)):
                found.add(os.path.relpath(os.path.join(dirpath, f), top))
    return found


def main(argv: list[str]) -> int:
    ruff, config = argv
    skip = (".", "bazel-", "__pycache__", "external")
    src_root = os.path.dirname(os.path.realpath(config))
    # cwd: <runfiles>/<workspace>. Only files from the source tree: Bazel's generated
    # py_binary launchers are Python scripts too.
    files = sorted(
        f
        for f in _py_files(".", skip)
        if os.path.realpath(f).startswith(os.path.join(src_root, ""))
    )
    missing = sorted(_py_files(src_root, skip) - set(files))
    if missing:
        pkgs = sorted({os.path.dirname(m) or "(root)" for m in missing})
        print("lint_test: these *.py files are not inputs of //tools:lint_test:")
        print("  " + "\n  ".join(missing))
        print("In each of these packages add an `all_py` filegroup and list it in tools/BUILD:")
        print("  " + "\n  ".join(pkgs))
        return 1
    cmds = [
        [ruff, "check", "--no-cache", "--config", config, *files],
        [ruff, "format", "--check", "--no-cache", "--config", config, *files],
    ]
    failed = False
    for cmd in cmds:
        print(f"$ ruff {cmd[1]} ... ({len(files)} files)", flush=True)
        failed |= subprocess.call(cmd) != 0
    print("lint: FAILED" if failed else f"lint: OK ({len(files)} files)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
