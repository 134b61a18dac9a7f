"""The gold word alignments of the validation verses (Jonah, Titus), made by hand, and their scores.

``valid.de-en.tsv`` holds one line per verse of ``load_split(config.data, "valid")`` of the
bundled Bible corpus (German → English), in its order: ``source<TAB>reference<TAB>links``;
links are space-separated, 0-based, German word ``i`` → English word ``j`` of the whitespace
words, ``i-j`` sure and ``i?j`` possible (Och & Ney). ``bench/gold/GUIDELINES.md`` says how they
were drawn. The test books are not annotated: they are kept for an independent check.

Training scores its cross-attention against these verses at every evaluation when its validation
split is exactly them (:func:`gold_for`); the benchmark ``python -m bench alignment`` scores every
reading and eflomal. No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stepwise.serve.alignment import alignment_error_rate

GOLD_DIR = Path(__file__).resolve().parent
VALID = GOLD_DIR / "valid.de-en.tsv"

Links = set[tuple[int, int]]
_LINK = re.compile(r"(\d+)([-?])(\d+)")


@dataclass(frozen=True)
class GoldVerse:
    """One hand-aligned verse.

    ``sure`` holds the links any annotator would draw; ``possible`` the defensible extras only
    (no sure link is repeated there). ``alignment_error_rate`` takes ``sure`` and ``possible``
    as they are: it counts sure links as possible too.
    """

    source: str
    reference: str
    sure: frozenset[tuple[int, int]]
    possible: frozenset[tuple[int, int]]

    @property
    def source_words(self) -> list[str]:
        """The German whitespace words the links index."""
        return self.source.split()

    @property
    def target_words(self) -> list[str]:
        """The English whitespace words the links index."""
        return self.reference.split()


def parse_links(text: str) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """``"0-0 1?2"`` -> ``({(0, 0)}, {(1, 2)})``: sure links, possible links.

    Raises:
        ValueError: a token is not ``i-j`` or ``i?j``, or a link is given twice.
    """
    sure: set[tuple[int, int]] = set()
    possible: set[tuple[int, int]] = set()
    for token in text.split():
        match = _LINK.fullmatch(token)
        if match is None:
            raise ValueError(f"{token!r} is not a link (i-j sure, i?j possible)")
        link = (int(match[1]), int(match[3]))
        if link in sure or link in possible:
            raise ValueError(f"link {link[0]}-{link[1]} is given twice")
        (sure if match[2] == "-" else possible).add(link)
    return sure, possible


def read_gold(path: str | Path = VALID) -> list[GoldVerse]:
    """The verses of a gold alignment file, in its order.

    Args:
        path: a ``source<TAB>reference<TAB>links`` file; the validation set by default.

    Raises:
        ValueError: a line is malformed or a link points past its verse's words; the message
            names the line.
    """
    verses = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}:{number}: expected source, reference and links separated by tabs")
        source, reference, links = fields
        try:
            sure, possible = parse_links(links)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        n_source, n_target = len(source.split()), len(reference.split())
        for i, j in sure | possible:
            if i >= n_source or j >= n_target:
                raise ValueError(f"{path}:{number}: link {i}-{j} is outside {n_source} source × "
                                 f"{n_target} target words")
        verses.append(GoldVerse(source, reference, frozenset(sure), frozenset(possible)))
    return verses


def gold_for(pairs: Sequence[tuple[str, str]]) -> list[GoldVerse] | None:
    """The gold verses when ``pairs`` (a validation split) are exactly them, in order; else None.

    So the gold set is used for the bundled de→en Bible corpus (as a corpus or as a ClearML dataset
    made from it) and skipped for any other corpus.
    """
    verses = read_gold()
    if len(pairs) != len(verses) or any((v.source, v.reference) != tuple(p) for v, p in zip(verses, pairs)):
        return None
    return verses


def scores(hypotheses: Sequence[Links], verses: Sequence[GoldVerse]) -> tuple[float, float, float]:
    """AER, precision and recall of one system's links, pooled over the verses.

    Precision is ``|A∩P| / |A|`` (a link is right if it is at least possible), recall
    ``|A∩S| / |S|`` (sure links found); AER is ``1 - (|A∩S| + |A∩P|) / (|A| + |S|)``.
    """
    hypothesis, sure, possible = set(), set(), set()
    for n, (links, verse) in enumerate(zip(hypotheses, verses, strict=True)):
        hypothesis |= {(n, i, j) for i, j in links}
        sure |= {(n, i, j) for i, j in verse.sure}
        possible |= {(n, i, j) for i, j in verse.sure | verse.possible}
    precision = len(hypothesis & possible) / len(hypothesis) if hypothesis else 0.0
    recall = len(hypothesis & sure) / len(sure) if sure else 0.0
    return alignment_error_rate(hypothesis, sure, possible), precision, recall
