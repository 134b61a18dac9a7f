"""Encoder and decoder layers (paper section 3.1).

Each sub-layer (attention or feed-forward) is wrapped in a residual connection and layer
normalisation. The paper places the norm after the residual sum (post-LN)::

    x = LayerNorm(x + Dropout(Sublayer(x)))

Pre-LN, ``x = x + Dropout(Sublayer(LayerNorm(x)))``, trains more stably without warmup and is
offered as an option; it needs a final LayerNorm after the stack (see ``Transformer``).

An encoder layer is self-attention then feed-forward. A decoder layer is masked
self-attention, attention over the encoder output (cross-attention), then feed-forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from stepwise.model.attention import MultiHeadAttention
from stepwise.model.feed_forward import PositionwiseFeedForward

KeyValue = tuple[Tensor, Tensor]


class _Residual(nn.Module):
    """Residual connection + LayerNorm around one sub-layer, post-LN or pre-LN."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention and a position-wise feed-forward network."""

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, *, dropout: float = 0.1, attention_dropout: float = 0.0,
        activation: str = "relu", pre_norm: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, dropout, activation)
        self.attn_block = _Residual(d_model, dropout, pre_norm)
        self.ff_block = _Residual(d_model, dropout, pre_norm)

    def forward(
        self, x: Tensor, *, bias: Tensor | None = None, need_weights: bool = False, head_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``x [B, S, d]`` with source-padding ``bias`` -> ``(x, weights [B, H, S, S] or None)``.

        ``head_mask`` (``[H]`` or ``[1, H, 1, 1]``) scales each self-attention head's output (ablation;
        see ``MultiHeadAttention.attend``).
        """
        weights: list[Tensor | None] = [None]

        def self_attention(h: Tensor) -> Tensor:
            out, weights[0] = self.self_attn.attend(h, *self.self_attn.project_key_value(h), bias=bias,
                                                    need_weights=need_weights, head_mask=head_mask)
            return out

        x = self.attn_block(x, self_attention)
        x = self.ff_block(x, self.feed_forward)
        return x, weights[0]


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder output, feed-forward.

    Self-attention keys/values of earlier positions can be passed in (``past``) so that
    decoding one token at a time costs one position's work per layer; the layer returns the
    grown keys/values (``present``).
    """

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, *, dropout: float = 0.1, attention_dropout: float = 0.0,
        activation: str = "relu", pre_norm: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, dropout, activation)
        self.self_block = _Residual(d_model, dropout, pre_norm)
        self.cross_block = _Residual(d_model, dropout, pre_norm)
        self.ff_block = _Residual(d_model, dropout, pre_norm)

    def forward(
        self,
        x: Tensor,
        cross_kv: KeyValue,
        *,
        self_bias: Tensor | None = None,
        cross_bias: Tensor | None = None,
        past: KeyValue | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
        self_head_mask: Tensor | None = None,
        cross_head_mask: Tensor | None = None,
    ) -> tuple[Tensor, KeyValue, Tensor | None, Tensor | None]:
        """Run the layer on ``x [B, T, d]``.

        Args:
            x: target-side states for the new positions.
            cross_kv: encoder memory projected by ``cross_attn.project_key_value``, per row or once
                per sentence for ``k`` consecutive rows (beam search; see ``MultiHeadAttention.attend``).
            self_bias: causal (+ target padding) bias for self-attention.
            cross_bias: source-padding bias for cross-attention.
            past: self-attention keys/values of earlier positions ``[B, H, t, d_k]``.
            is_causal: ``self_bias`` is purely causal and square (lets the fused kernel mask).
            need_weights: return attention weights.
            self_head_mask: ``[H]`` (or ``[1, H, 1, 1]``) factors for the self-attention heads' outputs
                (ablation).
            cross_head_mask: the same for the cross-attention heads.

        Returns:
            ``(x, present_kv, self_weights [B,H,T,t+T], cross_weights [B,H,T,S])``.
        """
        present: list[KeyValue] = []
        weights: list[Tensor | None] = [None, None]

        def self_attention(h: Tensor) -> Tensor:
            key, value = self.self_attn.project_key_value(h)
            if past is not None:
                key = _cat_time(past[0], key)
                value = _cat_time(past[1], value)
            present.append((key, value))
            out, weights[0] = self.self_attn.attend(h, key, value, bias=self_bias, is_causal=is_causal,
                                                    need_weights=need_weights, head_mask=self_head_mask)
            return out

        def cross_attention(h: Tensor) -> Tensor:
            out, weights[1] = self.cross_attn.attend(h, *cross_kv, bias=cross_bias, need_weights=need_weights,
                                                     head_mask=cross_head_mask)
            return out

        x = self.self_block(x, self_attention)
        x = self.cross_block(x, cross_attention)
        x = self.ff_block(x, self.feed_forward)
        return x, present[0], weights[0], weights[1]


def _cat_time(past: Tensor, new: Tensor) -> Tensor:
    # [B, H, t, d_k] ++ [B, H, T, d_k] along time
    return torch.cat([past, new], dim=2)
