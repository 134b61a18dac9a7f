"""Splitting a paragraph into sentences before translation.

A model trained on verses ends early on a long input, so the service (``split: "sentences"``)
cuts a paragraph into sentences, translates them as one batch and joins the translations. The
splitter is ``sentencex`` with the rules of the model's source language: on the German gold set
in ``bench/sentence_split.py`` it returned 16 of 22 sentences exactly and 15 of 16 boundaries,
ahead of ``pysbd`` (13/22, 13/16) and the Moses splitter ``sentence-splitter`` (11/22, 10/16);
its mistakes there are splits after an ordinal (``im 16. | Jahrhundert``, ``1. | Korinther``) and
a sentence ending in ``usw.`` left joined to the next. It is also the one of the three still
released (the others' last releases are from 2021 and 2019).
"""

from __future__ import annotations

import sentencex

DEFAULT_LANGUAGE = "de"


def split_sentences(text: str, language: str = DEFAULT_LANGUAGE) -> list[str]:
    """The sentences of ``text``, whitespace around each removed, empty ones dropped.

    Args:
        text: a paragraph (or a single sentence, which comes back as the only item).
        language: an ISO 639 code whose rules to use (``sentencex`` falls back to related
            languages, then English, for one it has no rules for).
    """
    return [sentence.strip() for sentence in sentencex.segment(language, text) if sentence.strip()]
