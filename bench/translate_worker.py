"""One translation-throughput measurement: ``python -m bench.translate_worker '{...}'``.

Systems: ``pytorch`` (this project's decoder with a KV cache), ``onnx`` (the ONNX Runtime loop the
service uses; ``export`` may point at a quantized copy; ``"attention": "scorer"`` searches without
attention and gets it from one pass of the scorer graph over the results), ``ct2`` (CTranslate2 on
converted weights).
Every system sees the same sentences in the same batches (sorted by length, then cut). Besides
the totals it reports the median time per sentence (at batch 1: of single sentences, what a
service's p50 latency is compared with) and the process's CPU seconds (with ``"threads": 1``, a
figure a busy shared machine disturbs much less than wall time).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any


def batches_of(sources: list[list[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def main() -> None:
    args: dict[str, Any] = json.loads(sys.argv[1])
    from stepwise.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args["tokenizer"])
    sentences = json.loads(open(args["sentences"], encoding="utf-8").read())
    sources = [tokenizer.encode(s) for s in sentences]
    groups = batches_of(sources, args["batch_size"])
    beam, system = args["beam"], args["system"]
    outputs: list[list[int]] = [[] for _ in sources]

    if system == "pytorch":
        import torch

        torch.set_num_threads(args.get("threads", torch.get_num_threads()))
        from stepwise.train.checkpoint import load_checkpoint
        from stepwise.train.evaluate import translate_ids

        model = load_checkpoint(args["checkpoint"]).build_model().to(args.get("device", "cpu"))

        def run(group: list[int]) -> list[list[int]]:
            hyps = translate_ids(model, [sources[i] for i in group], beam_size=beam, batch_size=len(group),
                                 return_attention=args.get("attention", False))
            return [h.tokens for h in hyps]
    elif system == "onnx":
        from stepwise.decode.onnx_runtime import OnnxTranslator

        translator = OnnxTranslator(args["export"], device=args.get("device", "cpu"), threads=args.get("threads"))

        def run(group: list[int]) -> list[list[int]]:
            batch = [sources[i] for i in group]
            if args.get("attention") == "scorer":  # search without attention, then one scorer pass for it
                hyps = translator.decode_ids(batch, beam_size=beam)
                translator.score_ids(batch, [h.tokens + ([tokenizer.eos_id] if h.finished else []) for h in hyps])
            else:
                hyps = translator.decode_ids(batch, beam_size=beam, return_attention=args.get("attention", False))
            return [h.tokens for h in hyps]
    elif system == "ct2":
        import ctranslate2

        translator = ctranslate2.Translator(args["ct2"], device=args.get("device", "cpu"), inter_threads=1,
                                            intra_threads=args.get("threads", 0),
                                            compute_type=args.get("compute_type", "float32"))
        pieces = [tokenizer.pieces(s) for s in sources]
        # the same rule as our decoders: PAD and BOS are never generated (a trained model never
        # prefers them; an untrained one can)
        never = [[tokenizer.sp.id_to_piece(tokenizer.pad_id)], [tokenizer.sp.id_to_piece(tokenizer.bos_id)]]

        def run(group: list[int]) -> list[list[int]]:
            limit = max(2 * len(sources[i]) + 10 for i in group)
            results = translator.translate_batch([pieces[i] for i in group], beam_size=beam, max_batch_size=0,
                                                 max_decoding_length=limit, min_decoding_length=0,
                                                 suppress_sequences=never,
                                                 length_penalty=0.6 if beam > 1 else 1.0)
            return [[tokenizer.sp.piece_to_id(p) for p in r.hypotheses[0]] for r in results]
    else:
        raise SystemExit(f"unknown system {system}")

    run(groups[0])  # warm-up (first batch), not timed
    per_sentence_ms: list[float] = []  # each batch's time shared by its sentences
    started, cpu_started = time.perf_counter(), time.process_time()
    for group in groups:
        began = time.perf_counter()
        for i, tokens in zip(group, run(group), strict=True):
            outputs[i] = tokens
        per_sentence_ms += [1000 * (time.perf_counter() - began) / len(group)] * len(group)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    generated = sum(len(t) for t in outputs)
    print(json.dumps({"tokens_per_s": generated / elapsed, "ms_per_sentence": 1000 * elapsed / len(sources),
                      "sentences_per_s": len(sources) / elapsed,
                      "ms_per_sentence_median": statistics.median(per_sentence_ms),
                      "seconds": elapsed, "cpu_seconds": cpu, "target_tokens": generated, "outputs": outputs}))


if __name__ == "__main__":
    main()
