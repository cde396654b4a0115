"""Reading the children's results (JUnit XML, pytest's last line) and writing summary.md."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.options import PASSES, XLA_PROVIDERS
from tests.gpu_selection import REQUIRED


def shape_text(r: dict) -> str:
    return f"T={r['num_tokens']} D={r['d_model']} V={r['vocab_size']} {r['dtype']} {r['ids']}"


def junit_counts(path: Path) -> dict:
    """Passed, failed (failures and errors), skipped, with skip reasons, from JUnit XML."""
    counts = {
        "total": 0,
        "passed": 0,
        "failed": 0,
        "skipped": 0,
        "failures": [],
        "skip_reasons": {},
        "names": {},  # Test id -> "passed", "failed" or "skipped".
    }
    if not path.exists():
        return counts
    try:
        cases = list(ET.parse(path).iter("testcase"))
    except ET.ParseError:
        return counts
    for case in cases:
        counts["total"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        tags = {child.tag: child for child in case}
        if "failure" in tags or "error" in tags:
            status = "failed"
            counts["failures"].append(name)
        elif "skipped" in tags:
            status = "skipped"
            reason = (tags["skipped"].get("message") or "").strip()
            counts["skip_reasons"][reason] = counts["skip_reasons"].get(reason, 0) + 1
        else:
            status = "passed"
        counts[status] += 1
        counts["names"][name] = status
    return counts


def coverage(counts: dict) -> dict[str, tuple[int, int]]:
    """For each ``tests.gpu_selection.REQUIRED`` entry: (tests passed, tests run or skipped)."""
    out = {}
    for what, part in REQUIRED.items():
        found = [status for name, status in counts["names"].items() if part in name]
        out[what] = (found.count("passed"), len(found))
    return out


def format_counts(counts: dict) -> str:
    text = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if counts["failures"]:
        text += "; failed: " + ", ".join(counts["failures"][:10])
    return text


def pytest_line(lines: list[str]) -> str:
    """pytest's closing line ("=== 3 passed, 1 skipped in 2.0s ===" or its -q form)."""
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|skipped|deselected|error)|no tests ran", line):
            return line.strip("= ")
    return ""


# --- summary.md -------------------------------------------------------------------------


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def headline(rows: list[dict]) -> list[str]:
    """Per provider and pass: vs xla and vs copy, geometric mean [min, max] over shapes."""
    measured = [r for r in rows if r["median_ms"] is not None and r["in_comparison"]]
    providers = [p for p in dict.fromkeys(r["provider"] for r in measured) if p != "copy"]
    providers.sort(key=lambda p: (p in XLA_PROVIDERS, p != "xla"))
    out = [
        "| provider | pass | shapes | vs xla: geomean [min, max] | vs copy: geomean [min, max] "
        "| fwd bit-identical to xla |",
        "|---|---|---|---|---|---|",
    ]
    for provider in providers:
        for pass_ in PASSES:
            sel = [r for r in measured if r["provider"] == provider and r["pass"] == pass_]
            if not sel:
                continue
            cells = []
            for key in ("vs_xla", "vs_copy"):
                vals = [r[key] for r in sel if r[key]]
                cells.append(
                    f"{_geomean(vals):.2f} [{min(vals):.2f}, {max(vals):.2f}]" if vals else "-"
                )
            same = [
                r["matches_xla"] for r in rows if r["provider"] == provider and r["pass"] == "fwd"
            ]
            same = [s for s in same if s is not None]
            bits = "-" if pass_ != "fwd" or not same else f"{sum(same)} of {len(same)} shapes"
            label = sel[0]["label"]
            out.append(f"| {label} | {pass_} | {len(sel)} | {cells[0]} | {cells[1]} | {bits} |")
    return out


def per_shape(rows: list[dict]) -> list[str]:
    """One line per shape and pass: copy GB/s, then each provider's vs xla / vs copy."""
    measured = [r for r in rows if r["median_ms"] is not None and r["in_comparison"]]
    providers = [p for p in dict.fromkeys(r["provider"] for r in measured) if p not in ("copy",)]
    head = (
        "| shape | pass | copy GB/s | "
        + " | ".join(f"{p}: vs xla / vs copy" for p in providers)
        + " |"
    )
    out = [head, "|" + "---|" * (3 + len(providers))]
    keyed = {}
    for r in measured:
        keyed.setdefault((shape_text(r), r["pass"]), {})[r["provider"]] = r
    for (shape, pass_), group in keyed.items():
        copy = group.get("copy")
        cells = []
        for p in providers:
            r = group.get(p)
            if r is None:
                cells.append("-")
            else:
                vx = "-" if r["vs_xla"] is None else f"{r['vs_xla']:.2f}"
                cells.append(f"{vx} / {r['vs_copy']:.2f}" if r["vs_copy"] else vx)
        gbps = f"{copy['gbps']:.0f}" if copy else "-"
        out.append(f"| {shape} | {pass_} | {gbps} | " + " | ".join(cells) + " |")
    return out


def render_summary(check) -> str:
    """summary.md of a ``steps.Check``: versions, results, ratios, then every step."""
    s = check.steps
    v = s["versions"].data
    info = v.get("python", {})
    packages = dict(info.get("packages", {}))
    packages.update(s["wheels"].data.get("installed", {}))
    added = s["wheels"].data.get("installed", {})
    device = "; ".join(v.get("gpus", [])) or ", ".join(info.get("devices", [])) or "unknown"
    when = check.started.strftime("%Y-%m-%d %H:%M UTC")
    lines = []
    if check.dry:
        lines += [
            f"## DRY RUN on {device} ({when}): not GPU figures, do not paste",
            "",
            "The same steps in their CPU form; what each left out is said below.",
        ]
    else:
        lines += [f"## GPU figures: {device} ({when})"]
    lines += [
        "",
        f"- Device: {device}; driver CUDA {v.get('cuda_driver') or '-'}; nvcc "
        f"{v.get('nvcc') or '-'}; JAX devices {info.get('devices', '-')}",
        f"- Python {info.get('python', '?')} ({info.get('executable', '?')})",
        "- Versions: "
        + ", ".join(
            f"{n} {packages[n]}" + (" (from --wheels)" if n in added else "")
            for n in dict.fromkeys([*info.get("packages", {}), *added])
            if n in packages
        ),
        f"- Command: `{check.command}` (commit {check.commit}; budget {check.args.budget:.0f} s)",
    ]
    t = s["tests"]
    if t.status == "not run":
        lines.append("- Tests: not run")
    else:
        lines.append(
            f"- Tests (`{t.data.get('command', '')}`): **{t.status.upper()}**, "
            f"{format_counts(t.data.get('counts', junit_counts(Path('/nonexistent'))))}"
        )
    cover = t.data.get("coverage", {})
    if cover:
        lines.append(
            "- The gpu tests cover: "
            + "; ".join(f"{what} ({p} of {n} passed)" for what, (p, n) in cover.items())
        )
    z = s["sanitizer"]
    if z.status == "not run":
        lines.append("- compute-sanitizer memcheck: not run")
    elif "errors" in z.data:
        lines.append(
            f"- compute-sanitizer memcheck on the out-of-range and large-table tests "
            f"(`{z.data.get('command')}`): **{z.status.upper()}**, "
            f"{z.data['errors'] if z.data['errors'] is not None else 'no'} errors; tests "
            f"{format_counts(z.data.get('counts', {}))}"
        )
    else:
        lines.append(f"- compute-sanitizer memcheck: **{z.status.upper()}**, " + "; ".join(z.notes))
    b = s["benchmark"]
    rows = b.data.get("rows", [])
    lines += [f"- Benchmark (`{b.data.get('command', 'not run')}`): **{b.status.upper()}**"]
    if rows:
        lines += [
            "",
            "### Headline ratios",
            "",
            "`vs xla` = time / xla's time (below 1 is faster); `vs copy` = GB/s / the copy's "
            "GB/s for the same bytes (1.0 is the ceiling); both within this run.",
            "",
            *headline(rows),
            "",
            "### Per shape",
            "",
            *per_shape(rows),
        ]
        choose = b.data.get("choose", [])
        if choose:
            lines += ["", "### What `auto` picks (`--choose`)", "", "```", *choose, "```"]
    compiled = b.data.get("compiled")
    if compiled:
        lines += ["", "### Compiled by XLA for an H100, NOT MEASURED (tools/sass_report.py)"]
        lines += ["", compiled]
    lines += [
        "",
        "### Steps",
        "",
        "| step | result | seconds | limit | notes |",
        "|---|---|---|---|---|",
    ]
    for step in s.values():
        notes = [n for n in step.notes if "skipped" in n or "FAIL" in n or "dry run" in n]
        notes = "; ".join(" ".join(n.replace("|", "/").split())[:300] for n in notes)
        lines.append(
            f"| {step.name} | {step.status} | {step.seconds:.0f} | {step.limit:.0f} | {notes} |"
        )
    return "\n".join(lines) + "\n"
