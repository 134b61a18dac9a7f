"""A made-up :class:`stepwise.decode.search.Step` for the search loop's tests: fixed next-token tables
instead of a model."""

from __future__ import annotations

import zlib

import numpy as np

PAD, BOS, EOS = 0, 2, 3
VOCAB = 12


def table_log_probs(sentence: int, prefix: tuple[int, ...]) -> np.ndarray:
    """A fixed, made-up next-token distribution per (sentence, prefix): PAD and BOS impossible,
    EOS likely enough that hypotheses end at different lengths."""
    rng = np.random.default_rng(zlib.crc32(repr((sentence, prefix)).encode()))
    logits = 2.0 * rng.normal(size=VOCAB)
    logits[EOS] += 1.0
    logits[[PAD, BOS]] = -np.inf
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


class TableSteps:
    """A :class:`stepwise.decode.search.Step` over :func:`table_log_probs`: its "cache" is each row's prefix."""

    encoder_attention = None

    def __init__(self, sentences: int, beam_size: int, can_drop_rows: bool) -> None:
        self.sentence = np.repeat(np.arange(sentences), beam_size)  # the memory: which sentence a row is
        self.prefixes: list[tuple[int, ...]] = [() for _ in self.sentence]
        self.can_drop_rows = can_drop_rows
        self.first = True

    def select_rows(self, positions: np.ndarray) -> None:
        self.sentence = self.sentence[positions]

    def __call__(self, tokens: np.ndarray, past_order: np.ndarray, need_attention: bool) -> tuple:
        assert len(tokens) == len(self.sentence)
        if self.first:
            assert (tokens[:, 0] == BOS).all()
            self.first = False
        else:
            self.prefixes = [(*self.prefixes[i], int(t)) for i, t in zip(past_order, tokens[:, 0], strict=True)]
        log_probs = np.stack([table_log_probs(int(s), p) for s, p in zip(self.sentence, self.prefixes, strict=True)])
        top_ids = np.argsort(-log_probs, axis=-1)[:, :8]
        return np.take_along_axis(log_probs, top_ids, -1).astype(np.float32), top_ids, None, None
