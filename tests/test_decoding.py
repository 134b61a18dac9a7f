"""KV-cache decoding against full recomputation; greedy against beam search.

The k×k beam ranking against a full-vocabulary beam search and the output budget: tests/test_search.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepwise.decode.pytorch import beam_search, greedy_decode
from stepwise.model import Transformer

from support.models import make_model, padded_batch

pytestmark = pytest.mark.unit


def _trained_looking_model() -> Transformer:
    # sharpen the output distribution so decoding is not a near-tie at every step
    model = make_model(seed=3, vocab_size=40)
    with torch.no_grad():
        model.output_projection.weight.mul_(4.0)
    return model


def test_cached_greedy_equals_full_recomputation() -> None:
    model = _trained_looking_model()
    cfg = model.config
    src, src_mask = padded_batch(40, [7, 4, 6], seed=5)
    hyps = greedy_decode(model, src, src_mask, max_length=10, return_attention=True)
    for b, hyp in enumerate(hyps):
        emitted = hyp.tokens + ([cfg.eos_id] if hyp.finished else [])
        tgt_in = torch.tensor([[cfg.bos_id, *emitted[:-1]]])
        real = int((~src_mask[b]).sum())
        with torch.no_grad():
            logits, attention = model(src[b : b + 1, :real], tgt_in, return_attention=True)
        # the same tokens: each step's argmax of the full pass is what the cache produced
        # (decoding never generates PAD or BOS)
        logits[..., [cfg.pad_id, cfg.bos_id]] = float("-inf")
        assert logits[0].argmax(-1).tolist() == emitted
        # the same attention, step by step, as [L, H, T_q, T_k] cut to the real lengths
        for kind in ("encoder", "decoder", "cross"):
            full = torch.stack([w[0] for w in attention[kind]]).numpy()
            np.testing.assert_allclose(hyp.attention[kind], full, atol=1e-5, rtol=0)


def test_beam_size_one_equals_greedy() -> None:
    model = _trained_looking_model()
    src, src_mask = padded_batch(40, [6, 6, 3, 5], seed=7)
    greedy = greedy_decode(model, src, src_mask, max_length=12, return_attention=True)
    beam = beam_search(model, src, src_mask, beam_size=1, max_length=12, return_attention=True)
    for g, b in zip(greedy, beam, strict=True):
        assert g.tokens == b.tokens
        for kind in ("decoder", "cross"):
            np.testing.assert_allclose(g.attention[kind], b.attention[kind])


def test_beam_search_scores_at_least_greedy_and_attention_is_consistent() -> None:
    model = _trained_looking_model()
    src, src_mask = padded_batch(40, [6, 4, 7], seed=9)
    greedy = greedy_decode(model, src, src_mask, max_length=12)
    beams = beam_search(model, src, src_mask, beam_size=4, length_penalty=0.0, max_length=12,
                        return_attention=True)
    for b, (g, hyp) in enumerate(zip(greedy, beams, strict=True)):
        # with no length penalty the beam keeps greedy's path in view, so it can only do as well or better
        assert hyp.score >= g.score - 1e-4
        steps = len(hyp.tokens) + int(hyp.finished)
        real = int((~src_mask[b]).sum())
        cross = hyp.attention["cross"]
        assert cross.shape == (2, 4, steps, real)
        np.testing.assert_allclose(cross.sum(-1), np.ones((2, 4, steps)), atol=1e-5, rtol=0)
        # the beam's attention is that of its own tokens under full recomputation
        tgt_in = torch.tensor([[model.config.bos_id, *(hyp.tokens + [model.config.eos_id])[: steps - 1]]])
        with torch.no_grad():
            _, full = model(src[b : b + 1, :real], tgt_in, return_attention=True)
        np.testing.assert_allclose(hyp.attention["cross"][1], full["cross"][1][0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(hyp.attention["decoder"][0], full["decoder"][0][0].numpy(), atol=1e-5, rtol=0)
