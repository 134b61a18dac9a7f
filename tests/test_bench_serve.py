"""The serving benchmark's new measurements, on a tiny export: what they compute, never how fast.

``python -m bench serve`` compares the service with its engine (``engine_speed``), sizes the
answer per ``attention_format`` and checks the explorer client's decoding (``attention_payload``),
and reads the resident memory of the ``bentoml serve`` process tree (``tree_rss_mib``,
``PeakRss``, ``memory_with_versions``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.__main__ import _load, _serve, _stop, attention_payload, engine_speed, memory_with_versions
from bench.common import PeakRss, process_tree, rss_mib, tree_rss_mib
from bench.load import bench_stream

from support.models import SAMPLE_PAIRS, export_tiny_model

pytestmark = pytest.mark.integration

# a parent whose child fills 200 MiB, then (on a line on stdin) frees it and waits
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=sys.stdin)
child.wait()
"""
CHILD = """
import sys
block = bytearray(200 * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
print("full", flush=True)
sys.stdin.readline()
del block
print("freed", flush=True)
sys.stdin.readline()
"""


def test_tree_rss_counts_the_children_and_the_peak_outlives_a_free() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert parent.stdout.readline().strip() == "full"
        tree = process_tree(parent.pid)
        assert len(tree) == 2 and tree[0] == parent.pid
        assert tree_rss_mib(parent.pid) - rss_mib([parent.pid]) >= 195  # the child's 200 MiB count
        with PeakRss(parent.pid, interval=0.02) as peak:
            time.sleep(0.1)
            parent.stdin.write("\n")
            parent.stdin.flush()
            assert parent.stdout.readline().strip() == "freed"
            time.sleep(0.1)
        assert tree_rss_mib(parent.pid) < peak.peak_mib - 150  # freed now, yet the peak kept it
        parent.stdin.write("\n")
        parent.stdin.flush()
        parent.wait(timeout=30)
        assert rss_mib(tree) == 0  # processes that have exited count nothing
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has exited


def test_stop_takes_down_the_children_a_terminated_parent_leaves_behind() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout.readline().strip() == "full"
    child = process_tree(parent.pid)[1]
    _stop(parent)  # SIGTERM ends the parent only; the child would live on, an orphan
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny export of its own: the registry test's service exports this checkpoint again, and the
    session's export (a long positional table) would make that slower."""
    return export_tiny_model(tmp_path_factory.mktemp("bench"), seed=7)


TEXTS = [source for source, _ in SAMPLE_PAIRS]


def test_engine_speed_decodes_the_same_tokens_with_and_without_attention(tiny: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    _, export = tiny
    engine = engine_speed(export, TEXTS * 2, tmp_path)
    assert set(engine) == {(1, False), (1, True), (32, False), (32, True)}
    for result in engine.values():
        assert len(result["outputs"]) == 2 * len(TEXTS) and all(result["outputs"])
        assert result["sentences_per_s"] > 0 and result["ms_per_sentence_median"] > 0
        assert result["outputs"] == engine[(1, False)]["outputs"]  # batching and attention change no token


def test_payload_formats_and_load_against_a_served_export(tiny: tuple[Path, Path]) -> None:
    _, export = tiny
    process, url, _ = _serve(export, True, {"STEPWISE_ORT_THREADS": "1"})
    try:
        idle = tree_rss_mib(process.pid)
        assert len(process_tree(process.pid)) >= 2  # the CLI and the service worker (it counts the tree)
        rows = attention_payload(url, TEXTS[0])
        by = {(kind, fmt): row for kind, fmt, *row in rows}
        assert set(by) == {("none", "—")} | {(k, f) for k in ("cross", "all") for f in ("json", "float16", "uint10")}
        for kind in ("cross", "all"):
            json_bytes = by[(kind, "json")][0]
            assert json_bytes > by[("none", "—")][0]
            for fmt in ("float16", "uint10"):
                size, ratio, error, _ = by[(kind, fmt)]
                assert size < json_bytes and ratio == pytest.approx(size / json_bytes)
                assert 0 < float(error) <= 1e-3  # decoded by the explorer's client, compared with JSON
        assert by[("all", "uint10")][0] > by[("cross", "uint10")][0]
        with PeakRss(process.pid) as peak:
            for fmt in ("json", "uint10"):
                result = _load(url, TEXTS * 2, 4, "cross", fmt)
                assert result["errors"] == 0 and result["p50"] <= result["p99"]
        assert peak.peak_mib >= idle > 50
        rows = bench_stream(url, TEXTS, (1, 3))
        assert [row[0] for row in rows] == [1, 3] and all(row[-1] == 0 for row in rows)  # no errors
        for _, first_p50, first_p95, total, plain, ratio, _ in rows:
            assert 0 < first_p50 <= first_p95 and first_p50 <= total and ratio == pytest.approx(total / plain)
    finally:
        _stop(process)


def test_memory_with_versions_fills_the_cache_from_a_registry(tiny: tuple[Path, Path]) -> None:
    checkpoint, export = tiny
    memory = memory_with_versions(checkpoint, export, TEXTS[0], 2)  # raises unless the service cached both
    assert memory["cached"] > memory["idle"] > 50 and memory["first"] > memory["idle"]
