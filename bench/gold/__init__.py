"""The gold word alignments of the validation verses: the package's, :mod:`stepwise.train.gold`.

The file (``stepwise/train/gold/valid.de-en.tsv``) ships with the package, so training can score
its alignments against it; ``GUIDELINES.md`` here says how the links were drawn.
"""

from stepwise.train.gold import VALID, GoldVerse, parse_links, read_gold, scores

__all__ = ["VALID", "GoldVerse", "parse_links", "read_gold", "scores"]
