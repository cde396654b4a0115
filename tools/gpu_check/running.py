"""Child processes under a time limit: output echoed and logged, SIGINT then SIGKILL."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

# Seconds given to a timed-out child between SIGINT (pytest still writes its summary
# and JUnit file) and SIGKILL.
GRACE_S = 15.0
# Echoed to the console per command; gpu_check.log has everything (up to LOG_CAP bytes).
ECHO_LINES = 400
LOG_CAP = 15 * 2**20


@dataclasses.dataclass
class Result:
    """What a child process did: exit code, output lines, whether it ran out of time."""

    returncode: int
    lines: list[str]
    seconds: float
    timed_out: bool = False

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class Log:
    """Every child's output, in one file under --out, capped at LOG_CAP bytes."""

    def __init__(self, path: Path):
        self.path, self.size = path, 0
        self.file = open(path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115

    def write(self, text: str) -> None:
        if self.size >= LOG_CAP:
            return
        self.size += len(text)
        self.file.write(text if self.size < LOG_CAP else text + "\n[log capped]\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # The child leads its own group (start_new_session).


def run_command(
    cmd: list[str],
    *,
    timeout: float,
    env: dict | None = None,
    cwd: str | Path | None = None,
    log: Log | None = None,
    echo: int = ECHO_LINES,
) -> Result:
    """Runs ``cmd``, echoing its output; past ``timeout`` s: SIGINT, then SIGKILL.

    The child and everything it starts form one process group, so a timeout also
    ends the grandchildren (pytest workers, compute-sanitizer's target).
    """
    printable = shlex.join(str(c) for c in cmd)
    print(f"  $ {printable}", flush=True)
    if log:
        log.write(f"\n$ {printable}\n")
    start = time.monotonic()
    if timeout <= 0:
        return Result(124, ["no time left for this command"], 0.0, timed_out=True)
    try:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as e:
        return Result(127, [f"cannot run {cmd[0]}: {e}"], 0.0)
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if log:
                log.write(line + "\n")
            if len(lines) <= echo:
                print(f"  | {line}", flush=True)
            elif len(lines) == echo + 1:
                print("  | ... (the rest is in gpu_check.log)", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        print(f"  ! time limit {timeout:.0f} s reached: SIGINT, then SIGKILL", flush=True)
        _kill_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=GRACE_S)
    if len(lines) > echo:
        print(f"  | ... {len(lines) - echo} more lines in gpu_check.log", flush=True)
    return Result(proc.returncode, lines, time.monotonic() - start, timed_out)
