"""Which sentence splitter for German paragraphs: each candidate on a hand-made gold set.

``python -m bench.sentence_split`` prints, for each splitter that is installed (``pysbd``,
``sentencex``, ``sentence-splitter``), how many of the gold sentences it returns exactly and how
many paragraphs it splits exactly right. The gold set is German prose of the kind the service
gets: abbreviations (``z. B.``, ``Dr.``, ``usw.``, ``vgl.``, ``d. h.``, ``Ca.``, ``Nr.``), ordinals
(``16. Jahrhundert``, ``3. Mose``, ``1. Korinther 13``, ``24. Dezember``), a year or an
abbreviation ending a sentence, times (``9.30 Uhr``), quoted speech (``„Es werde Licht!“, sprach
Gott.``), questions, exclamations and an ellipsis. Each paragraph is its sentences joined by one
space; a splitter's sentences are compared after stripping whitespace.

``tests/test_paragraphs.py`` checks the splitter the service uses against the same set.
"""

from __future__ import annotations

from collections.abc import Callable

# each paragraph as its gold sentences
GOLD: list[list[str]] = [
    ["Martin Luther übersetzte die Bibel im 16. Jahrhundert ins Deutsche.",
     "Dr. Luther arbeitete z. B. auf der Wartburg daran.",
     "Das Neue Testament erschien 1522.",
     "Danach folgte das Alte Testament."],
    ["Lies heute 1. Korinther 13, das Hohelied der Liebe.",
     "Dort steht: „Die Liebe ist langmütig und freundlich.“",
     "Vgl. auch Röm. 12,9 und Joh. 3,16.",
     "Am 24. Dezember lesen wir Lk. 2 vor."],
    ["Die Gesetze stehen im 2. und 3. Mose.",
     "Sie regeln Opfer, Feste, Speisen usw.",
     "Manche Christen lesen sie kaum."],
    ["„Es werde Licht!“, sprach Gott.",
     "Und es ward Licht.",
     "Wer hat das gesehen?",
     "Niemand war dabei!"],
    ["Der Gottesdienst beginnt um 9.30 Uhr in der Hauptstr. 5.",
     "Ca. 300 Menschen kommen, d. h. fast das ganze Dorf.",
     "Prof. Dr. Müller predigt am 3. Advent über Ps. 23.",
     "Nr. 7 im Gesangbuch wird gesungen."],
    ["Er sagte: „Ich komme bald wieder.“",
     "Dann ging er hinaus ... und kam nicht zurück.",
     "Die Jünger warteten bis zum 1. Mai."],
]


def paragraphs() -> list[str]:
    """The gold paragraphs as a user would paste them."""
    return [" ".join(sentences) for sentences in GOLD]


def _boundaries(sentences: list[str]) -> set[int]:
    """Where each sentence but the last ends, counted in non-space characters."""
    ends, at = set(), 0
    for sentence in sentences[:-1]:
        at += len("".join(sentence.split()))
        ends.add(at)
    return ends


def score(split: Callable[[str], list[str]]) -> dict[str, int]:
    """Gold sentences returned exactly, paragraphs split exactly right, boundaries right, wrong
    (a split inside a gold sentence) and missed (two gold sentences left together)."""
    sentences = paragraphs_right = right = wrong = missed = 0
    for gold, text in zip(GOLD, paragraphs(), strict=True):
        found = [s.strip() for s in split(text) if s.strip()]
        sentences += sum(1 for s in gold if s in found)
        paragraphs_right += found == gold
        want, got = _boundaries(gold), _boundaries(found)
        right, wrong, missed = right + len(want & got), wrong + len(got - want), missed + len(want - got)
    return {"sentences": sentences, "of_sentences": sum(len(g) for g in GOLD),
            "paragraphs": paragraphs_right, "of_paragraphs": len(GOLD),
            "boundaries": right, "of_boundaries": sum(len(g) - 1 for g in GOLD), "wrong": wrong, "missed": missed}


def candidates() -> dict[str, Callable[[str], list[str]]]:
    """The installed splitters, German rules, by PyPI name and version."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, Callable[[str], list[str]]] = {}
    try:
        import pysbd

        segmenter = pysbd.Segmenter(language="de", clean=False)
        found[f"pysbd {version('pysbd')}"] = segmenter.segment
    except ImportError:
        pass
    try:
        import sentencex

        found[f"sentencex {version('sentencex')}"] = lambda text: list(sentencex.segment("de", text))
    except (ImportError, PackageNotFoundError):
        pass
    try:
        from sentence_splitter import SentenceSplitter

        found[f"sentence-splitter {version('sentence-splitter')}"] = SentenceSplitter(language="de").split
    except ImportError:
        pass
    return found


def main() -> None:
    print("| splitter | gold sentences returned exactly | paragraphs exactly right | boundaries found | "
          "wrong splits | missed |")
    print("| --- | --- | --- | --- | --- | --- |")
    wrong_answers = []
    for name, split in candidates().items():
        s = score(split)
        print(f"| {name} | {s['sentences']}/{s['of_sentences']} | {s['paragraphs']}/{s['of_paragraphs']} | "
              f"{s['boundaries']}/{s['of_boundaries']} | {s['wrong']} | {s['missed']} |")
        for gold, text in zip(GOLD, paragraphs(), strict=True):
            found = [x.strip() for x in split(text) if x.strip()]
            if found != gold:
                wrong_answers.append(f"{name}: {' ‖ '.join(found)}")
    print("\n" + "\n".join(wrong_answers))


if __name__ == "__main__":
    main()
