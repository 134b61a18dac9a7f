"""Word alignments from cross-attention: SentencePiece pieces merged into words.

The decoder's cross-attention row ``t`` is what the model looked at while it produced target
token ``t``, a distribution over the source pieces. Word alignment (as fast_align or Moses
write it) is between *words*, so the pieces are merged:

* **Words.** A word starts at a piece that begins with ``▁`` (SentencePiece's whitespace mark),
  or at the first piece; every other piece continues the word before it. So the words are the
  whitespace-separated tokens of the text, punctuation attached (``zornig.`` is one word). A
  word's text is its pieces joined, the ``▁`` removed.
* **EOS is not a word.** The source's ``</s>`` column is dropped and every target piece's row is
  renormalised over the remaining source pieces, so it sums to 1 again (EOS often absorbs much of
  the mass, a "no source word in particular" sink, and would otherwise shrink some rows more than
  others). The target's ``</s>`` row (the decision to stop) is dropped.
* **Source pieces are summed** within a word: the probability of attending to any piece of the
  word. **Target pieces are averaged** within a word: each piece's row is a distribution, and
  so is their mean, so every target word's row still sums to 1.

The result, ``soft``, is a ``[target words, source words]`` matrix whose rows sum to 1. The hard
alignment links each target word ``j`` to its argmax source word ``i`` (one link per target
word, none left unaligned), written as Pharaoh pairs ``i-j`` (0-based, source first), ordered
by ``j``. Which cross-attention feeds it — one layer or the average of the layers, one head or
the average of the heads — is :func:`attention_source`'s choice. A model aligns by default with
the reading its registered version records (:func:`default_reading`: training measures the
gold-set AER of the average and, with guided alignment, of the guided head, and keeps the better);
a model whose version records none aligns with ``DEFAULT_LAYER``/``DEFAULT_HEAD``.

numpy only: the service imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

WORD_START = "\u2581"  # "▁", SentencePiece's mark for a preceding space
EOS_PIECE = "</s>"
AVERAGE = "average"

# Which cross-attention aligns when the model's version records no reading of its own: the
# average of every layer and head, the best reading of a model trained without guided alignment
# (``python -m bench alignment``). It needs no depth-specific rule, so it means the same for any model.
DEFAULT_LAYER: Literal["average"] = AVERAGE
DEFAULT_HEAD: Literal["average"] = AVERAGE

Choice = int | Literal["average"]


@dataclass(frozen=True)
class Reading:
    """Which cross-attention aligns a model's words by default, and how well it aligned the gold set.

    ``source`` says where it comes from: ``"version metadata"`` (what training measured) or
    ``"fallback"`` (``DEFAULT_LAYER``/``DEFAULT_HEAD``; ``aer`` None).
    """

    layer: Choice
    head: Choice
    aer: float | None = None
    reading: str = "predicting step"
    source: str = "fallback"

    def to_dict(self) -> dict[str, object]:
        """What ``/model`` reports."""
        return {"layer": self.layer, "head": self.head, "reading": self.reading, "aer": self.aer,
                "source": self.source}


def _choice(value: object, count: int) -> Choice | None:
    """``"average"`` or an index below ``count`` (given as an int or its text); None otherwise."""
    if value == AVERAGE:
        return AVERAGE
    try:
        index = int(str(value))
    except ValueError:
        return None
    return index if 0 <= index < count else None


def default_reading(metadata: dict[str, object] | None, layers: int, heads: int) -> Reading:
    """The reading a version's metadata records (``alignment_layer``, ``alignment_head``, ``aer``), if usable.

    Args:
        metadata: the version's metadata (values as the registry keeps them: text).
        layers: the model's decoder layers.
        heads: its heads per layer.

    Returns:
        The recorded reading; the fallback (``DEFAULT_LAYER``/``DEFAULT_HEAD``) when the metadata
        has none, or one that does not fit the model, or one measured at another step than the
        predicting one (the only one the service reads).
    """
    metadata = metadata or {}
    layer = _choice(metadata.get("alignment_layer"), layers)
    head = _choice(metadata.get("alignment_head"), heads)
    reading = str(metadata.get("alignment_reading", "predicting step"))
    if layer is None or head is None or reading != "predicting step":
        return Reading(DEFAULT_LAYER, DEFAULT_HEAD)
    try:
        aer = float(str(metadata["aer"]))
    except (KeyError, ValueError):
        aer = None
    return Reading(layer, head, aer, reading, "version metadata")


@dataclass
class WordAlignment:
    """The words of both sides and the word-level cross-attention between them.

    ``soft[j, i]`` is target word ``j``'s attention on source word ``i``; each row sums to 1.
    """

    source_words: list[str]
    target_words: list[str]
    soft: np.ndarray

    def hard(self) -> list[tuple[int, int]]:
        """``(i, j)`` pairs: each target word ``j`` with its argmax source word ``i``, by ``j``."""
        if self.soft.size == 0:
            return []
        return [(int(i), j) for j, i in enumerate(self.soft.argmax(axis=1))]

    def pharaoh(self) -> str:
        """The hard alignment as one Pharaoh line, ``"0-0 1-2 ..."`` (source-target, 0-based)."""
        return pharaoh(self.hard())


def words(pieces: list[str], *, eos: str = EOS_PIECE) -> tuple[list[str], list[list[int]]]:
    """Group pieces into words (see the module docstring); EOS pieces belong to no word.

    Returns:
        The words' texts and, for each word, the indices of its pieces.
    """
    texts: list[str] = []
    members: list[list[int]] = []
    for index, piece in enumerate(pieces):
        if piece == eos:
            continue
        if piece.startswith(WORD_START) or not members:
            texts.append("")
            members.append([])
        texts[-1] += piece.replace(WORD_START, "")
        members[-1].append(index)
    return texts, members


def attention_source(cross: np.ndarray, layer: Choice, head: Choice) -> np.ndarray:
    """The ``[T_q, T_k]`` map to align with, from cross-attention ``[L, H, T_q, T_k]``.

    Args:
        cross: cross-attention weights of one sentence.
        layer: a layer index (negative counts from the last) or ``"average"`` of all layers.
        head: a head index or ``"average"`` of all heads.
    """
    weights = cross.mean(axis=0) if layer == AVERAGE else cross[layer]
    return weights.mean(axis=0) if head == AVERAGE else weights[head]


def word_alignment(
    weights: np.ndarray, source_pieces: list[str], target_pieces: list[str], *, eos: str = EOS_PIECE,
) -> WordAlignment:
    """Merge a piece-level attention map ``[T_q, T_k]`` into a word-level one (module docstring).

    Args:
        weights: one map, rows = target pieces (query), columns = source pieces (key).
        source_pieces: the source's pieces, EOS included as the model saw it.
        target_pieces: the emitted pieces, EOS included when the translation finished.
        eos: the EOS piece string.

    Returns:
        The word lists and ``soft`` with rows summing to 1 (an empty ``[0, I]`` matrix when the
        translation has no word).
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(target_pieces), len(source_pieces)):
        raise ValueError(f"attention is {weights.shape}, pieces are {len(target_pieces)} x {len(source_pieces)}")
    source_words, source_members = words(source_pieces, eos=eos)
    target_words, target_members = words(target_pieces, eos=eos)
    kept = [i for members in source_members for i in members]  # every source piece but EOS
    rows = weights[:, kept]
    totals = rows.sum(axis=1, keepdims=True)
    # a row with all its mass on EOS has no preference: spread it evenly
    rows = np.divide(rows, totals, out=np.full_like(rows, 1.0 / max(len(kept), 1)), where=totals > 0)
    column = {piece: k for k, piece in enumerate(kept)}
    by_source = np.stack([rows[:, [column[i] for i in members]].sum(axis=1) for members in source_members], axis=1) \
        if source_members else np.zeros((len(target_pieces), 0))
    soft = np.stack([by_source[members].mean(axis=0) for members in target_members]) \
        if target_members else np.zeros((0, len(source_words)))
    return WordAlignment(source_words, target_words, soft)


def pharaoh(pairs: Iterable[tuple[int, int]]) -> str:
    """``[(0, 0), (1, 2)]`` -> ``"0-0 1-2"``."""
    return " ".join(f"{i}-{j}" for i, j in pairs)


def parse_pharaoh(line: str) -> set[tuple[int, int]]:
    """``"0-0 1-2"`` -> ``{(0, 0), (1, 2)}``."""
    return {(int(i), int(j)) for i, j in (pair.split("-") for pair in line.split())}


def alignment_error_rate(
    hypothesis: set[tuple[int, ...]], sure: set[tuple[int, ...]], possible: set[tuple[int, ...]] | None = None,
) -> float:
    """Och & Ney's AER: ``1 - (|A∩S| + |A∩P|) / (|A| + |S|)``; ``possible`` includes ``sure``.

    Args:
        hypothesis: the links to score (``A``).
        sure: gold links every annotator would draw (``S``).
        possible: gold links that are also acceptable (``P``, a superset of ``S``); default ``S``.
    """
    possible = (possible or set()) | sure
    if not hypothesis and not sure:
        return 0.0
    return 1.0 - (len(hypothesis & sure) + len(hypothesis & possible)) / (len(hypothesis) + len(sure))
