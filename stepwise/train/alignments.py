"""Word alignments of a training corpus by eflomal, cached per corpus version; their pieces for guided alignment.

Guided alignment (Garg et al. 2019, "Jointly Learning to Align and Translate"; Marian's
``--guided-alignment``) trains one cross-attention head towards a statistical aligner's links.
The links here are between **whitespace words** (the words of :mod:`stepwise.serve.alignment`,
punctuation attached), so they do not depend on the tokenizer each run trains: one alignment
of a corpus serves every run on it, whatever its vocabulary. At training time each word link
``i-j`` becomes links between every piece of source word ``i`` and every piece of target word
``j`` (:func:`piece_links`).

* **The aligner.** eflomal (Östling & Tiedemann 2016; ``pip install eflomal``, in the ``corpus``
  extra) through its Python API, on the words with punctuation at their edges stripped
  (:func:`eflomal_words`; the words keep their places), in both directions, symmetrised with
  grow-diag-final-and (Koehn et al. 2005; :func:`grow_diag_final_and`).
* **Once per corpus version.** The links of a corpus are stored as one Pharaoh line per pair
  (``i-j ...``, source first, 0-based): in a ClearML dataset version as ``train.align`` beside
  ``train.tsv`` (``stepwise corpus --upload ... --alignments`` puts it there; a version that has
  it is read, never re-aligned), otherwise in the cache folder (``STEPWISE_ALIGNMENT_CACHE``,
  default ``~/.cache/stepwise/alignments``) under the digest of the training pairs, so a changed
  corpus is a new file and an unchanged one is aligned once.

No torch here: the corpus upload uses it too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import string
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from stepwise.errors import CorpusError
from stepwise.serve.alignment import parse_pharaoh, pharaoh, words

log = logging.getLogger(__name__)

Links = set[tuple[int, int]]
Pair = tuple[str, str]
Aligner = Callable[[Sequence[Pair]], list[Links]]

ALIGNMENTS_FILE = "train.align"  # a ClearML dataset version's alignments of its train.tsv
CACHE_ENV = "STEPWISE_ALIGNMENT_CACHE"
_EDGE_PUNCTUATION = string.punctuation + "„“”‚‘’«»–—"


def eflomal_words(text: str) -> str:
    """The whitespace words as eflomal sees them: punctuation at the edges stripped, one per word."""
    return " ".join(word.strip(_EDGE_PUNCTUATION) or word for word in text.split())


def grow_diag_final_and(forward: Links, reverse: Links) -> Links:
    """Symmetrise two directional alignments (Koehn et al. 2005; Moses' ``grow-diag-final-and``).

    Start from the intersection; add union links next to (also diagonally) an aligned link while
    either of their words is unaligned, until nothing changes; then add union links of each
    direction whose words are both unaligned.
    """
    union = forward | reverse
    alignment = forward & reverse
    source_aligned = {i for i, _ in alignment}
    target_aligned = {j for _, j in alignment}
    neighbours = [(-1, 0), (0, -1), (1, 0), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]
    grown = True
    while grown:
        grown = False
        for i, j in sorted(alignment):
            for di, dj in neighbours:
                link = (i + di, j + dj)
                if link in union and link not in alignment and (
                        link[0] not in source_aligned or link[1] not in target_aligned):
                    alignment.add(link)
                    source_aligned.add(link[0])
                    target_aligned.add(link[1])
                    grown = True
    for direction in (forward, reverse):
        for i, j in sorted(direction):
            if i not in source_aligned and j not in target_aligned:
                alignment.add((i, j))
                source_aligned.add(i)
                target_aligned.add(j)
    return alignment


def read_links(path: Path) -> list[Links]:
    """One set of ``(i, j)`` links per line of a Pharaoh file."""
    return [parse_pharaoh(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_links(path: Path, links: Sequence[Links]) -> None:
    """Write one Pharaoh line per pair (sorted by target, then source), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False,
                                     prefix=f".{path.name}.") as out:
        out.writelines(pharaoh(sorted(pair, key=lambda link: (link[1], link[0]))) + "\n" for pair in links)
    os.replace(out.name, path)


def eflomal_directions(pairs: Sequence[Pair]) -> tuple[list[Links], list[Links]]:
    """eflomal's forward (each target word gets a source word) and reverse links of every pair.

    Raises:
        CorpusError: eflomal is not installed.
    """
    try:
        from eflomal import Aligner as Eflomal
    except ModuleNotFoundError:
        raise CorpusError("guided alignment needs eflomal: pip install 'stepwise[corpus]' "
                          "(or set train.guided_alignment_weight=0)") from None
    source = [eflomal_words(s) for s, _ in pairs]
    target = [eflomal_words(t) for _, t in pairs]
    with tempfile.TemporaryDirectory(prefix="stepwise-eflomal-") as tmp:
        forward_file, reverse_file = Path(tmp) / "forward", Path(tmp) / "reverse"
        Eflomal().align(source, target, links_filename_fwd=str(forward_file),
                        links_filename_rev=str(reverse_file), quiet=True)
        return read_links(forward_file), read_links(reverse_file)


def eflomal_alignments(pairs: Sequence[Pair]) -> list[Links]:
    """eflomal's links of every pair, both directions symmetrised with grow-diag-final-and."""
    started = time.perf_counter()
    forward, reverse = eflomal_directions(pairs)
    links = [grow_diag_final_and(f, r) for f, r in zip(forward, reverse, strict=True)]
    log.info("eflomal aligned %d pairs in %.0fs", len(pairs), time.perf_counter() - started)
    return links


def corpus_digest(pairs: Sequence[Pair]) -> str:
    """A digest of the pairs, the name of their alignments in the cache (a changed corpus, a new name)."""
    digest = hashlib.sha256()
    for source, target in pairs:
        digest.update(f"{source}\t{target}\n".encode())
    return digest.hexdigest()[:24]


def cache_dir() -> Path:
    """Where alignments of corpora are kept: ``STEPWISE_ALIGNMENT_CACHE`` or ``~/.cache/stepwise/alignments``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "stepwise" / "alignments")


def _readable(path: Path, count: int) -> list[Links] | None:
    """The links of ``path`` when it holds exactly ``count`` lines of them, else None."""
    if not path.is_file():
        return None
    try:
        links = read_links(path)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable alignments %s: %s", path, exc)
        return None
    if len(links) != count:
        log.warning("ignoring %s: %d lines for %d pairs", path, len(links), count)
        return None
    return links


def training_alignments(pairs: Sequence[Pair], *, dataset_folder: Path | None = None,
                        aligner: Aligner = eflomal_alignments) -> list[Links]:
    """The word links of every training pair: a dataset version's, the cache's, or aligned now and cached.

    Args:
        pairs: the training pairs, in order (the whole split, or its first ``data.max_train_pairs``).
        dataset_folder: the local copy of the ClearML dataset version the pairs come from, whose
            ``train.align`` is used when it has one.
        aligner: what aligns when nothing is stored (eflomal; tests pass their own).
    """
    if dataset_folder is not None:
        links = _readable(dataset_folder / ALIGNMENTS_FILE, len(pairs))
        if links is not None:
            log.info("word alignments from the dataset version (%s)", ALIGNMENTS_FILE)
            return links
        log.info("the dataset version has no %s (stepwise corpus --upload ... --alignments adds it): "
                 "aligning here, cached", ALIGNMENTS_FILE)
    path = cache_dir() / f"{corpus_digest(pairs)}.align"
    links = _readable(path, len(pairs))
    if links is not None:
        log.info("word alignments from the cache (%s)", path)
        return links
    links = aligner(pairs)
    write_links(path, links)
    log.info("word alignments of %d pairs cached in %s", len(pairs), path)
    return links


def piece_links(source_pieces: Sequence[str], target_pieces: Sequence[str], links: Links, *,
                source_words: int, target_words: int, eos: str = "</s>") -> np.ndarray | None:
    """Word links as links between pieces: every piece of source word ``i`` with every piece of target word ``j``.

    Args:
        source_pieces: the source's pieces as the model reads them (EOS included, linked to nothing).
        target_pieces: the target's pieces (no BOS or EOS).
        links: ``(i, j)`` word links.
        source_words: the whitespace words of the source text (the links' numbering).
        target_words: the same for the target.
        eos: the EOS piece string.

    Returns:
        ``[N, 2]`` int32 rows ``(target piece, source piece)``; None when the pieces do not make
        as many words as the text has (the links could not be placed).
    """
    _, source_members = words(list(source_pieces), eos=eos)
    _, target_members = words(list(target_pieces), eos=eos)
    if len(source_members) != source_words or len(target_members) != target_words:
        return None
    rows = [(t, s) for i, j in links if i < source_words and j < target_words
            for t in target_members[j] for s in source_members[i]]
    return np.array(sorted(rows), dtype=np.int32).reshape(-1, 2)
