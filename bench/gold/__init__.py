"""The gold word alignments of the validation verses (Jonah, Titus), made by hand.

``valid.de-en.tsv`` holds one line per verse of ``load_split(config.data, "valid")``, in its
order: ``source<TAB>reference<TAB>links``; links are space-separated, 0-based, German word ``i``
→ English word ``j`` of the whitespace words, ``i-j`` sure and ``i?j`` possible (Och & Ney).
``GUIDELINES.md`` says how they were drawn. The test books are not annotated: they are kept for an
independent check.

The loader lives with the file it reads: the gold set is not part of the installed package, and
only the benchmarks score against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GOLD_DIR = Path(__file__).resolve().parent
VALID = GOLD_DIR / "valid.de-en.tsv"

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
