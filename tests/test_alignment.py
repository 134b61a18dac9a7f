"""Word alignments: the merging rule on hand-made pieces, and the service's `alignment` fields."""

from __future__ import annotations

import numpy as np
import pytest

from stepwise.serve.alignment import (
    alignment_error_rate,
    attention_source,
    parse_pharaoh,
    pharaoh,
    word_alignment,
    words,
)

from support.models import SAMPLE_PAIRS
from support.processes import BentoProcess

# "Und Gott sprach" -> "God said ." as pieces, EOS on both sides
SOURCE = ["▁Und", "▁Got", "t", "▁sprach", "</s>"]
TARGET = ["▁God", "▁sa", "id", ".", "</s>"]
# rows: target pieces (query), columns: source pieces (key); each row sums to 1
ATTENTION = np.array([
    # Und  Got   t    sprach EOS
    [0.10, 0.50, 0.20, 0.00, 0.20],  # ▁God
    [0.00, 0.10, 0.00, 0.40, 0.50],  # ▁sa
    [0.20, 0.00, 0.00, 0.60, 0.20],  # id
    [0.00, 0.00, 0.00, 1.00, 0.00],  # .   (same word as "said": "said." is one whitespace token)
    [0.30, 0.30, 0.00, 0.00, 0.40],  # EOS
])


@pytest.mark.unit
def test_pieces_merge_into_whitespace_words() -> None:
    assert words(SOURCE) == (["Und", "Gott", "sprach"], [[0], [1, 2], [3]])
    assert words(TARGET) == (["God", "said."], [[0], [1, 2, 3]])
    assert words(["Got", "t", "▁", "„", "Ja"]) == (["Gott", "„Ja"], [[0, 1], [2, 3, 4]])  # first piece starts a word


@pytest.mark.unit
def test_word_alignment_follows_the_rule() -> None:
    aligned = word_alignment(ATTENTION, SOURCE, TARGET)
    assert aligned.source_words == ["Und", "Gott", "sprach"] and aligned.target_words == ["God", "said."]
    # by hand: drop the EOS column and renormalise each row, sum source pieces, average target pieces
    god = np.array([0.10, 0.50 + 0.20, 0.00]) / 0.80
    sa, id_, dot = np.array([0.00, 0.10, 0.40]) / 0.50, np.array([0.20, 0.00, 0.60]) / 0.80, np.array([0, 0, 1.0])
    expected = np.stack([god, (sa + id_ + dot) / 3])
    np.testing.assert_allclose(aligned.soft, expected, atol=1e-12)
    np.testing.assert_allclose(aligned.soft.sum(axis=1), 1.0, atol=1e-12)
    assert aligned.hard() == [(1, 0), (2, 1)] and aligned.pharaoh() == "1-0 2-1"


@pytest.mark.unit
def test_a_row_with_all_its_mass_on_eos_is_uniform() -> None:
    attention = np.array([[0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    aligned = word_alignment(attention, SOURCE, ["▁Ja", "</s>"])
    np.testing.assert_allclose(aligned.soft, [[0.25, 0.5, 0.25]])  # "Gott" has two of the four pieces


@pytest.mark.unit
def test_empty_translation_and_shape_mismatch() -> None:
    aligned = word_alignment(np.ones((1, 5)) / 5, SOURCE, ["</s>"])
    assert aligned.target_words == [] and aligned.soft.shape == (0, 3) and aligned.pharaoh() == ""
    with pytest.raises(ValueError, match="attention is"):
        word_alignment(np.ones((2, 5)), SOURCE, ["</s>"])


@pytest.mark.unit
def test_layer_and_head_choice() -> None:
    cross = np.random.default_rng(0).random((3, 4, 5, 6))
    np.testing.assert_array_equal(attention_source(cross, 1, 2), cross[1, 2])
    np.testing.assert_allclose(attention_source(cross, "average", 2), cross[:, 2].mean(axis=0))
    np.testing.assert_allclose(attention_source(cross, 0, "average"), cross[0].mean(axis=0))
    np.testing.assert_allclose(attention_source(cross, "average", "average"), cross.mean(axis=(0, 1)))


@pytest.mark.unit
def test_pharaoh_and_alignment_error_rate() -> None:
    assert parse_pharaoh(pharaoh([(0, 0), (2, 1)])) == {(0, 0), (2, 1)}
    sure, possible = {(0, 0), (1, 1)}, {(2, 1)}
    assert alignment_error_rate(sure, sure) == 0.0
    assert alignment_error_rate({(0, 0), (2, 1)}, sure, possible) == pytest.approx(1 - (1 + 2) / 4)
    assert alignment_error_rate({(1, 0)}, sure) == 1.0


# -- over HTTP: a real `bentoml serve` ---------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tiny_service: BentoProcess) -> BentoProcess:
    """The session's shared service: these tests only read from it."""
    return tiny_service


@pytest.mark.integration
def test_service_alignments(service: BentoProcess) -> None:
    text = SAMPLE_PAIRS[2][0]
    plain = service.post("/translate", {"text": text}).json()
    assert "alignment" not in plain
    full = service.post("/translate", {"text": text, "attention": "all"}).json()
    soft = service.post("/translate", {"text": text, "alignment": "soft", "alignment_layer": "average"}).json()
    for key in ("translation", "source_tokens", "target_tokens", "attention", "score"):
        assert soft[key] == plain[key]
    got = soft["alignment"]
    assert got["layer"] == "average" and got["head"] == "average"
    assert got["source_words"] == text.split()
    assert got["target_words"] == plain["translation"].split()
    matrix = np.array(got["soft"])
    assert matrix.shape == (len(got["target_words"]), len(got["source_words"]))
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-4)  # EOS dropped, rows renormalised
    expected = word_alignment(np.array(full["attention"]["cross"]).mean(axis=(0, 1)), plain["source_tokens"],
                              plain["target_tokens"])
    np.testing.assert_allclose(matrix, expected.soft, atol=1e-4)

    hard = service.post("/translate", {"text": text, "alignment": "hard", "alignment_layer": 1,
                                       "alignment_head": 3, "attention": "none"}).json()
    assert hard["attention"] == {} and hard["alignment"]["layer"] == 1 and hard["alignment"]["head"] == 3
    pairs = [tuple(map(int, pair.split("-"))) for pair in hard["alignment"]["hard"].split()]
    assert [j for _, j in pairs] == list(range(len(hard["alignment"]["target_words"])))  # each target word once
    assert all(0 <= i < len(hard["alignment"]["source_words"]) for i, _ in pairs)
    chosen = word_alignment(np.array(full["attention"]["cross"])[1, 3], plain["source_tokens"], plain["target_tokens"])
    assert hard["alignment"]["hard"] == chosen.pharaoh()

    default = service.post("/translate", {"text": text, "alignment": "hard"}).json()["alignment"]
    assert default["layer"] == "average" and default["head"] == "average"  # the measured default
    assert default["hard"] == expected.pharaoh()


@pytest.mark.integration
@pytest.mark.parametrize(("body", "field"), [
    ({"alignment": "fuzzy"}, "alignment"),
    ({"alignment": "hard", "alignment_layer": 2}, "alignment_layer"),
    ({"alignment": "hard", "alignment_layer": -1}, "alignment_layer"),
    ({"alignment": "hard", "alignment_layer": "last"}, "alignment_layer"),
    ({"alignment": "soft", "alignment_head": 4}, "alignment_head"),
    ({"alignment": "soft", "alignment_head": "1"}, "alignment_head"),
    ({"alignment_layer": 0}, "alignment_layer"),  # without an alignment it would be silently ignored
])
def test_bad_alignment_fields_are_400_naming_the_field(service: BentoProcess, body: dict, field: str) -> None:
    answer = service.post("/translate", {"text": "Liebet eure Feinde.", **body})
    assert answer.status_code == 400, answer.text
    payload = answer.json()
    assert any(field in d.get("loc", []) for d in payload["detail"]), payload
