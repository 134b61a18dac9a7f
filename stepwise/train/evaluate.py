"""Text in, text out, through the PyTorch decoding loop; and BLEU over a set of pairs.

This is the one PyTorch path from sentences to translations: training's validation BLEU,
``stepwise evaluate`` and the exporter's parity check use it (the promotion gate scores the ONNX
exports). BLEU itself is :func:`stepwise.train.corpus.corpus_bleu`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from stepwise.decode.pytorch import Hypothesis, decode
from stepwise.model import Transformer
from stepwise.tokenizer import Tokenizer, truncate
from stepwise.train.corpus import corpus_bleu
from stepwise.train.data import pad_sequences

log = logging.getLogger(__name__)


@torch.no_grad()
def translate_ids(
    model: Transformer,
    sources: Sequence[Sequence[int]],
    *,
    beam_size: int = 1,
    batch_size: int = 32,
    max_length: int | None = None,
    return_attention: bool = False,
    length_penalty: float = 0.6,
) -> list[Hypothesis]:
    """Decode encoded sources (each ending with EOS), batching by length, keeping input order.

    ``length_penalty`` is beam search's GNMT alpha (greedy search ignores it).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    results: list[Hypothesis | None] = [None] * len(sources)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        src, mask = pad_sequences([sources[i] for i in chunk], pad_id=model.config.pad_id)
        hyps = decode(model, src.to(device), mask.to(device), beam_size=beam_size, max_length=max_length,
                      return_attention=return_attention, length_penalty=length_penalty)
        for i, hyp in zip(chunk, hyps, strict=True):
            results[i] = hyp
    return results  # type: ignore[return-value]


def encode_sources(tokenizer: Tokenizer, sentences: Sequence[str], max_positions: int) -> list[list[int]]:
    """Source ids (with EOS) of ``sentences``, each cut by :func:`stepwise.tokenizer.truncate`."""
    return [truncate(ids, max_positions) for ids in tokenizer.encode_batch(list(sentences))]


def translate(
    model: Transformer, tokenizer: Tokenizer, sentences: Sequence[str], *, beam_size: int = 1,
    batch_size: int = 32, length_penalty: float = 0.6,
) -> list[str]:
    """Translate sentences with greedy (``beam_size=1``) or beam search."""
    sources = encode_sources(tokenizer, sentences, model.config.max_positions)
    was_training = model.training
    model.eval()
    try:
        hyps = translate_ids(model, sources, beam_size=beam_size, batch_size=batch_size,
                             length_penalty=length_penalty)
    finally:
        model.train(was_training)
    return [tokenizer.decode(h.tokens) for h in hyps]


def evaluate_bleu(
    model: Transformer, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], *, beam_size: int = 1,
    limit: int | None = None, length_penalty: float = 0.6,
) -> tuple[float, list[str]]:
    """BLEU of the model's translations of ``pairs`` (the first ``limit``); returns (bleu, hypotheses)."""
    pairs = list(pairs)[:limit] if limit else list(pairs)
    hypotheses = translate(model, tokenizer, [s for s, _ in pairs], beam_size=beam_size,
                           length_penalty=length_penalty)
    return corpus_bleu(hypotheses, [t for _, t in pairs]), hypotheses


LENGTH_PENALTY_GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2)


def tune_length_penalty(
    model: Transformer, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], *, beam_size: int = 4,
    grid: Sequence[float] = LENGTH_PENALTY_GRID, limit: int | None = None,
) -> tuple[float, dict[float, float]]:
    """The length penalty (GNMT alpha) of ``grid`` with the best BLEU on ``pairs``: tune on validation, not test.

    Returns:
        ``(best alpha, {alpha: BLEU})``; of equal scores the first in ``grid`` wins.
    """
    if beam_size < 2:
        raise ValueError("the length penalty ranks beam hypotheses: tune it with beam_size >= 2")
    scores = {alpha: evaluate_bleu(model, tokenizer, pairs, beam_size=beam_size, limit=limit,
                                   length_penalty=alpha)[0] for alpha in grid}
    best = max(scores, key=lambda alpha: scores[alpha])  # max keeps the first of equal scores
    log.info("length penalty (alpha: BLEU) %s -> %g", ", ".join(f"{a:g}: {b:.2f}" for a, b in scores.items()), best)
    return best, scores
