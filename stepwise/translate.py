"""Text in, text out, through the PyTorch decoding loop; and BLEU over a set of pairs.

This is the one PyTorch path from sentences to translations: training's validation BLEU,
``stepwise evaluate``, the promotion gate and the exporter's parity check all use it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sacrebleu
import torch

from stepwise.data import pad_sequences
from stepwise.decoding import Hypothesis, decode
from stepwise.models import Transformer
from stepwise.tokenizer import Tokenizer, truncate

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
) -> list[Hypothesis]:
    """Decode encoded sources (each ending with EOS), batching by length, keeping input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    results: list[Hypothesis | None] = [None] * len(sources)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        src, mask = pad_sequences([sources[i] for i in chunk], pad_id=model.config.pad_id)
        hyps = decode(model, src.to(device), mask.to(device), beam_size=beam_size, max_length=max_length,
                      return_attention=return_attention)
        for i, hyp in zip(chunk, hyps, strict=True):
            results[i] = hyp
    return results  # type: ignore[return-value]


def encode_sources(tokenizer: Tokenizer, sentences: Sequence[str], max_positions: int) -> list[list[int]]:
    """Source ids (with EOS) of ``sentences``, each cut by :func:`stepwise.tokenizer.truncate`."""
    return [truncate(ids, max_positions) for ids in tokenizer.encode_batch(list(sentences))]


def translate(
    model: Transformer, tokenizer: Tokenizer, sentences: Sequence[str], *, beam_size: int = 1,
    batch_size: int = 32,
) -> list[str]:
    """Translate sentences with greedy (``beam_size=1``) or beam search."""
    sources = encode_sources(tokenizer, sentences, model.config.max_positions)
    was_training = model.training
    model.eval()
    try:
        hyps = translate_ids(model, sources, beam_size=beam_size, batch_size=batch_size)
    finally:
        model.train(was_training)
    return [tokenizer.decode(h.tokens) for h in hyps]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU with its default (13a) tokenization, as a float."""
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def evaluate_bleu(
    model: Transformer, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], *, beam_size: int = 1,
    limit: int | None = None,
) -> tuple[float, list[str]]:
    """BLEU of the model's translations of ``pairs`` (the first ``limit``); returns (bleu, hypotheses)."""
    pairs = list(pairs)[:limit] if limit else list(pairs)
    hypotheses = translate(model, tokenizer, [s for s, _ in pairs], beam_size=beam_size)
    return corpus_bleu(hypotheses, [t for _, t in pairs]), hypotheses
