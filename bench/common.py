"""Shared pieces of the benchmarks: running one system in its own process, tables, results files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def run_worker(module: str, args: dict[str, Any], env: dict[str, str] | None = None,
               timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -m MODULE 'JSON'`` in a fresh process; it prints one JSON line last."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, "-m", module, json.dumps(args)], cwd=ROOT, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine() -> str:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"{cpu}, {os.cpu_count()} cores" + (f", GPU {gpu}" if gpu else "")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def table(title: str, headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table, printed and returned."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def write_results(name: str, sections: list[str], device: str = "cpu", out_dir: Path | None = None,
                  model: str | None = None) -> Path:
    """Write ``bench/results/NAME-DEVICE.md`` with date, commit and machine."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    header = (f"# {name} ({device})\n\nDate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  \n"
              f"Commit: {commit()}  \nMachine: {machine()}  \n" + (f"Model: {model}  \n" if model else "") +
              f"Command: `python -m bench {name}`\n\n")
    path = out_dir / f"{name}-{device}.md"
    path.write_text(header + "\n".join(sections))
    print(f"wrote {path}", flush=True)
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
