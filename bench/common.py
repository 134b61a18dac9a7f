"""Shared pieces of the benchmarks: running one system in its own process, tables, results files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
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


def preset_of(config_name: str) -> str:
    """The shipped preset (``tiny``, ``default``) whose model name a checkpoint's config carries.

    Any other name (a config of your own) counts as ``default``.
    """
    from stepwise.config import PRESETS, load_config

    presets = {load_config(path).name: path.stem for path in PRESETS.glob("*.json")}
    return presets.get(config_name, "default")


def write_results(name: str, sections: list[str], device: str = "cpu", out_dir: Path | None = None,
                  model: str | None = None, preset: str | None = None) -> Path:
    """Write ``bench/results/NAME-DEVICE.md`` with date, commit and machine.

    A model of another preset than ``default`` (``preset="tiny"``) writes ``NAME-PRESET-DEVICE.md``, so
    the tables of both presets stand side by side.
    """
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    header = (f"# {name} ({device})\n\nDate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  \n"
              f"Commit: {commit()}  \nMachine: {machine()}  \n" + (f"Model: {model}  \n" if model else "") +
              f"Command: `python -m bench {name}`\n\n")
    tag = f"-{preset}" if preset and preset != "default" else ""
    path = out_dir / f"{name}{tag}-{device}.md"
    path.write_text(header + "\n".join(sections))
    print(f"wrote {path}", flush=True)
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- resident memory of a process tree (Linux /proc) -----------------------------------------------
def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it (``bentoml serve`` starts one per service)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])  # the name may hold spaces and brackets
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def rss_mib(pids: list[int]) -> float:
    """The summed resident memory of ``pids`` in MiB (processes that have exited count 0).

    RSS counts a page shared by two processes twice; for the services here the shared part is
    the Python and library code, a few tens of MiB.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**20


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, in MiB."""
    return rss_mib(process_tree(pid))


class PeakRss:
    """Samples a process tree's RSS in a thread (every ``interval`` s) while the block runs.

    The tree is listed once at the start (the services' processes do not change under load), so
    a sample reads a few ``statm`` files and takes little CPU from what is measured.
    """

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pids = process_tree(pid)
        self.interval = interval
        self.peak_mib = rss_mib(self.pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="peak-rss")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mib = max(self.peak_mib, rss_mib(self.pids))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, rss_mib(self.pids))


def verdict(ratio: float, target: float, *, at_least: bool) -> str:
    """``met`` or ``not met`` for a ratio against a target (``at_least``: ≥ target, else ≤ target)."""
    return "met" if (ratio >= target if at_least else ratio <= target) else "not met"
