"""Response shaping: a request's answer from its translated sentences, and its encoding.

:func:`answer` builds what ``/translate`` answers (and a stream's ``done`` event carries) from
the translator's :class:`stepwise.decode.onnx_runtime.Translation` of each sentence: the text,
the tokens, the attention kinds, layers and heads asked for (:func:`select_attention`) and, when
asked, word alignments (:func:`word_alignment`). Attention stays in numpy arrays until
:func:`finish` puts it in the request's ``attention_format`` and :func:`json_bytes` writes it.
A scored translation (``/score``) adds ``log_probs`` per target token; ``contributions: true`` adds
``contributions`` (``source_share`` per target token, ``source`` per source token).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import orjson

from stepwise.decode.onnx_runtime import Translation
from stepwise.errors import StepwiseError
from stepwise.serve import alignment, attention_codec
from stepwise.serve.options import ATTENTION_KINDS, TranslateOptions
from stepwise.serve.store import LoadedModel

log = logging.getLogger(__name__)


def answer(loaded: LoadedModel, options: TranslateOptions, texts: list[str], outs: list[Translation]) -> dict[str, Any]:
    """One request's answer from its translated sentences (one, or a split paragraph's)."""
    if len(outs) == 1:
        return {**_sentence_result(loaded, options, outs[0]), "model": loaded.identity(),
                "score": outs[0].score, "timings": dict(outs[0].timings)}
    sentences = [{"source": text, **_sentence_result(loaded, options, out), "score": out.score}
                 for text, out in zip(texts, outs, strict=True)]
    result = {
        "translation": " ".join(out.translation for out in outs),
        "source_tokens": [t for out in outs for t in out.source_tokens],
        "target_tokens": [t for out in outs for t in out.target_tokens],
        "attention": {},  # per sentence: attention crosses no sentence boundary
        "model": loaded.identity(), "score": sum(out.score for out in outs),
        "timings": {"decode_ms": max(out.timings["decode_ms"] for out in outs),
                    "batch_size": max(out.timings["batch_size"] for out in outs)},
        "sentences": sentences,
    }
    if all(out.log_probs is not None for out in outs):  # scored (/score): the sentences' tokens in order
        result["log_probs"] = [p for out in outs for p in out.log_probs or ()]
    if options.contributions:  # each side's tokens in order, as the tokens are joined
        result["contributions"] = {side: [v for out in outs for v in (out.contributions or {}).get(side, ())]
                                   for side in ("source_share", "source")}
    return result


def _sentence_result(loaded: LoadedModel, options: TranslateOptions, out: Translation) -> dict[str, Any]:
    """One translated sentence: text, tokens, the attention asked for, and its word alignment if asked."""
    result: dict[str, Any] = {
        "translation": out.translation, "source_tokens": out.source_tokens, "target_tokens": out.target_tokens,
        "attention": select_attention(out.attention, options),
    }
    if options.alignment != "none":
        result["alignment"] = word_alignment(loaded, options, out)
    if out.log_probs is not None:
        result["log_probs"] = out.log_probs
    if options.contributions and out.contributions is not None:
        result["contributions"] = out.contributions
    return result


def word_alignment(loaded: LoadedModel, options: TranslateOptions, out: Translation) -> dict[str, Any]:
    """``alignment``: the words of both sides, which layer/head aligned, and ``soft`` or ``hard``.

    ``soft`` is ``[target word][source word]`` with rows summing to 1 (EOS dropped, rows
    renormalised; see :mod:`stepwise.serve.alignment`); ``hard`` is a Pharaoh line ``"i-j ..."``.
    """
    default = loaded.alignment_reading()  # the version's best reading, else the fallback
    layer = default.layer if options.alignment_layer is None else options.alignment_layer
    head = default.head if options.alignment_head is None else options.alignment_head
    eos = loaded.translator.tokenizer.pieces([loaded.translator.tokenizer.eos_id])[0]
    assert out.attention is not None  # decoded with attention whenever an alignment is asked for
    words = alignment.word_alignment(alignment.attention_source(out.attention["cross"], layer, head),
                                     out.source_tokens, out.target_tokens, eos=eos)
    result: dict[str, Any] = {"source_words": words.source_words, "target_words": words.target_words,
                              "layer": layer, "head": head}
    if options.alignment == "soft":
        result["soft"] = np.round(words.soft, 5).astype(np.float32)
    else:
        result["hard"] = words.pharaoh()
    return result


def select_attention(attention: dict[str, np.ndarray] | None, options: TranslateOptions,
                     kinds: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The kinds asked for (``options.attention``, or ``kinds``), the ``layers`` and ``heads`` asked for.

    The indices were checked by :func:`stepwise.serve.options.check_request`. Returned as float32
    arrays ``[layer][head][query][key]`` rounded to 5 decimals (shorter JSON); they stay arrays
    until the response is written and become nested JSON lists once, in :func:`json_bytes` (or a
    compact object, :func:`finish`).
    """
    if attention is None:
        return {}
    result = {}
    for kind in ATTENTION_KINDS[options.attention] if kinds is None else kinds:
        weights = attention[kind]
        if options.layers is not None:
            weights = weights[list(options.layers)]
        if options.heads is not None:
            weights = weights[:, list(options.heads)]
        result[kind] = np.round(weights, 5).astype(np.float32)
    return result


def encode_attention(weights: dict[str, np.ndarray] | np.ndarray, options: TranslateOptions) -> Any:
    """Attention (one array, or an answer's per-kind dict) in the request's ``attention_format``.

    ``json`` keeps the arrays (:func:`json_bytes` writes them as nested lists); ``float16`` and
    ``uint10`` make each a compact base64 object (:mod:`stepwise.serve.attention_codec`).
    """
    if isinstance(weights, dict):
        return attention_codec.encode_all(weights, options.attention_format)
    return weights if options.attention_format == "json" else attention_codec.encode(weights, options.attention_format)


def finish(results: list[dict[str, Any]], options: TranslateOptions, started: float) -> None:
    """Answers made ready to send: attention in the request's format, ``timings.total_ms`` since ``started``."""
    total = round((time.perf_counter() - started) * 1000, 3)
    for result in results:
        for part in (result, *result.get("sentences", ())):  # a split paragraph carries attention per sentence
            part["attention"] = encode_attention(part["attention"], options)
        result["timings"]["total_ms"] = total


def as_error(outcome: Any) -> Any:
    """A queued request's outcome, any exception that is not a ``stepwise.errors`` one (a bug, an
    ONNX Runtime failure) logged and replaced by a StepwiseError (a 500 or an ``error`` event)."""
    if isinstance(outcome, BaseException) and not isinstance(outcome, StepwiseError):
        log.error("translation failed", exc_info=outcome)
        return StepwiseError("translation failed; see the server log")
    return outcome


def json_bytes(value: Any) -> bytes:
    """JSON for a response, numpy arrays as nested lists (orjson: ~10x faster than ``json``)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
