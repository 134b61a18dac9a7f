"""Length-bucketed batches with a token budget, from the pairs of :mod:`stepwise.train.corpus`.

The corpus readers (``load_split`` and the rest) live in :mod:`stepwise.train.corpus`, which
imports no torch; they are re-exported here for training's callers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
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
    (target + EOS). ``alignment`` (guided alignment only) holds the gold piece links as ``[N, 3]``
    rows ``(batch row, target position, source position)``, kept sparse until
    :meth:`alignment_rows` makes the dense rows on the batch's device.
    """

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    src_pad_mask: Tensor
    tgt_pad_mask: Tensor
    alignment: Tensor | None = None

    @property
    def target_tokens(self) -> int:
        """Real (non-pad) target tokens, the unit of the token budget and of tokens/s."""
        return int((~self.tgt_pad_mask).sum())

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to ``device``."""
        return Batch(*(getattr(self, f).to(device) for f in ("src", "tgt_in", "tgt_out", "src_pad_mask",
                                                               "tgt_pad_mask")),
                     alignment=None if self.alignment is None else self.alignment.to(device))

    def alignment_rows(self) -> Tensor:
        """``[B, T, S]``: row ``t`` is the gold distribution over source pieces for the step that predicts
        ``tgt_out[t]`` (uniform over the pieces linked to that target piece), all zeros where it has none."""
        assert self.alignment is not None
        rows = torch.zeros(*self.tgt_in.shape, self.src.shape[1], device=self.src.device)
        rows[self.alignment[:, 0], self.alignment[:, 1], self.alignment[:, 2]] = 1.0
        return rows / rows.sum(dim=-1, keepdim=True).clamp_min(1.0)


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[Tensor, Tensor]:
    """Right-pad to a ``[B, T]`` long tensor; returns ``(ids, pad_mask)``."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, ids == pad_id


def collate(examples: Sequence[tuple]) -> Batch:
    """Turn ``(source ids with EOS, target ids without BOS/EOS)`` pairs into a Batch.

    Examples of three (guided alignment: :func:`encode_pairs` with ``alignments``) carry their
    ``[N, 2]`` ``(target piece, source piece)`` links, which become ``Batch.alignment`` (with
    each example's row in the batch in front).
    """
    src, src_mask = pad_sequences([e[0] for e in examples])
    tgt_in, tgt_mask = pad_sequences([[BOS_ID, *e[1]] for e in examples])
    tgt_out, _ = pad_sequences([[*e[1], EOS_ID] for e in examples])
    alignment = None
    if examples and len(examples[0]) == 3:
        alignment = torch.cat([torch.cat([torch.full((len(e[2]), 1), b, dtype=torch.long),
                                          torch.as_tensor(e[2], dtype=torch.long).reshape(-1, 2)], dim=1)
                               for b, e in enumerate(examples)])
    return Batch(src, tgt_in, tgt_out, src_mask, tgt_mask, alignment)


def encode_pairs(
    pairs: Sequence[Pair], tokenizer: object, max_length: int, *, max_positions: int | None = None,
    alignments: Sequence[set[tuple[int, int]]] | None = None,
) -> list[tuple]:
    """Tokenize pairs, dropping those longer than ``max_length`` tokens on either side.

    With ``max_positions``, a pair whose source :func:`stepwise.tokenizer.truncate` would cut is
    dropped too: translation cuts such a source, but a cut source no longer matches its target.

    Args:
        pairs: ``(source, target)`` texts.
        tokenizer: the run's tokenizer.
        max_length: the longest side kept, in tokens (the target's with its EOS).
        max_positions: the positional table's size, if a source may be cut.
        alignments: word links per pair (:mod:`stepwise.train.alignments`): each kept example
            then carries a third item, its ``[N, 2]`` piece links (none for a pair whose pieces
            do not make its whitespace words).

    Returns:
        ``(source ids with EOS, target ids)`` per kept pair (and its piece links).
    """
    src = tokenizer.encode_batch([s for s, _ in pairs])  # type: ignore[attr-defined]
    tgt = tokenizer.encode_batch([t for _, t in pairs], add_eos=False)  # type: ignore[attr-defined]
    keep = [n for n, (s, t) in enumerate(zip(src, tgt)) if len(s) <= max_length and len(t) + 1 <= max_length
            and (max_positions is None or len(truncate(s, max_positions)) == len(s))]
    if len(keep) < len(pairs):
        log.info("dropped %d of %d pairs longer than %d tokens (or than the positional table allows)",
                 len(pairs) - len(keep), len(pairs), max_length)
    if alignments is None:
        return [(src[n], tgt[n]) for n in keep]
    from stepwise.train.alignments import piece_links

    eos = tokenizer.pieces([tokenizer.eos_id])[0]  # type: ignore[attr-defined]
    examples, unplaced = [], 0
    for n in keep:
        links = piece_links(tokenizer.pieces(src[n]), tokenizer.pieces(tgt[n]), alignments[n],  # type: ignore[attr-defined]
                            source_words=len(pairs[n][0].split()), target_words=len(pairs[n][1].split()), eos=eos)
        if links is None:
            unplaced += 1
            links = np.zeros((0, 2), dtype=np.int32)
        examples.append((src[n], tgt[n], links))
    if unplaced:
        log.info("guided alignment: %d of %d pairs have pieces that do not make their words; they train "
                 "without alignment links", unplaced, len(keep))
    return examples


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
