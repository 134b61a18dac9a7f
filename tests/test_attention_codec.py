"""Compact attention formats: round trips within 1e-3, sizes against JSON, and over HTTP."""

from __future__ import annotations

import typing

import numpy as np
import orjson
import pytest

from stepwise.serve.attention_codec import FORMATS, MAX_ERROR, decode, decode_all, encode, encode_all
from stepwise.serve.options import ATTENTION_FORMATS
from stepwise.serve.responses import json_bytes

from support.models import SAMPLE_PAIRS
from support.processes import BentoProcess


def _softmax_rows(shape: tuple[int, ...], sharpness: float, seed: int) -> np.ndarray:
    """Attention-like weights rounded as the service rounds them: rows sum to 1."""
    logits = np.random.default_rng(seed).normal(size=shape) * sharpness
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return np.round(weights / weights.sum(-1, keepdims=True), 5).astype(np.float32)


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["float16", "uint10"])
@pytest.mark.parametrize("sharpness", [0.1, 4.0])  # near-uniform (untrained) and peaked (trained-like)
def test_round_trip_within_1e3_and_smaller_than_json(fmt: str, sharpness: float) -> None:
    attention = {"cross": _softmax_rows((6, 8, 30, 32), sharpness, seed=1),
                 "decoder": _softmax_rows((6, 8, 30, 30), sharpness, seed=2)}
    attention["cross"][0, 0, 0] = 0.0
    attention["cross"][0, 0, 0, 0] = 1.0  # the ends of [0, 1] survive
    encoded = encode_all(attention, fmt)
    wire = orjson.loads(json_bytes(encoded))  # through JSON, as a client receives it
    decoded = decode_all(wire)
    for kind, weights in attention.items():
        assert decoded[kind].shape == weights.shape and decoded[kind].dtype == np.float32
        error = np.abs(decoded[kind] - weights).max()
        assert error <= MAX_ERROR[fmt] + 1e-6 and error <= 1e-3, (kind, error)
    assert decoded["cross"][0, 0, 0, 0] == 1.0 and not decoded["cross"][0, 0, 0, 1:].any()
    ratio = len(json_bytes(encoded)) / len(json_bytes(attention))
    assert ratio < (0.45 if fmt == "float16" else 0.2), ratio


@pytest.mark.unit
def test_json_format_is_unchanged_and_bad_payloads_are_named() -> None:
    attention = {"cross": _softmax_rows((1, 2, 3, 4), 1.0, seed=3)}
    assert encode_all(attention, "json") is attention
    np.testing.assert_array_equal(decode(attention["cross"].tolist()), attention["cross"])
    with pytest.raises(ValueError, match="unknown attention format 'uint8'"):
        encode(attention["cross"], "uint8")
    payload = encode(attention["cross"], "uint10")
    with pytest.raises(ValueError, match="shape"):
        decode({**payload, "shape": [1, 2, 3, 5]})
    with pytest.raises(ValueError, match="zlib"):
        decode({**payload, "data": encode(attention["cross"], "float16")["data"]})
    # the service's schema offers exactly the codec's formats
    from stepwise.serve.options import OptionsSchema

    assert typing.get_args(OptionsSchema.model_fields["attention_format"].annotation) == ATTENTION_FORMATS == FORMATS


# -- over HTTP, against a real `bentoml serve` ------------------------------------------------------
@pytest.fixture(scope="module")
def service(tiny_service: BentoProcess) -> BentoProcess:
    """The session's shared service: these tests only read from it."""
    return tiny_service


@pytest.mark.integration
def test_compact_formats_over_http_equal_json(service: BentoProcess) -> None:
    text = f"{SAMPLE_PAIRS[4][0]} {SAMPLE_PAIRS[1][0]}"
    request = {"text": text, "attention": "all", "beam_size": 2}
    plain = service.post("/translate", request)
    default = service.post("/translate", {**request, "attention_format": "json"})
    assert plain.status_code == 200 and plain.json()["attention"] == default.json()["attention"]
    reference = {kind: np.array(weights, dtype=np.float32) for kind, weights in plain.json()["attention"].items()}
    assert set(reference) == {"encoder", "decoder", "cross"}
    for fmt in ("float16", "uint10"):
        compact = service.post("/translate", {**request, "attention_format": fmt})
        assert compact.status_code == 200, compact.text
        body = compact.json()
        assert body["target_tokens"] == plain.json()["target_tokens"]
        decoded = decode_all(body["attention"])
        for kind, weights in reference.items():
            assert decoded[kind].shape == weights.shape
            assert np.abs(decoded[kind] - weights).max() <= 1e-3, (fmt, kind)
        if fmt == "uint10":  # the whole body, not only the attention, within 1/5 of today's
            assert len(compact.content) <= len(plain.content) / 5, (len(compact.content), len(plain.content))
    batch = service.post("/translate_batch", {"texts": [text, SAMPLE_PAIRS[0][0]], "attention": "all",
                                                "beam_size": 2, "attention_format": "uint10"})
    assert batch.status_code == 200
    np.testing.assert_allclose(decode_all(batch.json()[0]["attention"])["cross"], reference["cross"], atol=1e-3)


@pytest.mark.integration
@pytest.mark.parametrize("value", ["uint8", "JSON", 16, None])
def test_bad_attention_format_is_400_naming_the_field(service: BentoProcess, value: object) -> None:
    for path, body in (("/translate", {"text": "hallo"}), ("/translate_batch", {"texts": ["hallo"]})):
        answer = service.post(path, {**body, "attention_format": value})
        assert answer.status_code == 400, answer.text
        assert any("attention_format" in d.get("loc", []) for d in answer.json()["detail"]), answer.text


@pytest.mark.integration
def test_explorer_client_decodes_the_compact_format(service: BentoProcess) -> None:
    from stepwise.serve.client import TranslationClient

    text = SAMPLE_PAIRS[2][0]
    decoded = TranslationClient(service.url).translate(text)
    plain = service.post("/translate", {"text": text, "attention": "all"}).json()
    assert decoded["translation"] == plain["translation"]
    for kind, weights in plain["attention"].items():
        assert isinstance(decoded["attention"][kind], np.ndarray)
        np.testing.assert_allclose(decoded["attention"][kind], np.array(weights), atol=1e-3)
