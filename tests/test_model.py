"""The model against PyTorch's own nn.Transformer, and the attention maps it returns."""

from __future__ import annotations

import pytest
import torch

from stepwise.model.attention import MultiHeadAttention, attention_bias
from stepwise.model.reference import to_torch_reference

from support.models import make_model, padded_batch

pytestmark = pytest.mark.unit

PARITY_TOLERANCE = 1e-5


@pytest.mark.parametrize(
    "size",
    [
        dict(d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64),
        dict(d_model=64, n_heads=8, n_encoder_layers=3, n_decoder_layers=1, d_ff=256),
    ],
)
@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_logits_match_torch_nn_transformer(size: dict, norm_placement: str) -> None:
    model = make_model(norm_placement=norm_placement, activation="relu", **size)
    reference = to_torch_reference(model).eval()
    src, src_mask = padded_batch(64, [9, 5, 7], seed=2)
    tgt, tgt_mask = padded_batch(64, [6, 8, 3], seed=3)
    with torch.no_grad():
        ours = model(src, tgt, src_mask, tgt_mask)
        theirs = reference(src, tgt, src_mask, tgt_mask)
    assert ours.shape == (3, 8, 64)
    assert torch.allclose(ours, theirs, atol=PARITY_TOLERANCE, rtol=0), (ours - theirs).abs().max()


def test_reference_is_sensitive_to_weights() -> None:
    """The parity check would notice a wrong weight: perturb one and it fails."""
    model = make_model()
    reference = to_torch_reference(model).eval()
    with torch.no_grad():
        reference.transformer.decoder.layers[0].linear1.weight[0, 0] += 0.5
    src, src_mask = padded_batch(64, [6, 4])
    tgt, tgt_mask = padded_batch(64, [5, 5])
    with torch.no_grad():
        diff = (model(src, tgt, src_mask, tgt_mask) - reference(src, tgt, src_mask, tgt_mask)).abs().max()
    assert diff > 1e-3


def test_attention_maps_are_distributions_with_masks() -> None:
    model = make_model()
    src, src_mask = padded_batch(64, [7, 4, 6])
    tgt, tgt_mask = padded_batch(64, [5, 3, 5])
    with torch.no_grad():
        logits, attention = model(src, tgt, src_mask, tgt_mask, return_attention=True)
    assert set(attention) == {"encoder", "decoder", "cross"}
    assert len(attention["encoder"]) == 2 and len(attention["decoder"]) == 2 and len(attention["cross"]) == 2
    for layer in range(2):
        enc, dec, cross = (attention[k][layer] for k in ("encoder", "decoder", "cross"))
        assert enc.shape == (3, 4, 7, 7) and dec.shape == (3, 4, 5, 5) and cross.shape == (3, 4, 5, 7)
        for weights in (enc, dec, cross):
            assert not torch.isnan(weights).any()
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5, rtol=0)
        # causal: nothing above the diagonal
        upper = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
        assert dec[..., upper].abs().max() == 0
        # padded keys get exactly zero weight
        assert enc.masked_select(src_mask[:, None, None, :].expand_as(enc)).abs().max() == 0
        assert cross.masked_select(src_mask[:, None, None, :].expand_as(cross)).abs().max() == 0
        assert dec.masked_select(tgt_mask[:, None, None, :].expand_as(dec)).abs().max() == 0
    # asking for weights does not change the output (explicit path == fused path)
    with torch.no_grad():
        fast = model(src, tgt, src_mask, tgt_mask)
    torch.testing.assert_close(logits, fast, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_and_fused_attention_paths_agree(causal: bool) -> None:
    torch.manual_seed(0)
    attention = MultiHeadAttention(d_model=48, n_heads=6).eval()
    x = torch.randn(3, 9, 48)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:] = True
    padding[2, 2:] = True
    for mask in (None, padding):
        explicit, weights = attention(x, x, key_padding_mask=mask, causal=causal, need_weights=True)
        fused, none = attention(x, x, key_padding_mask=mask, causal=causal, need_weights=False)
        assert none is None and weights.shape == (3, 6, 9, 9)
        torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)


@pytest.mark.parametrize("need_weights", [True, False], ids=["explicit", "fused"])
def test_queries_regrouped_per_sentence_equal_attending_to_repeated_keys(need_weights: bool) -> None:
    """Beam search's cross-attention: k query rows per sentence against one copy of the sentence's
    keys/values (regrouped inside ``attend``) give each row the output and weights it gets against
    its own repeated copy, with padding and a head switched off."""
    torch.manual_seed(0)
    attention = MultiHeadAttention(d_model=24, n_heads=3).eval()
    sentences, k = 3, 4
    memory = torch.randn(sentences, 7, 24)
    padding = torch.zeros(sentences, 7, dtype=torch.bool)
    padding[1, 4:] = True
    padding[2, 2:] = True
    queries = torch.randn(sentences * k, 1, 24)  # rows b*k ... b*k+k-1: sentence b's hypotheses
    head_mask = torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad():
        key, value = attention.project_key_value(memory)
        once = attention.attend(queries, key, value, bias=attention_bias(key_padding_mask=padding),
                                need_weights=need_weights, head_mask=head_mask)
        repeated = attention.attend(queries, key.repeat_interleave(k, 0), value.repeat_interleave(k, 0),
                                    bias=attention_bias(key_padding_mask=padding.repeat_interleave(k, 0)),
                                    need_weights=need_weights, head_mask=head_mask)
    assert once[0].shape == (sentences * k, 1, 24)
    torch.testing.assert_close(once[0], repeated[0], atol=1e-6, rtol=0)
    if need_weights:
        assert once[1] is not None and once[1].shape == (sentences * k, 3, 1, 7)
        torch.testing.assert_close(once[1], repeated[1], atol=1e-7, rtol=0)
        assert float(once[1][2 * k : 3 * k, :, :, 2:].abs().max()) == 0.0  # sentence 2's padding
    else:
        assert once[1] is None


@pytest.mark.parametrize("need_weights", [True, False], ids=["explicit", "fused"])
def test_fully_masked_row_is_uniform_over_the_keys(need_weights: bool) -> None:
    """The module docstring's promise: a query whose keys are all masked attends to every key
    equally (weights 1/T_k, output the mean of the values), on both paths; other rows are unaffected."""
    torch.manual_seed(0)
    attention = MultiHeadAttention(d_model=16, n_heads=2).eval()
    x = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0] = True  # sentence 0: every key masked
    padding[1, 3:] = True  # sentence 1: an ordinary padded sentence
    with torch.no_grad():
        out, weights = attention(x, x, key_padding_mask=padding, need_weights=need_weights)
        mean_of_values = attention.out_proj(attention.v_proj(x[0]).mean(0))  # uniform weights, then W^O
        unmasked, _ = attention(x[1:], x[1:, :3], key_padding_mask=None, need_weights=need_weights)
    torch.testing.assert_close(out[0], mean_of_values.expand(5, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], unmasked[0], atol=1e-6, rtol=0)  # padding 3: == attending to 3 keys
    if need_weights:
        assert weights is not None and weights.shape == (2, 2, 5, 5)
        torch.testing.assert_close(weights[0], torch.full((2, 5, 5), 1 / 5), atol=1e-7, rtol=0)
    else:
        assert weights is None


@pytest.mark.parametrize(
    "options",
    [dict(positional_encoding="learned"), dict(activation="gelu"), dict(share_embeddings=False, tie_output=False)],
)
def test_model_variants_run_and_learn_shapes(options: dict) -> None:
    model = make_model(**options)
    src, src_mask = padded_batch(64, [5, 3])
    tgt, tgt_mask = padded_batch(64, [4, 4])
    model.train()
    logits = model(src, tgt, src_mask, tgt_mask)
    logits.sum().backward()
    assert logits.shape == (2, 4, 64)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if not options.get("tie_output", True):
        assert model.output_projection.weight is not model.tgt_embed.weight
