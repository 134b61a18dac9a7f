"""Scoring a given translation: the export's scorer graph against PyTorch teacher forcing, and
``POST /score`` (and ``contributions``) on the session's tiny service."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stepwise.decode.onnx_runtime import OnnxTranslator
from stepwise.explorer.divergence import common_prefix
from stepwise.export import teacher_forced
from stepwise.serve import alignment
from stepwise.train.checkpoint import load_checkpoint

from support.models import PARAGRAPH, SAMPLE_PAIRS
from support.processes import BentoProcess

pytestmark = pytest.mark.integration

TEXT, GIVEN = SAMPLE_PAIRS[0]


@pytest.fixture(scope="module")
def translator(tiny_export: tuple[Path, Path]) -> OnnxTranslator:
    return OnnxTranslator(tiny_export[1], device="cpu")


def test_the_export_records_the_scorers_parity(tiny_export: tuple[Path, Path]) -> None:
    manifest = json.loads((tiny_export[1] / "manifest.json").read_text())
    assert manifest["format"] == 5 and "scorer.onnx" in manifest["files"]
    assert manifest["parity"]["scorer_max_abs_log_prob_diff"] < 1e-3
    assert manifest["parity"]["scorer_max_abs_attention_diff"] < 1e-4


def test_scorer_matches_pytorch_teacher_forcing_in_a_padded_batch(tiny_export: tuple[Path, Path],
                                                                   translator: OnnxTranslator) -> None:
    model = load_checkpoint(tiny_export[0]).build_model()
    sources = [translator.encode_text(src) for src, _ in SAMPLE_PAIRS]
    targets = [translator.encode_text(tgt) for _, tgt in SAMPLE_PAIRS][::-1]  # lengths differ: both sides padded
    masks = {"decoder": np.ones((2, 4), dtype=np.float32), "cross": np.ones((2, 4), dtype=np.float32),
             "encoder": np.ones((2, 4), dtype=np.float32)}
    masks["cross"][1, 0] = masks["decoder"][0, 3] = 0.0
    for head_mask in (None, masks):
        torch_mask = None if head_mask is None else {k: torch.from_numpy(v) for k, v in head_mask.items()}
        for ours, src, tgt in zip(translator.score_ids(sources, targets, head_mask=head_mask), sources, targets,
                                  strict=True):
            reference = teacher_forced(model, src, tgt, head_mask=torch_mask)
            np.testing.assert_allclose(ours.log_probs, reference.log_probs, atol=1e-3)
            assert ours.score == pytest.approx(float(reference.log_probs.sum()), abs=1e-2)
            for kind in ("encoder", "decoder", "cross"):
                np.testing.assert_allclose(ours.attention[kind], reference.attention[kind], atol=1e-4)
            assert ours.contributions.shape == (len(tgt), len(src) + len(tgt))
            np.testing.assert_allclose(ours.contributions.sum(axis=1), 1.0, atol=1e-4)
            summary = ours.contribution_summary()
            assert len(summary["source_share"]) == len(tgt) and len(summary["source"]) == len(src)
            assert all(0.0 <= v <= 1.0 for v in summary["source_share"])


def test_scoring_the_searchs_output_gives_its_attention(translator: OnnxTranslator) -> None:
    sources = [translator.encode_text(src) for src, _ in SAMPLE_PAIRS]
    for beam in (1, 4):
        hyps = translator.decode_ids(sources, beam_size=beam, max_length=12, return_attention=True)
        emitted = [h.tokens + ([translator.tokenizer.eos_id] if h.finished else []) for h in hyps]
        for hyp, scored in zip(hyps, translator.score_ids(sources, emitted), strict=True):
            for kind in ("encoder", "decoder", "cross"):
                np.testing.assert_allclose(scored.attention[kind], hyp.attention[kind], atol=1e-4)


def test_score_answers_like_translate(tiny_service: BentoProcess, translator: OnnxTranslator) -> None:
    response = tiny_service.post("/score", {"text": TEXT, "translation": GIVEN, "attention": "all",
                                            "alignment": "hard", "contributions": True})
    assert response.status_code == 200, response.text
    body = response.json()
    (expected,) = translator.score([TEXT], [GIVEN])
    assert body["translation"] == GIVEN
    assert body["source_tokens"] == expected.source_tokens and body["target_tokens"] == expected.target_tokens
    assert body["target_tokens"][-1] == alignment.EOS_PIECE and len(body["log_probs"]) == len(body["target_tokens"])
    assert body["score"] == pytest.approx(sum(body["log_probs"]), abs=1e-3)
    for kind in ("encoder", "decoder", "cross"):
        np.testing.assert_allclose(np.array(body["attention"][kind]), expected.attention[kind], atol=1e-5)
    source = alignment.attention_source(expected.attention["cross"], body["alignment"]["layer"],
                                        body["alignment"]["head"])
    words = alignment.word_alignment(source, expected.source_tokens, expected.target_tokens, eos=alignment.EOS_PIECE)
    assert body["alignment"]["hard"] == words.pharaoh()
    contributions = body["contributions"]
    assert len(contributions["source_share"]) == len(body["target_tokens"])
    assert len(contributions["source"]) == len(body["source_tokens"])


def test_score_of_the_services_own_translation_returns_its_attention(tiny_service: BentoProcess) -> None:
    for beam in (1, 3):
        own = tiny_service.post("/translate", {"text": TEXT, "attention": "all", "beam_size": beam}).json()
        scored = tiny_service.post("/score", {"text": TEXT, "translation": own["translation"],
                                              "attention": "all"}).json()
        # an untrained model's translation may stop at its length budget without EOS, which the given
        # text then gains: the rows of the tokens both share are the same prefixes, so the same weights
        shared = common_prefix(scored["target_tokens"], own["target_tokens"])
        assert shared >= len(own["target_tokens"]) - 1 and shared > 0, (own["target_tokens"], scored["target_tokens"])
        np.testing.assert_allclose(np.array(scored["attention"]["encoder"]), np.array(own["attention"]["encoder"]),
                                   atol=1e-4)
        for kind in ("decoder", "cross"):
            ours, theirs = np.array(scored["attention"][kind]), np.array(own["attention"][kind])
            keys = shared if kind == "decoder" else ours.shape[-1]
            np.testing.assert_allclose(ours[:, :, :shared, :keys], theirs[:, :, :shared, :keys], atol=1e-4)


def test_contributions_are_optional_and_change_nothing_else(tiny_service: BentoProcess) -> None:
    plain = tiny_service.post("/translate", {"text": TEXT, "attention": "all"}).json()
    with_contributions = tiny_service.post("/translate", {"text": TEXT, "attention": "all",
                                                          "contributions": True}).json()
    assert "contributions" not in plain
    for field in ("translation", "source_tokens", "target_tokens", "attention", "score"):
        assert with_contributions[field] == plain[field], field
    shares = with_contributions["contributions"]["source_share"]
    assert len(shares) == len(plain["target_tokens"]) and all(0.0 <= v <= 1.0 for v in shares)
    # the stream's final answer carries them too
    answer = tiny_service.post("/translate_stream", {"text": TEXT, "contributions": True}, stream=True)
    done = answer.text.split("event: done\ndata: ", 1)[1].split("\n", 1)[0]
    assert json.loads(done)["contributions"] == with_contributions["contributions"]


def test_split_sentences_are_paired(tiny_service: BentoProcess) -> None:
    given = " ".join(target for _, target in SAMPLE_PAIRS[:3])
    body = tiny_service.post("/score", {"text": PARAGRAPH, "translation": given, "split": "sentences",
                                        "contributions": True}).json()
    assert [s["translation"] for s in body["sentences"]] == [target for _, target in SAMPLE_PAIRS[:3]]
    assert body["log_probs"] == [p for s in body["sentences"] for p in s["log_probs"]]
    assert body["contributions"]["source_share"] == [v for s in body["sentences"]
                                                     for v in s["contributions"]["source_share"]]
    assert body["score"] == pytest.approx(sum(s["score"] for s in body["sentences"]), abs=1e-3)


@pytest.mark.parametrize(("body", "field"), [
    ({"text": TEXT}, "translation"),
    ({"text": TEXT, "translation": "  "}, "translation"),
    ({"text": TEXT, "translation": GIVEN, "beam_size": 2}, "beam_size"),
    ({"text": TEXT, "translation": GIVEN, "contributions": "yes"}, "contributions"),
    ({"text": TEXT, "translation": GIVEN, "heads": [99]}, "heads"),
    ({"text": PARAGRAPH, "translation": GIVEN, "split": "sentences"}, "translation"),
])
def test_bad_values_are_a_400_naming_the_field(tiny_service: BentoProcess, body: dict[str, object],
                                               field: str) -> None:
    response = tiny_service.post("/score", body)
    assert response.status_code == 400, response.text
    assert field in {str(item["loc"][-1]) for item in response.json()["detail"]}, response.text
