"""KV-cache decoding against full recomputation; greedy against beam search; the k×k beam
ranking against a full-vocabulary reference beam search; the output budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepwise.decoding import beam_search, decode, greedy_decode
from stepwise.models import Transformer
from stepwise.search import length_limits

from conftest import make_model, padded_batch


def _trained_looking_model() -> Transformer:
    # sharpen the output distribution so decoding is not a near-tie at every step
    model = make_model(seed=3, vocab_size=40)
    with torch.no_grad():
        model.output_projection.weight.mul_(4.0)
    return model


def never_eos(model: Transformer) -> Transformer:
    """Make a pre-LN model unable to prefer EOS: the final norm's bias puts 100 on feature 0, which
    only EOS's output row reads (with weight -1), so EOS's logit is about -100 at every step."""
    eos = model.config.eos_id
    with torch.no_grad():
        model.decoder_norm.bias[0] = 100.0
        model.output_projection.weight[:, 0] = 0.0
        model.output_projection.weight[eos, 0] = -1.0
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


def reference_beam_search(model: Transformer, src: torch.Tensor, *, beam_size: int, length_penalty: float,
                          max_length: int) -> tuple[list[int], float]:
    """The textbook beam search for one unpadded sentence: no cache, every (hypothesis, token) pair
    of the whole vocabulary ranked at each step, a finished hypothesis carried at its score."""
    cfg = model.config
    beams: list[tuple[list[int], float, bool]] = [([], 0.0, False)]
    for _ in range(max_length):
        candidates = []
        for tokens, score, done in beams:
            if done:
                candidates.append((tokens, score, True))
                continue
            with torch.no_grad():
                logits = model(src[None], torch.tensor([[cfg.bos_id, *tokens]]))
            log_probs = torch.log_softmax(logits[0, -1].float(), -1)
            log_probs[[cfg.pad_id, cfg.bos_id]] = float("-inf")
            for token, gain in enumerate(log_probs.tolist()):
                candidates.append(([*tokens, token], score + gain, token == cfg.eos_id))
        candidates.sort(key=lambda c: -c[1])
        beams = candidates[:beam_size]
        if all(done for _, _, done in beams):
            break

    def ranked(beam: tuple[list[int], float, bool]) -> float:
        return beam[1] / ((5.0 + len(beam[0])) / 6.0) ** length_penalty

    tokens, _, _ = max(beams, key=ranked)
    return tokens, ranked(max(beams, key=ranked))


@pytest.mark.parametrize("beam_size", [2, 4])
def test_k_by_k_ranking_equals_full_vocabulary_beam_search(beam_size: int) -> None:
    model = _trained_looking_model()
    src, src_mask = padded_batch(40, [6, 4, 7, 5], seed=11)
    hyps = beam_search(model, src, src_mask, beam_size=beam_size, length_penalty=0.6, max_length=9)
    for b, hyp in enumerate(hyps):
        real = int((~src_mask[b]).sum())
        tokens, score = reference_beam_search(model, src[b, :real], beam_size=beam_size, length_penalty=0.6,
                                              max_length=9)
        assert hyp.tokens + ([model.config.eos_id] if hyp.finished else []) == tokens
        assert hyp.score == pytest.approx(score, abs=1e-4)


def test_default_budget_is_two_source_lengths_plus_ten_within_the_positional_table() -> None:
    model = never_eos(make_model(seed=2, vocab_size=40, norm_placement="pre", max_positions=48))
    lengths = [3, 9, 20]  # budgets 16, 28 and 50 -> 47 (max_positions - 1)
    src, src_mask = padded_batch(40, lengths, seed=4)
    assert length_limits(lengths, None, 48).tolist() == [16, 28, 47]
    for beam in (1, 3):
        hyps = decode(model, src, src_mask, beam_size=beam)
        assert [len(h.tokens) for h in hyps] == [16, 28, 47]
        assert not any(h.finished for h in hyps)
        # max_length caps every sentence, short or long
        capped = decode(model, src, src_mask, beam_size=beam, max_length=12)
        assert [len(h.tokens) for h in capped] == [12, 12, 12]
