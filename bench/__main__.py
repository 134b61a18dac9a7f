"""``python -m bench {all,train,translate,serve,export,headmask} [--checkpoint PATH] [--sentences N]``.

Every table prints ratios against a baseline measured in the same invocation; each system runs
in its own process. Results go to ``bench/results/NAME-DEVICE.md`` (date, commit, machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from bench.common import ROOT, run_worker, table, write_results
from stepwise.net import ServerNotReady, wait_until_ready


def find_checkpoint(path: str | None) -> Path:
    """The checkpoint to measure: the given one, the registry's production version, or a fresh
    default-size model (throughput does not depend on training, agreement checks do not either)."""
    if path:
        return Path(path)
    if os.environ.get("CLEARML_API_HOST"):
        from stepwise import registry

        try:
            return registry.resolve(None, None, tag="production").path
        except Exception as exc:  # noqa: BLE001
            print(f"no production model in the registry ({exc}); using an untrained default-size model")
    return _fresh_checkpoint()


UNTRAINED = "untrained.pt"
UNTRAINED_SENTENCES = 120  # an untrained model never stops before the length limit (2S+10)


def describe(checkpoint: Path) -> str:
    """What was measured, for the results header (no paths)."""
    from stepwise.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    m = ck.config.model
    trained = f"step {ck.step}" if ck.step else "untrained"
    return (f"{ck.config.name}, {trained} (d_model {m.d_model}, {m.n_heads} heads, {m.n_encoder_layers}+"
            f"{m.n_decoder_layers} layers, d_ff {m.d_ff}, vocab {m.vocab_size})")


def _fresh_checkpoint() -> Path:
    import torch

    from stepwise.checkpoint import Checkpoint, save_checkpoint
    from stepwise.config import load_config
    from stepwise.data import load_split
    from stepwise.models import Transformer
    from stepwise.tokenizer import Tokenizer

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
    from stepwise.checkpoint import load_checkpoint
    from stepwise.data import load_split
    from stepwise.export import export_checkpoint

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
    for name in ("tokenizer.model", "manifest.json"):
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
        ("ONNX Runtime, no attention", {"system": "onnx", "export": str(work / "export")}),
        ("ONNX Runtime int8 (cross-attention)", {"system": "onnx", "export": str(work / "export-int8"),
                                                 "attention": True}),
        ("CTranslate2 fp32", {"system": "ct2", "ct2": str(work / "ct2"), "compute_type": "float32"}),
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
            ct2 = results["CTranslate2 fp32"]["tokens_per_s"]
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


def _serve(export: Path, batching: bool) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    log = Path(tempfile.mkdtemp()) / "bentoml.log"
    env = {**os.environ, "STEPWISE_MODEL_DIR": str(export), "STEPWISE_ADAPTIVE_BATCHING": "1" if batching else "0"}
    process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service:Translator", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/readyz", timeout=180, process=process, log_file=log, name="bentoml serve")
    except ServerNotReady:
        process.kill()
        raise
    return process, url, log


def _load(url: str, texts: list[str], clients: int, attention: str) -> dict[str, float]:
    """``clients`` concurrent clients, each sending its next request when the last one is answered.

    One asyncio event loop drives every client (aiohttp, which BentoML itself uses), so the load
    generator takes little CPU from the service it measures; a latency is the time until the
    whole response body has arrived.
    """
    import asyncio

    import aiohttp

    async def run() -> tuple[list[float], int, float]:
        latencies: list[float] = []
        errors = 0
        queue = list(texts)
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

            async def client() -> None:
                nonlocal errors
                while queue:
                    text = queue.pop()
                    began = time.perf_counter()
                    async with session.post(f"{url}/translate", json={"text": text, "attention": attention}) as answer:
                        await answer.read()
                        errors += answer.status != 200
                    latencies.append(time.perf_counter() - began)

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            return latencies, errors, time.perf_counter() - started

    latencies, errors, elapsed = asyncio.run(run())
    latencies.sort()
    pick = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"rps": len(latencies) / elapsed, "p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99),
            "errors": errors}


def bench_serve(checkpoint: Path, work: Path, requests_per_run: int) -> list[str]:
    from stepwise.checkpoint import load_checkpoint
    from stepwise.data import load_split
    from stepwise.export import export_checkpoint

    ck = load_checkpoint(checkpoint)
    if not (work / "export" / "manifest.json").exists():
        export_checkpoint(ck, work / "export")
    texts = [s for s, _ in load_split(ck.config.data, "test")]
    texts = (texts * (1 + requests_per_run // len(texts)))[:requests_per_run]
    rows, sizes, after_burst = [], [], []
    for batching in (True, False):
        for attention in ("none", "cross"):
            # a fresh service per setting: BentoML's batching dispatcher learns from what it saw
            process, url, _ = _serve(work / "export", batching)
            try:
                _load(url, texts[:16], 4, attention)  # warm-up
                single = None
                for clients in (1, 8, 32):
                    r = _load(url, texts, clients, attention)
                    single = single or r["rps"]
                    rows.append([f"{'on' if batching else 'off'}", attention, clients, r["rps"], r["rps"] / single,
                                 r["p50"], r["p95"], r["p99"], r["errors"]])
                if batching:  # the dispatcher's learned wait outlives a burst
                    r = _load(url, texts[:64], 1, attention)
                    after_burst.append([attention, rows[-3][5], r["p50"], r["p50"] / rows[-3][5] - 1])
                if batching and attention == "none":
                    for kind in ("none", "cross", "all"):
                        body = requests.post(f"{url}/translate", json={"text": texts[0], "attention": kind},
                                             timeout=60).content
                        sizes.append([kind, len(body)])
            finally:
                process.terminate()
                process.wait(timeout=30)
    by_key = {(r[0], r[1], r[2]): r for r in rows}
    cost = [[c, by_key[("on", "none", c)][5], by_key[("on", "cross", c)][5],
             by_key[("on", "cross", c)][5] / by_key[("on", "none", c)][5] - 1] for c in (1, 8, 32)]
    return [table(f"Serving under load: bentoml serve, {requests_per_run} requests per row (test books)",
                  ["adaptive batching", "attention", "clients", "requests/s", "× 1 client", "p50 ms", "p95 ms",
                   "p99 ms", "errors"], rows),
            table("What returning cross-attention costs (adaptive batching on)",
                  ["clients", "p50 ms without", "p50 ms with", "extra latency"],
                  [[c, a, b, f"{100 * d:+.1f}%"] for c, a, b, d in cost]),
            table("Attention payload (one test sentence)", ["attention", "response bytes"], sizes),
            table("Adaptive batching after a burst: 1 client right after 32 (p50 ms)",
                  ["attention", "fresh service", "after 32 clients", "extra latency"],
                  [[a, b, c, f"{100 * d:+.1f}%"] for a, b, c, d in after_burst])]


def bench_load(checkpoint: Path, work: Path) -> str:
    code = ("import json,sys,time\nt=time.perf_counter()\n{body}\n"
            "print(json.dumps({{'seconds': time.perf_counter()-t}}))")
    bodies = {
        "PyTorch checkpoint → model": f"from stepwise.checkpoint import load_checkpoint\n"
                                      f"load_checkpoint({str(checkpoint)!r}).build_model()",
        "ONNX Runtime sessions (OnnxTranslator)": f"from stepwise.onnx_decoding import OnnxTranslator\n"
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
    parser.add_argument("what", choices=["all", "train", "translate", "serve", "export", "headmask"])
    parser.add_argument("--checkpoint", default=None, help="checkpoint to measure (default: production, or fresh)")
    parser.add_argument("--sentences", type=int, default=None,
                        help=f"held-out sentences (default 500; {UNTRAINED_SENTENCES} for an untrained model)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="translation rounds per system (best is reported)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per serving row (default 128; 64 for an untrained model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--steps", type=int, default=200, help="headmask: decoder steps per graph and round")
    args = parser.parse_args(argv)
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
    model = describe(checkpoint)
    work = Path(tempfile.mkdtemp(prefix="stepwise-bench-"))
    out = Path(args.out) if args.out else None
    started = time.perf_counter()
    if args.what in ("all", "train"):
        write_results("train", [bench_train(checkpoint, args.device, args.train_steps)], args.device, out, model)
    if args.what in ("all", "translate"):
        sections = bench_translate(checkpoint, work, args.sentences, args.device, args.rounds)
        write_results("translate", sections, args.device, out, model)
    if args.what in ("all", "export", "translate"):
        if not (work / "export").exists():
            prepare_translation(checkpoint, work, 8)
        write_results("export", [bench_load(checkpoint, work)], args.device, out, model)
    if args.what in ("all", "serve") and args.device == "cpu":
        write_results("serve", bench_serve(checkpoint, work, args.requests), args.device, out, model)
    print(f"benchmarks took {time.perf_counter() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
