"""Length-bucketed batches with a token budget, from the pairs of :mod:`stepwise.train.corpus`.

The corpus readers (``load_split`` and the rest) live in :mod:`stepwise.train.corpus`, which
imports no torch; they are re-exported here for training's callers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from stepwise.tokenizer import BOS_ID, EOS_ID, PAD_ID, truncate
from stepwise.train.corpus import (  # noqa: F401 - re-exported for training's callers
    DATASET_ALIAS,
    SPLITS,
    Pair,
    bible_db_path,
    dataset_copy,
    load_bible,
    load_split,
    read_parallel_files,
    read_tsv,
    upload_corpus,
    write_splits,
)

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """A padded batch; masks are True at padding.

    ``tgt_in`` is the decoder input (BOS + target), ``tgt_out`` what it must predict
    (target + EOS).
    """

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    src_pad_mask: Tensor
    tgt_pad_mask: Tensor

    @property
    def target_tokens(self) -> int:
        """Real (non-pad) target tokens, the unit of the token budget and of tokens/s."""
        return int((~self.tgt_pad_mask).sum())

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to ``device``."""
        return Batch(*(getattr(self, f).to(device) for f in ("src", "tgt_in", "tgt_out", "src_pad_mask",
                                                               "tgt_pad_mask")))


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[Tensor, Tensor]:
    """Right-pad to a ``[B, T]`` long tensor; returns ``(ids, pad_mask)``."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, ids == pad_id


def collate(examples: Sequence[tuple[list[int], list[int]]]) -> Batch:
    """Turn ``(source ids with EOS, target ids without BOS/EOS)`` pairs into a Batch."""
    src, src_mask = pad_sequences([s for s, _ in examples])
    tgt_in, tgt_mask = pad_sequences([[BOS_ID, *t] for _, t in examples])
    tgt_out, _ = pad_sequences([[*t, EOS_ID] for _, t in examples])
    return Batch(src, tgt_in, tgt_out, src_mask, tgt_mask)


def encode_pairs(
    pairs: Sequence[Pair], tokenizer: object, max_length: int, *, max_positions: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Tokenize pairs, dropping those longer than ``max_length`` tokens on either side.

    With ``max_positions``, a pair whose source :func:`stepwise.tokenizer.truncate` would cut is
    dropped too: translation cuts such a source, but a cut source no longer matches its target.
    """
    src = tokenizer.encode_batch([s for s, _ in pairs])  # type: ignore[attr-defined]
    tgt = tokenizer.encode_batch([t for _, t in pairs], add_eos=False)  # type: ignore[attr-defined]
    kept = [(s, t) for s, t in zip(src, tgt) if len(s) <= max_length and len(t) + 1 <= max_length
            and (max_positions is None or len(truncate(s, max_positions)) == len(s))]
    if len(kept) < len(pairs):
        log.info("dropped %d of %d pairs longer than %d tokens (or than the positional table allows)",
                 len(pairs) - len(kept), len(pairs), max_length)
    return kept


def token_batches(
    examples: Sequence[tuple[list[int], list[int]]],
    batch_tokens: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
) -> Iterator[Batch]:
    """Group examples of similar length so that each padded batch holds about ``batch_tokens``.

    Examples are sorted by length (within shuffled buckets when ``shuffle``), cut into batches
    whose padded size ``count * longest`` stays within the budget, and the batches are
    yielded in random order. One example longer than the budget forms its own batch.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    size = lambda i: max(len(examples[i][0]), len(examples[i][1]) + 1)  # noqa: E731
    # sort within large chunks: similar lengths together, but not the same batches every epoch
    chunk = max(1, batch_tokens * 8 // 16)
    order = [i for c in range(0, len(order), chunk) for i in sorted(order[c : c + chunk], key=size)]
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        longest_if_added = max(longest, size(i))
        if current and longest_if_added * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest_if_added = [], size(i)
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    for indices in batches:
        yield collate([examples[i] for i in indices])
