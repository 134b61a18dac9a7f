"""Paragraphs: split into sentences, translated as one batch, joined, attention per sentence."""

from __future__ import annotations

import numpy as np
import pytest

from bench.sentence_split import GOLD, paragraphs, score
from stepwise.serve.sentences import split_sentences

from support.models import PARAGRAPH, SAMPLE_PAIRS
from support.processes import BentoProcess


@pytest.mark.unit
def test_splitter_on_the_german_gold_set() -> None:
    """The figures the README states for sentencex; a new version that does worse fails here."""
    measured = score(split_sentences)
    assert measured["sentences"] >= 16 and measured["boundaries"] >= 15, measured
    assert split_sentences(paragraphs()[3]) == GOLD[3]  # quoted speech: „Es werde Licht!“, sprach Gott.
    assert split_sentences(PARAGRAPH) == [source for source, _ in SAMPLE_PAIRS[:3]]
    assert split_sentences("  Liebet eure Feinde  ") == ["Liebet eure Feinde"]


@pytest.fixture(scope="module")
def service(tiny_service: BentoProcess) -> BentoProcess:
    """The session's shared service: these tests only read from it."""
    return tiny_service


def _without_timings(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "timings"}


@pytest.mark.integration
def test_three_sentences_come_back_translated_one_by_one_and_joined(service: BentoProcess) -> None:
    answer = service.post("/translate", {"text": PARAGRAPH, "split": "sentences", "attention": "all",
                                         "alignment": "hard"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    sentences = body["sentences"]
    assert [s["source"] for s in sentences] == [source for source, _ in SAMPLE_PAIRS[:3]]
    for sentence in sentences:
        alone = service.post("/translate", {"text": sentence["source"], "attention": "all",
                                            "alignment": "hard"}).json()
        for key in ("translation", "source_tokens", "target_tokens", "alignment", "score"):
            assert sentence[key] == alone[key], key
        s, t = len(sentence["source_tokens"]), len(sentence["target_tokens"])
        shapes = {kind: np.array(weights).shape for kind, weights in sentence["attention"].items()}
        assert shapes == {"encoder": (2, 4, s, s), "decoder": (2, 4, t, t), "cross": (2, 4, t, s)}
        np.testing.assert_allclose(np.array(sentence["attention"]["cross"]),
                                   np.array(alone["attention"]["cross"]), atol=1e-5)
    assert body["translation"] == " ".join(s["translation"] for s in sentences)
    assert body["source_tokens"] == [t for s in sentences for t in s["source_tokens"]]
    assert body["target_tokens"] == [t for s in sentences for t in s["target_tokens"]]
    assert body["attention"] == {} and "alignment" not in body
    assert body["score"] == pytest.approx(sum(s["score"] for s in sentences), abs=1e-4)
    assert body["timings"]["batch_size"] == 3  # the three sentences were decoded as one batch


@pytest.mark.integration
def test_one_sentence_answers_as_before(service: BentoProcess) -> None:
    text = SAMPLE_PAIRS[1][0]
    before = service.post("/translate", {"text": text}).json()
    split = service.post("/translate", {"text": text, "split": "sentences"}).json()
    assert "sentences" not in split and _without_timings(split) == _without_timings(before)
    assert list(split) == list(before)  # the same fields, in the same order
    unsplit = service.post("/translate", {"text": PARAGRAPH}).json()  # no split asked: one input, as today
    assert "sentences" not in unsplit and len(np.array(unsplit["attention"]["cross"]).shape) == 4


@pytest.mark.integration
def test_batch_endpoint_splits_each_text(service: BentoProcess) -> None:
    texts = [PARAGRAPH, SAMPLE_PAIRS[5][0]]
    answer = service.post("/translate_batch", {"texts": texts, "split": "sentences", "attention": "none"})
    assert answer.status_code == 200, answer.text
    first, second = answer.json()
    assert len(first["sentences"]) == 3 and "sentences" not in second
    assert second["translation"] == service.post("/translate", {"text": texts[1]}).json()["translation"]
    bad = service.post("/translate", {"text": PARAGRAPH, "split": "paragraphs"})
    assert bad.status_code == 400 and any("split" in d["loc"] for d in bad.json()["detail"])


@pytest.mark.integration
def test_split_sentences_carry_their_attention_in_the_compact_format(service: BentoProcess) -> None:
    from stepwise.serve.attention_codec import decode_all

    plain = service.post("/translate", {"text": PARAGRAPH, "split": "sentences", "attention": "all"}).json()
    compact = service.post("/translate", {"text": PARAGRAPH, "split": "sentences", "attention": "all",
                                          "attention_format": "uint10"}).json()
    assert len(compact["sentences"]) == len(plain["sentences"]) == 3
    for json_part, compact_part in zip(plain["sentences"], compact["sentences"], strict=True):
        decoded = decode_all(compact_part["attention"])
        assert set(decoded) == set(json_part["attention"]) == {"encoder", "decoder", "cross"}
        for kind, weights in json_part["attention"].items():
            assert np.abs(decoded[kind] - np.asarray(weights)).max() <= 1e-3
