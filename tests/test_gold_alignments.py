"""The hand-made gold alignments: the validation verses exactly as the project loads them, and
links that are well-formed and cover the references."""

from __future__ import annotations

import pytest

from bench.gold import VALID, parse_links, read_gold
from stepwise.config import load_config
from stepwise.train.data import load_split

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def gold():
    return read_gold()


def test_gold_holds_every_validation_verse_in_order(gold) -> None:
    pairs = load_split(load_config("tiny").data, "valid")
    assert len(gold) == len(pairs) == 94
    assert [(verse.source, verse.reference) for verse in gold] == [tuple(pair) for pair in pairs]


def test_links_are_within_the_words_and_each_verse_has_a_sure_link(gold) -> None:
    for n, verse in enumerate(gold):
        assert verse.sure, f"verse {n} has no sure link"
        assert not verse.sure & verse.possible, f"verse {n}: a link is both sure and possible"
        for i, j in verse.sure | verse.possible:
            assert i < len(verse.source_words) and j < len(verse.target_words), f"verse {n}: {i}-{j}"


def test_sure_links_cover_most_target_words(gold) -> None:
    covered = sum(len({j for _, j in verse.sure}) for verse in gold)
    total = sum(len(verse.target_words) for verse in gold)
    assert covered / total >= 0.5


def test_file_lists_each_link_once() -> None:
    for number, line in enumerate(VALID.read_text(encoding="utf-8").splitlines(), start=1):
        tokens = line.split("\t")[2].split()
        assert len(tokens) == len(set(tokens)), f"line {number} repeats a link"


def test_parse_links_and_read_gold_reject_malformed_input(tmp_path) -> None:
    assert parse_links("0-0 1?2 3-1") == ({(0, 0), (3, 1)}, {(1, 2)})
    with pytest.raises(ValueError, match="twice"):
        parse_links("0-1 0?1")
    with pytest.raises(ValueError, match="not a link"):
        parse_links("0:1")
    bad = tmp_path / "bad.tsv"
    bad.write_text("Und Gott sprach\tGod said\t0?0 1-0 2-2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv:1: link 2-2 is outside 3 source × 2 target words"):
        read_gold(bad)


def test_alignment_scores_and_symmetrisation() -> None:
    from bench.alignment import diagonal, grow_diag_final_and, scores

    verse = read_gold()[0]
    assert scores([set(verse.sure)], [verse]) == (0.0, 1.0, 1.0)
    aer, precision, recall = scores([set(verse.possible)], [verse])
    assert precision == 1.0 and recall == 0.0 and aer > 0
    assert all(len(links) == len(v.target_words) for links, v in zip(diagonal([verse]), [verse], strict=True))
    forward = {(0, 0), (1, 1), (3, 3)}
    reverse = {(0, 0), (1, 1), (2, 1), (5, 0)}
    # the intersection, grown by (2, 1) next to (1, 1); then (3, 3), whose words are both unaligned;
    # (5, 0) is next to no link and its target word is aligned already
    assert grow_diag_final_and(forward, reverse) == {(0, 0), (1, 1), (2, 1), (3, 3)}
