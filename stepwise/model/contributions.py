"""Source and target contributions to each prediction: ALTI+ (Ferrando et al. 2022).

"Towards Opening the Black Box of Neural Machine Translation: Source and Target Contributions to
Predictions" (Ferrando, Gállego, Alastruey, Escolano and Costa-jussà, EMNLP 2022) measures how
much of a target token's prediction came from the source sentence rather than from the target
prefix. Each attention sub-layer's output at query position ``t`` is a sum of one vector per
input position plus the residual (Kobayashi et al. 2020)::

    y_t = x_t + Σ_k T_t(k) + b_O,      T_t(k) = Σ_h α_{h,t,k} · f_h(x_k),   f_h(x) = (x W_V^h + b_V^h) W_O^h

(``W_O^h`` the rows of ``W^O`` that read head ``h``, each head's term scaled by its head-mask
factor). After a post-LN sub-layer, ``LayerNorm`` is applied to each term as the linear map it
is once the standard deviation σ of ``y_t`` is fixed: ``T ↦ γ ⊙ (T − mean(T)) / σ``. The
contribution of component ``k`` (the residual is one component, at position ``t``) is how much
closer it is to the output than the output is to zero, in L1 distance, clipped and normalised::

    c_{t,k} = max(0, ‖y_t‖₁ − ‖y_t − T_t(k)‖₁),     ĉ_{t,k} = c_{t,k} / Σ_j c_{t,j}

Over the decoder the mixing is rolled out (Abnar & Zuidema 2020, as ALTI+ does): every target
position starts as itself, ``R⁰ = [0_S | I_T]`` over the ``S`` source and ``T`` target
positions; decoder self-attention mixes target positions, ``R ← Ĉ_self R``; cross-attention adds
the source, ``R_t ← ĉ_{t,res} R_t + Σ_j ĉ_{t,j} e_j``. Feed-forward sub-layers mix nothing.
The row ``R_t`` of the last layer is what position ``t``'s prediction (of target token ``t+1``)
is made of; its source part is the *source share*.

Simplification: the encoder is not rolled out. The encoder's output positions stand for the
source tokens (ALTI+ continues the rollout through the encoder's own layers), so a source
position's contribution is that of the encoder state at that position.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def head_values(values: Tensor, out_proj: nn.Linear) -> Tensor:
    """``f_h(x_k)`` for every head and key: each head's values through its rows of ``W^O``.

    Args:
        values: ``[B, H, T_k, d_k]`` projected values ``x W_V^h + b_V^h`` (as the graphs cache them).
        out_proj: the attention's ``W^O`` (``weight [d_model, H·d_k]``); its bias is not a term.

    Returns:
        ``[B, H, T_k, d_model]``.
    """
    heads, d_k = values.shape[1], values.shape[3]
    w_o = out_proj.weight.reshape(out_proj.weight.shape[0], heads, d_k)  # [d_model, H, d_k]
    return torch.einsum("bhkd,ohd->bhko", values, w_o)


def decompose(weights: Tensor, transformed: Tensor, head_mask: Tensor | None = None) -> Tensor:
    """The terms ``T_t(k) = Σ_h α_{h,t,k} f_h(x_k)`` of an attention sub-layer's output.

    Args:
        weights: ``[B, H, T_q, T_k]`` attention weights α.
        transformed: ``[B, H, T_k, d_model]`` from :func:`head_values`.
        head_mask: each head's output factor, ``[H]`` or broadcastable as ``[1, H, 1, 1]``.

    Returns:
        ``[B, T_q, T_k, d_model]``.
    """
    if head_mask is not None:
        weights = weights * head_mask.reshape(1, -1, 1, 1).to(weights.dtype)
    return torch.einsum("bhqk,bhko->bqko", weights, transformed)


def shares(residual: Tensor, terms: Tensor, bias: Tensor, norm: nn.LayerNorm | None = None) -> tuple[Tensor, Tensor]:
    """Normalised L1 contributions ``ĉ`` of the residual and of each term to a sub-layer's output.

    Args:
        residual: ``[B, T_q, d]`` the sub-layer's residual input ``x_t``.
        terms: ``[B, T_q, T_k, d]`` from :func:`decompose`.
        bias: ``[d]`` the output projection's bias ``b_O`` (in ``y``, no component's).
        norm: the LayerNorm applied after the sum (post-LN), or None (pre-LN: none there).

    Returns:
        ``(residual share [B, T_q], term shares [B, T_q, T_k])``, summing to 1 per query.
    """
    components = torch.cat([residual[:, :, None], terms], dim=2)  # [B, T_q, 1 + T_k, d]
    output = components.sum(dim=2) + bias
    if norm is not None:  # LayerNorm as a linear map of each component, σ of the whole output
        sigma = torch.sqrt(output.var(dim=-1, unbiased=False, keepdim=True) + norm.eps)[:, :, None]
        components = norm.weight * (components - components.mean(dim=-1, keepdim=True)) / sigma
        output = norm(output)
    distance = (output[:, :, None] - components).abs().sum(dim=-1)  # [B, T_q, 1 + T_k]
    contribution = torch.relu(output.abs().sum(dim=-1, keepdim=True) - distance)
    contribution = contribution / contribution.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return contribution[:, :, 0], contribution[:, :, 1:]


def start(src_pad_mask: Tensor, target: Tensor) -> Tensor:
    """``R⁰ = [0_S | I_T]``: each target position made of itself.

    Args:
        src_pad_mask: ``[B, S]`` (only its shape is read).
        target: ``[B, T]`` target ids (only its shape is read).

    Returns:
        ``[B, T, S + T]`` float32.
    """
    ones = torch.ones_like(target, dtype=torch.float32)
    source = ones[:, :, None] * torch.zeros_like(src_pad_mask, dtype=torch.float32)[:, None, :]  # [B, T, S]
    positions = ones.cumsum(dim=-1)
    identity = (positions[:, :, None] == positions[:, None, :]).float()  # [B, T, T]
    return torch.cat([source, identity], dim=-1)


def mix_self(rollout: Tensor, residual_share: Tensor, term_shares: Tensor) -> Tensor:
    """Self-attention over target positions: ``R_t ← ĉ_{t,res} R_t + Σ_r ĉ_{t,r} R_r``."""
    return residual_share[..., None] * rollout + torch.matmul(term_shares, rollout)


def mix_cross(rollout: Tensor, residual_share: Tensor, source_shares: Tensor) -> Tensor:
    """Cross-attention adds the source: ``R_t ← ĉ_{t,res} R_t + Σ_j ĉ_{t,j} e_j`` (``source_shares [B, T, S]``)."""
    target_part = torch.zeros_like(rollout[:, :, source_shares.shape[-1]:])
    return residual_share[..., None] * rollout + torch.cat([source_shares, target_part], dim=-1)
