"""Multi-head scaled dot-product attention (paper section 3.2).

Scaled dot-product attention (equation 1)::

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V

Multi-head attention projects queries, keys and values ``h`` times with different learned
projections, attends in each head in parallel and concatenates the results::

    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,  head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

Two paths compute the same thing. The explicit path writes the softmax out and can return the
per-head weights ``[B, H, T_q, T_k]``; the fast path calls
:func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels) and is used whenever
no weights are asked for. Masks are additive biases built once per batch by
:func:`attention_bias`: 0 where a key may be attended to, the dtype's finite minimum where not,
so a row whose keys are all masked becomes a uniform distribution instead of NaN.

In beam search the ``k`` hypotheses of a sentence share its encoder memory: cross-attention
takes one copy of each sentence's keys and values and regroups the queries instead (``k`` rows'
queries become ``k`` queries of one sentence; see ``MultiHeadAttention.attend``).

Head ablation (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): an optional
per-head mask ``[H]`` scales each head's output ``head_i`` before the concatenation and ``W^O``,
so a head masked with 0 contributes nothing to the layer output (its slice of ``W^O`` sees
zeros; the output bias stays). The attention *weights* returned are still that head's softmax
probabilities: the mask acts on what the head passes on, not on where it looks. No mask (None)
adds no operation; a mask of ones computes the same numbers as none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepwise.errors import InvalidRequest


def attention_bias(
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    query_length: int | None = None,
    key_length: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor | None:
    """Build an additive attention bias of shape ``[B or 1, 1, T_q, T_k]``.

    Args:
        key_padding_mask: ``[B, T_k]`` bool, True where the key is padding.
        causal: forbid each query from attending to later keys (decoder self-attention).
            Queries are taken to be the last ``T_q`` positions of the ``T_k`` keys, which is
            what incremental decoding with a KV cache needs.
        query_length: ``T_q``; required when ``causal``.
        key_length: ``T_k``; taken from ``key_padding_mask`` when omitted.
        dtype: dtype of the bias (use the scores' dtype).
        device: device of the bias.

    Returns:
        The bias, or None when nothing is masked.
    """
    if key_padding_mask is None and not causal:
        return None
    minimum = torch.finfo(dtype).min
    if key_padding_mask is not None:
        key_length = key_padding_mask.shape[-1]
        device = key_padding_mask.device
    if key_length is None:
        raise InvalidRequest("needed without key_padding_mask", field="key_length")
    blocked = torch.zeros(1, 1, 1, key_length, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        blocked = key_padding_mask[:, None, None, :]
    if causal:
        if query_length is None:
            raise InvalidRequest("needed for a causal mask", field="query_length")
        offset = key_length - query_length
        q_pos = torch.arange(query_length, device=device)[:, None] + offset
        k_pos = torch.arange(key_length, device=device)[None, :]
        blocked = blocked | (k_pos > q_pos)[None, None]
    zeros = torch.zeros((), dtype=dtype, device=device)
    return torch.where(blocked, torch.full((), minimum, dtype=dtype, device=device), zeros)


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dropout_p: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Equation 1 written out: returns the output and the attention weights.

    Args:
        q: ``[B, H, T_q, d_k]`` queries.
        k: ``[B, H, T_k, d_k]`` keys.
        v: ``[B, H, T_k, d_v]`` values.
        bias: additive mask broadcastable to ``[B, H, T_q, T_k]``.
        dropout_p: dropout on the weights (training only).

    Returns:
        ``(output [B, H, T_q, d_v], weights [B, H, T_q, T_k])``; weights are the
        post-softmax probabilities (before dropout), each row summing to 1.
    """
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.float()  # softmax in fp32 whatever the compute dtype
    if bias is not None:
        scores = scores + bias.float()
        # bias + score can round below the finite minimum; clamp so it never becomes -inf
        scores = scores.clamp_min(torch.finfo(torch.float32).min)
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return torch.matmul(dropped, v), weights


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate Q, K, V and output projections.

    Keys and values can be projected once with :meth:`project_key_value` and reused: the
    decoder caches them (self-attention grows by one position per step, cross-attention is
    projected once from the encoder memory).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.d_k = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split_heads(self, x: Tensor) -> Tensor:
        # [B, T, d_model] -> [B, H, T, d_k]
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.d_k).transpose(1, 2)

    def project_key_value(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Project ``x [B, T, d_model]`` to per-head keys and values ``[B, H, T, d_k]``."""
        return self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        bias: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
        head_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query [B, T_q, d_model]`` to already projected heads ``key``/``value``.

        Args:
            query: un-projected queries.
            key: ``[B, H, T_k, d_k]`` projected keys, or ``[B/k, H, T_k, d_k]``: one per sentence
                whose ``k`` hypotheses are consecutive query rows of one position each (beam search:
                the queries are regrouped per sentence; no causal mask then).
            value: projected values, shaped as ``key``.
            bias: additive mask from :func:`attention_bias` (includes causality if any), with as
                many rows as ``key`` (or one).
            is_causal: hint for the fast path that ``bias`` is purely causal and square, so the
                fused kernel can build the mask itself (``bias`` is then ignored there).
            need_weights: take the explicit path and return ``[B, H, T_q, T_k]`` weights.
            head_mask: ``[H]`` factors for each head's output before ``W^O`` (0 switches a head
                off), or already shaped to broadcast over ``[B, H, T_q, d_k]`` (``[1, H, 1, 1]``);
                the returned weights are unaffected.

        Returns:
            ``(output [B, T_q, d_model], weights or None)``.
        """
        grouped = query.shape[0] != key.shape[0]
        if grouped:
            # Beam search: rows b*k ... b*k+k-1 are the k hypotheses of sentence b, each with one
            # new position, and all attend to the sentence's one copy of the keys/values. Queries
            # attend independently, so the k rows' queries become k queries of that sentence:
            # [B*k, 1, d] -> [B, k, d], a reshape that moves no data (k is the -1: rows / sentences,
            # so greedy search, k = 1, runs the same code).
            if query.shape[1] != 1:
                raise ValueError("queries regrouped per sentence must be one position per row")
            rows_query, query = query, query.reshape(key.shape[0], -1, self.d_model)
        q = self._split_heads(self.q_proj(query))
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            heads, weights = scaled_dot_product_attention(q, key, value, bias, dropout_p)
        else:
            if is_causal:
                heads = F.scaled_dot_product_attention(q, key, value, dropout_p=dropout_p, is_causal=True)
            else:
                mask = None if bias is None else bias.to(q.dtype)
                heads = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout_p)
            weights = None
        if head_mask is not None:  # scale each head's output (ablation)
            if head_mask.dim() == 1:  # [H] -> [H, 1, 1]
                head_mask = head_mask[:, None, None]
            heads = heads * head_mask.to(heads.dtype)
        # [B, H, T_q, d_k] -> [B, T_q, d_model]: concatenate the heads, then W^O
        if grouped:  # and back to one row per hypothesis: [B, H, k, d_k] -> [B, k, H, d_k] -> [B*k, 1, d_model]
            merged = heads.transpose(1, 2).reshape_as(rows_query)
            if weights is not None:  # [B, H, k, T_k] -> [B, k, H, T_k] -> [B*k, H, 1, T_k]
                weights = weights.transpose(1, 2)
                weights = weights.reshape(-1, self.n_heads, 1, weights.shape[-1])
        else:
            batch, _, length, _ = heads.shape
            merged = heads.transpose(1, 2).reshape(batch, length, self.d_model)
        return self.out_proj(merged), weights

    def forward(
        self,
        query: Tensor,
        key_value: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
        head_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query [B, T_q, d]`` to ``key_value [B, T_k, d]``.

        Args:
            query: queries (the decoder state, or the same tensor as ``key_value`` for
                self-attention).
            key_value: the sequence attended to.
            key_padding_mask: ``[B, T_k]`` bool, True at padding.
            causal: mask later positions (decoder self-attention).
            need_weights: return per-head weights ``[B, H, T_q, T_k]``.
            head_mask: ``[H]`` per-head output factors (see :meth:`attend`).

        Returns:
            ``(output [B, T_q, d_model], weights or None)``.
        """
        key, value = self.project_key_value(key_value)
        bias = attention_bias(
            key_padding_mask=key_padding_mask,
            causal=causal,
            query_length=query.shape[1],
            key_length=key_value.shape[1],
            dtype=query.dtype,
            device=query.device,
        )
        pure_causal = causal and key_padding_mask is None and query.shape[1] == key_value.shape[1]
        return self.attend(query, key, value, bias=bias, is_causal=pure_causal, need_weights=need_weights,
                           head_mask=head_mask)
