"""The contribution rule (ALTI+, ``stepwise.model.contributions``) on hand-computed cases, and the
scorer graph's teacher-forced pass in PyTorch against the model's own forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stepwise.export import ScorerGraph
from stepwise.model import contributions

from support.models import make_model, padded_batch

pytestmark = pytest.mark.unit


def _identity_projection(d: int) -> nn.Linear:
    linear = nn.Linear(d, d)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(d))
        linear.bias.zero_()
    return linear


def test_shares_of_a_hand_computed_sublayer() -> None:
    # one head, W_V = W_O = I, no biases: x = [1, 0] attends with α = [0.5, 0.5] to v = [1, 0], [0, 2]
    # T(1) = [0.5, 0], T(2) = [0, 1], y = x + T(1) + T(2) = [1.5, 1], ‖y‖₁ = 2.5
    # residual: 2.5 - ‖[0.5, 1]‖₁ = 1.0; T(1): 2.5 - ‖[1, 1]‖₁ = 0.5; T(2): 2.5 - ‖[1.5, 0]‖₁ = 1.0 -> / 2.5
    out_proj = _identity_projection(2)
    values = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])  # [B=1, H=1, T_k=2, d_k=2]
    weights = torch.tensor([[[[0.5, 0.5]]]])  # [B, H, T_q=1, T_k]
    terms = contributions.decompose(weights, contributions.head_values(values, out_proj))
    assert torch.allclose(terms, torch.tensor([[[[0.5, 0.0], [0.0, 1.0]]]]))
    residual_share, term_shares = contributions.shares(torch.tensor([[[1.0, 0.0]]]), terms, out_proj.bias)
    assert torch.allclose(residual_share, torch.tensor([[0.4]]))
    assert torch.allclose(term_shares, torch.tensor([[[0.2, 0.4]]]))


def test_a_masked_head_contributes_nothing() -> None:
    values = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]], [[[3.0, 0.0], [0.0, 1.0]]]]).transpose(0, 1)  # H = 2 heads
    out_proj = nn.Linear(4, 2)
    with torch.no_grad():
        out_proj.weight.copy_(torch.cat([torch.eye(2), torch.eye(2)], dim=1))
        out_proj.bias.zero_()
    weights = torch.tensor([[[[0.5, 0.5]], [[1.0, 0.0]]]])
    masked = contributions.decompose(weights, contributions.head_values(values, out_proj), torch.tensor([1.0, 0.0]))
    assert torch.allclose(masked, torch.tensor([[[[0.5, 0.0], [0.0, 1.0]]]]))


def test_layer_norm_is_applied_to_each_component_as_a_linear_map() -> None:
    # after LayerNorm (γ = 1, β = 0, ε ≈ 0) the components are centred and divided by σ(y)
    norm = nn.LayerNorm(2, eps=1e-12)
    residual, terms = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[[0.5, 0.0], [0.0, 1.0]]]])
    # y = [1.5, 1] -> LN(y) = [1, -1] (σ = 0.25); centred components: x [0.5, -0.5], T1 [0.25, -0.25],
    # T2 [-0.5, 0.5], divided by σ: [2, -2], [1, -1], [-2, 2]; ‖LN(y)‖₁ = 2
    # contributions: 2 - ‖[-1, 1]‖₁ = 0; 2 - ‖[0, 0]‖₁ = 2; 2 - ‖[3, -3]‖₁ < 0 -> 0  =>  [0, 1, 0]
    residual_share, term_shares = contributions.shares(residual, terms, torch.zeros(2), norm)
    assert torch.allclose(residual_share, torch.tensor([[0.0]]), atol=1e-6)
    assert torch.allclose(term_shares, torch.tensor([[[1.0, 0.0]]]), atol=1e-6)


def test_rollout_of_hand_set_shares() -> None:
    # one source position, two target positions
    rollout = contributions.start(torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.long))
    assert torch.equal(rollout, torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]))
    rollout = contributions.mix_self(rollout, torch.tensor([[0.5, 0.5]]), torch.tensor([[[0.5, 0.0], [0.25, 0.25]]]))
    assert torch.allclose(rollout, torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.25, 0.75]]]))
    rollout = contributions.mix_cross(rollout, torch.tensor([[0.6, 0.2]]), torch.tensor([[[0.4], [0.8]]]))
    assert torch.allclose(rollout, torch.tensor([[[0.4, 0.6, 0.0], [0.8, 0.05, 0.15]]]))


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_scorer_graph_matches_teacher_forcing(placement: str) -> None:
    model = make_model(seed=3, vocab_size=40, norm_placement=placement)
    src, src_mask = padded_batch(40, [6, 4], seed=2)
    tgt, _ = padded_batch(40, [5, 5], seed=4)
    following = torch.roll(tgt, -1, dims=1)
    masks = torch.ones(2, 4)
    masks[1, 2] = 0.0
    head_mask = {"decoder": masks, "cross": masks.flip(0)}
    with torch.no_grad():
        memory, _ = model.encode(src, src_mask)
        kv = model.cross_key_values(memory)
        log_probs, self_w, cross_w, rollout = ScorerGraph(model)(
            src_mask, tgt, following, head_mask["decoder"], head_mask["cross"], *[k for k, _ in kv],
            *[v for _, v in kv])
        logits, attention = model(src, tgt, src_pad_mask=src_mask, return_attention=True, head_mask=head_mask)
    reference = torch.log_softmax(logits, -1).gather(-1, following[..., None])[..., 0]
    assert torch.allclose(log_probs, reference, atol=1e-5)
    assert torch.allclose(self_w, torch.stack(attention["decoder"]), atol=1e-6)
    assert torch.allclose(cross_w, torch.stack(attention["cross"]), atol=1e-6)
    assert rollout.shape == (2, 5, 6 + 5)
    assert torch.allclose(rollout.sum(-1), torch.ones(2, 5), atol=1e-5)
    assert (rollout >= 0).all()
    assert torch.all(rollout[1, :, 4:6] == 0)  # source padding contributes nothing
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    assert torch.all(rollout[:, :, 6:][:, causal] == 0)  # nor do later target positions
