"""``python -m bench {all,train,translate,serve,export,headmask,alignment,contributions} [--checkpoint PATH]
[--sentences N]``.

``serve`` also measures the service against its engine (``OnnxTranslator`` offline on the same
sentences), the answer's size per ``attention_format``, and the service's resident memory (idle,
under 32 clients, and with registry versions in its model cache).

Every table prints ratios against a baseline measured in the same invocation; each system runs
in its own process. Results go to ``bench/results/NAME-DEVICE.md`` (date, commit, machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from bench.common import ROOT, PeakRss, preset_of, process_tree, run_worker, table, tree_rss_mib, verdict, write_results
from bench.load import STREAM_HEADERS, bench_stream, run_load
from stepwise.net import ServerNotReady, wait_until_ready


def find_checkpoint(path: str | None) -> Path:
    """The checkpoint to measure: the given one, the registry's production version, or a fresh
    default-size model (throughput does not depend on training, agreement checks do not either)."""
    if path:
        return Path(path)
    if os.environ.get("CLEARML_API_HOST"):
        from stepwise.registry import client as registry

        try:
            return registry.resolve(None, None, tag="production").path
        except Exception as exc:  # noqa: BLE001
            print(f"no production model in the registry ({exc}); using an untrained default-size model")
    return _fresh_checkpoint()


UNTRAINED = "untrained.pt"
UNTRAINED_SENTENCES = 120  # an untrained model never stops before the length limit (2S+10)


def describe(checkpoint: Path) -> tuple[str, str]:
    """What was measured, for the results header (no paths), and the shipped preset it was trained with.

    The preset is the one whose model name the checkpoint carries (``default`` for any other
    config): its tables go to ``NAME-PRESET-DEVICE.md`` beside the default preset's.
    """
    from stepwise.train.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    m = ck.config.model
    trained = f"step {ck.step}" if ck.step else "untrained"
    return (f"{ck.config.name}, {trained} (d_model {m.d_model}, {m.n_heads} heads, {m.n_encoder_layers}+"
            f"{m.n_decoder_layers} layers, d_ff {m.d_ff}, vocab {m.vocab_size})",
            preset_of(ck.config.name))


def _fresh_checkpoint() -> Path:
    import torch

    from stepwise.config import load_config
    from stepwise.model import Transformer
    from stepwise.tokenizer import Tokenizer
    from stepwise.train.checkpoint import Checkpoint, save_checkpoint
    from stepwise.train.data import load_split

    config = load_config(ROOT / "config" / "default.json")
    pairs = load_split(config.data, "train")[:20000]
    tokenizer = Tokenizer.train([s for p in pairs for s in p], vocab_size=config.model.vocab_size)
    config.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = Transformer(config.model)
    path = Path(tempfile.mkdtemp(prefix="stepwise-bench-")) / UNTRAINED
    return save_checkpoint(path, Checkpoint(config=config, model_state=model.state_dict(),
                                            tokenizer_model=tokenizer.model_proto))


# -- training ------------------------------------------------------------------------------------
def bench_train(checkpoint: Path, device: str, steps: int) -> str:
    rows = []
    results = {}
    for system in ("nn.Transformer", "stepwise"):
        name = "reference" if system == "nn.Transformer" else "stepwise"
        results[system] = run_worker("bench.train_worker", {"checkpoint": str(checkpoint), "system": name,
                                                            "device": device, "steps": steps})
    base = results["nn.Transformer"]["tokens_per_s"]
    for system, r in results.items():
        rows.append([system, r["tokens_per_s"], r["tokens_per_s"] / base, r["peak_mb"]])
    return table(f"Training throughput ({device}, forward+backward+Adam step, {steps} steps, same batches)",
                 ["system", "target tokens/s", "× nn.Transformer", "peak memory MiB"], rows)


# -- translation ---------------------------------------------------------------------------------
def prepare_translation(checkpoint: Path, work: Path, sentences: int) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from bench.ct2 import convert
    from stepwise.export import export_checkpoint
    from stepwise.train.checkpoint import load_checkpoint
    from stepwise.train.data import load_split

    ck = load_checkpoint(checkpoint)
    held_out = load_split(ck.config.data, "test") + load_split(ck.config.data, "valid")
    held_out = held_out[:sentences]
    (work / "sentences.json").write_text(json.dumps([s for s, _ in held_out]))
    (work / "references.json").write_text(json.dumps([t for _, t in held_out]))
    started = time.perf_counter()
    export_checkpoint(ck, work / "export")
    export_s = time.perf_counter() - started
    int8 = work / "export-int8"
    int8.mkdir(exist_ok=True)
    started = time.perf_counter()
    for name in ("encoder.onnx", "decoder.onnx"):
        quantize_dynamic(str(work / "export" / name), str(int8 / name), weight_type=QuantType.QInt8)
    quantize_s = time.perf_counter() - started
    for name in ("tokenizer.model", "manifest.json", "scorer.onnx"):  # the scorer stays fp32 (not timed here)
        (int8 / name).write_bytes((work / "export" / name).read_bytes())
    started = time.perf_counter()
    convert(ck, work / "ct2")
    convert_s = time.perf_counter() - started
    ck.tokenizer().save(work / "tokenizer.model")
    n_test = len(load_split(ck.config.data, "test"))
    return {"export_s": export_s, "quantize_s": quantize_s, "ct2_convert_s": convert_s, "n": len(held_out),
            "n_test": min(n_test, len(held_out))}


def bench_translate(checkpoint: Path, work: Path, sentences: int, device: str, rounds: int = 2) -> list[str]:
    import sacrebleu

    info = prepare_translation(checkpoint, work, sentences)
    common = {"tokenizer": str(work / "tokenizer.model"), "sentences": str(work / "sentences.json"),
              "checkpoint": str(checkpoint), "device": device}
    references = json.loads((work / "references.json").read_text())
    systems: list[tuple[str, dict[str, Any]]] = [
        ("PyTorch eager + KV cache", {"system": "pytorch"}),
        ("ONNX Runtime (service path, cross-attention)", {"system": "onnx", "export": str(work / "export"),
                                                          "attention": True}),
        ("ONNX Runtime (service path, cross-attention), 1 thread", {"system": "onnx", "export": str(work / "export"),
                                                                    "attention": True, "threads": 1}),
        ("ONNX Runtime, no attention", {"system": "onnx", "export": str(work / "export")}),
        ("ONNX Runtime, search then scorer pass (all attention)", {"system": "onnx", "export": str(work / "export"),
                                                                  "attention": "scorer"}),
        ("ONNX Runtime int8 (cross-attention)", {"system": "onnx", "export": str(work / "export-int8"),
                                                 "attention": True}),
        ("CTranslate2 fp32", {"system": "ct2", "ct2": str(work / "ct2"), "compute_type": "float32"}),
        ("CTranslate2 fp32, 1 thread", {"system": "ct2", "ct2": str(work / "ct2"), "compute_type": "float32",
                                        "threads": 1}),
        ("CTranslate2 int8, 1 thread", {"system": "ct2", "ct2": str(work / "ct2"), "compute_type": "int8",
                                        "threads": 1}),
        ("CTranslate2 int8, 2 threads", {"system": "ct2", "ct2": str(work / "ct2"), "compute_type": "int8",
                                         "threads": 2}),
    ]
    sections = []
    bleu_rows = []
    for beam in (1, 4):
        for batch in (1, 32):
            # interleaved rounds, best round per system: a slow spell of a shared machine then
            # touches every system instead of whichever happened to run during it
            results: dict[str, dict[str, Any]] = {}
            for _ in range(rounds):
                for name, spec in systems:
                    r = run_worker("bench.translate_worker", {**common, **spec, "beam": beam, "batch_size": batch})
                    if name not in results or r["tokens_per_s"] > results[name]["tokens_per_s"]:
                        results[name] = r
            ct2 = max(results["CTranslate2 fp32"]["tokens_per_s"],
                      results["CTranslate2 fp32, 1 thread"]["tokens_per_s"])
            ct2_int8 = max(results["CTranslate2 int8, 1 thread"]["tokens_per_s"],
                           results["CTranslate2 int8, 2 threads"]["tokens_per_s"])
            torch_rate = results["PyTorch eager + KV cache"]["tokens_per_s"]
            reference = results["PyTorch eager + KV cache"]["outputs"]
            rows = []
            for name, r in results.items():
                same = sum(a == b for a, b in zip(r["outputs"], reference, strict=True))
                base = ct2_int8 if "int8" in name else ct2
                rows.append([name, r["tokens_per_s"], r["ms_per_sentence"], r["tokens_per_s"] / torch_rate,
                             r["tokens_per_s"] / base, f"{same}/{len(reference)}"])
            sections.append(table(
                f"Translation, {'greedy' if beam == 1 else f'beam {beam}'}, batch {batch}, {info['n']} held-out "
                f"sentences ({device}, best of {rounds} interleaved rounds)",
                ["system", "target tokens/s", "ms/sentence", "× PyTorch", "× CTranslate2 (same precision, best)",
                 "same tokens as PyTorch"], rows))
            if beam == 1 and batch == 32:
                from stepwise.tokenizer import Tokenizer

                tok = Tokenizer.load(work / "tokenizer.model")
                n = info["n_test"]
                for name in ("ONNX Runtime (service path, cross-attention)", "ONNX Runtime int8 (cross-attention)",
                             "CTranslate2 fp32", "CTranslate2 int8, 1 thread"):
                    hyps = [tok.decode(t) for t in results[name]["outputs"][:n]]
                    bleu_rows.append([name, sacrebleu.corpus_bleu(hyps, [references[:n]]).score])
    sections.append(table("BLEU on the test books (greedy) — quantization check", ["system", "sacreBLEU"],
                          bleu_rows))
    sections.append(table("Export and conversion", ["step", "seconds"],
                          [["stepwise export (ONNX + parity check)", info["export_s"]],
                           ["ONNX Runtime int8 dynamic quantization", info["quantize_s"]],
                           ["CTranslate2 conversion", info["ct2_convert_s"]]]))
    return sections


# -- serving -------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(export: Path, batching: bool, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    log = Path(tempfile.mkdtemp()) / "bentoml.log"
    env = {**os.environ, "STEPWISE_MODEL_DIR": str(export), "STEPWISE_ADAPTIVE_BATCHING": "1" if batching else "0",
           **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "stepwise.serve.service:Translator",
                                "--port", str(port)],
                               cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/readyz", timeout=180, process=process, log_file=log, name="bentoml serve")
    except ServerNotReady:
        _stop(process)
        raise
    return process, url, log


def _stop(process: subprocess.Popen) -> None:
    """Stop a server and every process it started (killing only the ``bentoml serve`` CLI would
    leave its service workers running)."""
    tree = process_tree(process.pid)
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
    for pid in tree[1:]:  # workers the CLI did not take down with it
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _load(url: str, texts: list[str], clients: int, attention: str, attention_format: str = "json") -> dict[str, float]:
    """One serving row: ``clients`` concurrent clients on ``/translate`` (:mod:`bench.load`)."""
    return run_load(url, texts, clients, {"attention": attention, "attention_format": attention_format}).summary()


ENGINE_BATCHES = (1, 32)  # batch 1: what one client waits for; batch 32: what 32 clients could get


def engine_speed(export: Path, texts: list[str], work: Path) -> dict[tuple[int, bool], dict[str, Any]]:
    """The engine the service runs (``OnnxTranslator`` on the same export), offline, on ``texts``.

    Greedy, batch 1 and 32 (length-sorted batches, as in ``bench translate``), with and without
    cross-attention; same thread rule as the service (``STEPWISE_ORT_THREADS``, else every core).
    Keyed by (batch size, attention).
    """
    (work / "serve-sentences.json").write_text(json.dumps(texts))
    common = {"system": "onnx", "export": str(export), "tokenizer": str(export / "tokenizer.model"),
              "sentences": str(work / "serve-sentences.json"), "beam": 1, "device": "cpu"}
    return {(batch, attention): run_worker("bench.translate_worker", {**common, "batch_size": batch,
                                                                      "attention": attention})
            for batch in ENGINE_BATCHES for attention in (False, True)}


def attention_payload(url: str, text: str) -> list[list[Any]]:
    """Answer bytes of one request per ``attention_format``, and the error after the explorer's decoding.

    Each compact answer is decoded by the explorer's client (``stepwise.serve.client``, which uses
    ``stepwise.serve.attention_codec``) and compared with the JSON answer's arrays for the same request.
    Rows: attention kind, format, bytes, × JSON, max abs error, and the targets' verdicts.
    """
    import numpy as np

    from stepwise.serve.attention_codec import FORMATS
    from stepwise.serve.client import TranslationClient

    rows = [["none", "—", len(requests.post(f"{url}/translate", json={"text": text, "attention": "none"},
                                            timeout=120).content), "", "", ""]]
    for kind in ("cross", "all"):
        sizes, decoded = {}, {}
        for fmt in FORMATS:
            sizes[fmt] = len(requests.post(f"{url}/translate", json={"text": text, "attention": kind,
                                                                     "attention_format": fmt}, timeout=120).content)
            decoded[fmt] = TranslationClient(url, attention_format=fmt).translate(text, attention=kind)["attention"]
        for fmt in FORMATS:
            if fmt == "json":
                rows.append([kind, fmt, sizes[fmt], 1.0, "—", ""])
                continue
            error = max(float(np.abs(decoded[fmt][k] - decoded["json"][k]).max()) for k in decoded["json"])
            ratio = sizes[fmt] / sizes["json"]
            rows.append([kind, fmt, sizes[fmt], ratio, f"{error:.1e}",
                         f"{verdict(ratio, 0.2, at_least=False)} / {verdict(error, 1e-3, at_least=False)}"])
    return rows


def memory_with_versions(checkpoint: Path, export: Path, text: str, versions: int) -> dict[str, float]:
    """RSS of a ``bentoml serve`` idle, after one and after ``versions`` registry versions entered its cache.

    The service loads a version asked for by id (``model``) from the registry and keeps it in
    its cache (``STEPWISE_MODEL_CACHE``, here ``versions`` and no byte limit that matters). The
    registry is a throw-away embedded ClearML server on a free port; the versions are copies of
    ``checkpoint`` (``bench.registry_worker``), which the service exports on first use as it does
    any version without an export. The default model is ``export`` (``STEPWISE_MODEL_DIR``).
    The first version also brings the ClearML SDK into the service, so the cost of one more
    version is the difference between the last two figures.
    Returns MiB: ``idle``, ``first`` (one version cached) and ``cached`` (all of them).
    """
    from stepwise.clearml_server import sdk_environment

    folder = Path(tempfile.mkdtemp(prefix="stepwise-bench-registry-"))
    port = _free_port()
    log = folder / "clearml-server.log"
    server = subprocess.Popen([sys.executable, "-m", "stepwise", "clearml-server", "--port", str(port), "--data",
                               str(folder / "data")], cwd=ROOT, stdout=open(log, "wb"),  # noqa: SIM115
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    env = {**sdk_environment(url), "CLEARML_CACHE_DIR": str(folder / "clearml-cache"),
           "STEPWISE_EXPORT_CACHE": str(folder / "exports"), "STEPWISE_MODEL_CACHE": f"{versions},1TB"}
    try:
        wait_until_ready(f"{url}/debug.ping", timeout=60, process=server, log_file=log,
                         name="stepwise clearml-server")
        ids = run_worker("bench.registry_worker", {"checkpoint": str(checkpoint), "copies": versions,
                                                   "project": "stepwise-bench", "folder": str(folder / "copies")},
                         env=env)["ids"]
        process, service, service_log = _serve(export, True, env)
        try:
            memory = {"idle": tree_rss_mib(process.pid)}
            for model_id in ids:  # the first request for a version exports and loads it
                answer = requests.post(f"{service}/translate", json={"text": text, "model": model_id,
                                                                     "attention": "none"}, timeout=1800)
                if answer.status_code != 200:
                    raise RuntimeError(f"loading version {model_id}: {answer.status_code} {answer.text[:300]}\n"
                                       f"{service_log.read_text()[-3000:]}")
                memory.setdefault("first", tree_rss_mib(process.pid))
            cached = requests.post(f"{service}/model", json={}, timeout=60).json()["cache"]["versions"]
            if cached != versions:
                raise RuntimeError(f"the service cached {cached} versions, expected {versions}")
            memory["cached"] = tree_rss_mib(process.pid)
            return memory
        finally:
            _stop(process)
    finally:
        _stop(server)
        shutil.rmtree(folder, ignore_errors=True)


SERVE_CLIENTS = (1, 8, 32)


def bench_serve(checkpoint: Path, work: Path, requests_per_run: int, cache_versions: int = 5) -> list[str]:
    from stepwise.export import export_checkpoint
    from stepwise.serve.attention_codec import FORMATS
    from stepwise.train.checkpoint import load_checkpoint
    from stepwise.train.data import load_split

    ck = load_checkpoint(checkpoint)
    if not (work / "export" / "manifest.json").exists():
        export_checkpoint(ck, work / "export")
    texts = [s for s, _ in load_split(ck.config.data, "test")]
    texts = (texts * (1 + requests_per_run // len(texts)))[:requests_per_run]
    engine = engine_speed(work / "export", texts, work)  # before any service starts: nothing competes
    rows, after_burst, formats, memory = [], [], {}, {}
    streaming: list[list[Any]] = []
    payload: list[list[Any]] = []
    for batching in (True, False):
        for attention in ("none", "cross"):
            # a fresh service per setting: its batching queue remembers the last batch it saw
            process, url, _ = _serve(work / "export", batching)
            try:
                if batching and attention == "none":
                    memory["loaded, idle (fresh service)"] = tree_rss_mib(process.pid)
                _load(url, texts[:16], 4, attention)  # warm-up
                single = None
                for clients in SERVE_CLIENTS:
                    with PeakRss(process.pid) as peak:
                        r = _load(url, texts, clients, attention)
                    single = single or r["rps"]
                    rows.append([f"{'on' if batching else 'off'}", attention, clients, r["rps"], r["rps"] / single,
                                 r["p50"], r["p95"], r["p99"], r["errors"]])
                    if batching and clients == 32:
                        memory[f"peak under 32 clients, attention {attention}"] = peak.peak_mib
                if batching and attention == "cross":  # the same load with the compact formats, then streamed
                    formats["json"] = r
                    streaming = bench_stream(url, texts, (1, 8))
                    for fmt in FORMATS[1:]:
                        formats[fmt] = _load(url, texts, 32, attention, fmt)
                if batching:  # one client right after 32: the first request may wait for stragglers
                    r = _load(url, texts[:64], 1, attention)
                    after_burst.append([attention, rows[-3][5], r["p50"], r["p50"] / rows[-3][5] - 1])
                if batching and attention == "none":
                    payload = attention_payload(url, texts[0])
            finally:
                _stop(process)
    if cache_versions:
        cache = memory_with_versions(checkpoint, work / "export", texts[0], cache_versions)
        memory["idle, default model only (registry-backed service)"] = cache["idle"]
        memory["idle, 1 registry version cached besides the default"] = cache["first"]
        memory[f"idle, {cache_versions} registry versions cached besides the default"] = cache["cached"]
    by_key = {(r[0], r[1], r[2]): r for r in rows}
    cost = [[c, by_key[("on", "none", c)][5], by_key[("on", "cross", c)][5],
             by_key[("on", "cross", c)][5] / by_key[("on", "none", c)][5] - 1] for c in SERVE_CLIENTS]
    efficiency = []
    for attention, target in (("none", 0.8), ("cross", 0.7)):
        rps, offline = by_key[("on", attention, 32)][3], engine[(32, attention == "cross")]["sentences_per_s"]
        efficiency.append([attention, rps, offline, rps / offline, f"≥ {target}×",
                           verdict(rps / offline, target, at_least=True)])
    overhead = []
    for attention in ("none", "cross"):
        p50, batch1 = by_key[("on", attention, 1)][5], engine[(1, attention == "cross")]
        median, mean = batch1["ms_per_sentence_median"], batch1["ms_per_sentence"]
        overhead.append([attention, p50, median, mean, p50 / median, p50 / mean, "≤ 1.15×",
                         verdict(p50 / median, 1.15, at_least=False)])
    none_32 = by_key[("on", "none", 32)][5]
    format_rows = [[fmt, none_32, r["p50"], f"{100 * (r['p50'] / none_32 - 1):+.1f}%", r["rps"], r["errors"],
                    verdict(r["p50"] / none_32 - 1, 0.10, at_least=False) if fmt == "json" else ""]
                   for fmt, r in formats.items()]
    idle = memory["loaded, idle (fresh service)"]
    memory_rows = [[what, mib, mib / idle] for what, mib in memory.items()]
    if cache_versions > 1:  # the first version also imports the ClearML SDK: count from it on
        extra = (cache["cached"] - cache["first"]) / (cache_versions - 1)
        memory_rows[-1].append(f"{extra:+,.0f} MiB per version after the first")
    return [table(f"Serving under load: bentoml serve, {requests_per_run} requests per row (test books)",
                  ["adaptive batching", "attention", "clients", "requests/s", "× 1 client", "p50 ms", "p95 ms",
                   "p99 ms", "errors"], rows),
            table("Serving efficiency: 32 clients vs the engine's offline batch 32 on the same sentences "
                  "(adaptive batching on; engine: OnnxTranslator, same export and threads, greedy)",
                  ["attention", "service requests/s", "engine sentences/s", "× engine", "target", "verdict"],
                  efficiency),
            table("Serving overhead at 1 client: p50 latency vs the engine's batch-1 time per sentence "
                  "(same sentences)",
                  ["attention", "service p50 ms", "engine median ms", "engine mean ms", "× engine median",
                   "× engine mean", "target (median)", "verdict"], overhead),
            table("What returning cross-attention costs (adaptive batching on)",
                  ["clients", "p50 ms without", "p50 ms with", "extra latency"],
                  [[c, a, b, f"{100 * d:+.1f}%"] for c, a, b, d in cost]),
            table("Attention payload per attention_format (one test sentence; error: max |decoded - JSON| after "
                  "the explorer client's decoder; targets ≤ 0.2× JSON bytes / ≤ 1e-3)",
                  ["attention", "attention_format", "response bytes", "× JSON", "max error", "verdict"], payload),
            table("Cross-attention at 32 clients per attention_format (adaptive batching on; target for JSON: "
                  "≤ +10% p50 over none)",
                  ["attention_format", "p50 ms without attention", "p50 ms with cross", "extra latency",
                   "requests/s", "errors", "verdict"], format_rows),
            table("Streaming: POST /translate_stream against /translate (adaptive batching on, cross-attention, "
                  "greedy; target: stream total ≤ 1.1× /translate)", STREAM_HEADERS, streaming),
            table("Memory: resident memory (RSS) of the bentoml serve process tree, all its processes (MiB)",
                  ["state", "MiB", "× loaded idle"] + (["per version"] if cache_versions else []),
                  [row + [""] * (4 - len(row)) if cache_versions else row for row in memory_rows]),
            table("Adaptive batching after a burst: 1 client right after 32 (p50 ms)",
                  ["attention", "fresh service", "after 32 clients", "extra latency"],
                  [[a, b, c, f"{100 * d:+.1f}%"] for a, b, c, d in after_burst])]


def bench_load(checkpoint: Path, work: Path) -> str:
    code = ("import json,sys,time\nt=time.perf_counter()\n{body}\n"
            "print(json.dumps({{'seconds': time.perf_counter()-t}}))")
    bodies = {
        "PyTorch checkpoint → model": f"from stepwise.train.checkpoint import load_checkpoint\n"
                                      f"load_checkpoint({str(checkpoint)!r}).build_model()",
        "ONNX Runtime sessions (OnnxTranslator)": f"from stepwise.decode.onnx_runtime import OnnxTranslator\n"
                                                  f"OnnxTranslator({str(work / 'export')!r}, device='cpu')",
        "CTranslate2 translator": f"import ctranslate2\nctranslate2.Translator({str(work / 'ct2')!r})",
    }
    rows = []
    for name, body in bodies.items():
        out = subprocess.run([sys.executable, "-c", code.format(body=body)], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        rows.append([name, json.loads(out.stdout.strip().splitlines()[-1])["seconds"]])
    return table("Model load time (fresh process, imports excluded)", ["what", "seconds"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("what", choices=["all", "train", "translate", "serve", "export", "headmask", "alignment",
                                         "contributions"])
    parser.add_argument("--checkpoint", default=None, help="checkpoint to measure (default: production, or fresh)")
    parser.add_argument("--sentences", type=int, default=None,
                        help=f"held-out sentences (default 500; {UNTRAINED_SENTENCES} for an untrained model)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="translation rounds per system (best is reported)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per serving row (default 128; 64 for an untrained model)")
    parser.add_argument("--cache-versions", type=int, default=5,
                        help="serve: registry versions loaded into the service's cache for the memory row (0: skip)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--steps", type=int, default=200, help="headmask: decoder steps per graph and round")
    args = parser.parse_args(argv)
    if args.what == "alignment":  # eflomal and the diagonal on the gold set; the model's readings with --checkpoint
        from bench.alignment import main as bench_alignment

        bench_alignment([*(["--checkpoint", args.checkpoint] if args.checkpoint else []),
                         *(["--out", args.out] if args.out else [])])
        return 0
    if args.what == "contributions":  # the source-share sanity check on the gold verses (needs a checkpoint)
        from bench.contributions import main as bench_contributions

        if not args.checkpoint:
            parser.error("contributions needs --checkpoint (a trained model)")
        return bench_contributions(["--checkpoint", args.checkpoint, *(["--out", args.out] if args.out else [])])
    if args.what == "headmask":  # needs no corpus: an untrained default-size model unless --checkpoint
        from bench.headmask import bench_headmask

        rounds = max(args.rounds, 6)
        section = bench_headmask(Path(args.checkpoint) if args.checkpoint else None, steps=args.steps, rounds=rounds)
        write_results("headmask", [section], "cpu", Path(args.out) if args.out else None)
        return 0
    checkpoint = find_checkpoint(args.checkpoint)
    untrained = checkpoint.name == UNTRAINED
    args.requests = args.requests or (64 if untrained else 128)
    if args.sentences is None:
        args.sentences = 500
        if untrained:
            args.sentences = UNTRAINED_SENTENCES
            print(f"measuring an untrained default-size model: its outputs run to the length limit (about 3x the "
                  f"tokens of a trained one), so {UNTRAINED_SENTENCES} sentences; pass --checkpoint for real figures")
    model, preset = describe(checkpoint)
    work = Path(tempfile.mkdtemp(prefix="stepwise-bench-"))
    out = Path(args.out) if args.out else None
    started = time.perf_counter()
    if args.what in ("all", "train"):
        section = bench_train(checkpoint, args.device, args.train_steps)
        write_results("train", [section], args.device, out, model, preset)
    if args.what in ("all", "translate"):
        sections = bench_translate(checkpoint, work, args.sentences, args.device, args.rounds)
        write_results("translate", sections, args.device, out, model, preset)
    if args.what in ("all", "export", "translate"):
        if not (work / "export").exists():
            prepare_translation(checkpoint, work, 8)
        write_results("export", [bench_load(checkpoint, work)], args.device, out, model, preset)
    if args.what in ("all", "serve") and args.device == "cpu":
        sections = bench_serve(checkpoint, work, args.requests, args.cache_versions)
        write_results("serve", sections, args.device, out, model, preset)
    print(f"benchmarks took {time.perf_counter() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
