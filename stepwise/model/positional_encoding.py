"""Positional encodings (paper section 3.5).

The model has no recurrence, so the order of tokens is injected by adding a position
signal to the embeddings. The paper's sinusoids::

    PE(pos, 2i)   = sin(pos / 10000^(2i / d_model))
    PE(pos, 2i+1) = cos(pos / 10000^(2i / d_model))

and, as the paper also tried with nearly identical results, learned position embeddings.
Both take an ``offset`` so that incremental decoding can encode position ``t`` alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoids, precomputed for ``max_positions`` positions."""

    def __init__(self, d_model: int, max_positions: int = 512) -> None:
        super().__init__()
        position = torch.arange(max_positions, dtype=torch.float32)[:, None]
        # 1 / 10000^(2i / d_model), computed in log space for precision
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_positions, d_model)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """Return ``x [B, T, d]`` plus the encoding of positions ``offset .. offset+T-1``."""
        length = x.shape[1]
        if isinstance(offset, Tensor):  # traced (ONNX) decoding: position from the cache length
            positions = torch.arange(length, device=x.device) + offset
            return x + self.table[positions].to(x.dtype)
        if offset + length > self.table.shape[0]:
            raise ValueError(f"sequence of {offset + length} positions exceeds max_positions {self.table.shape[0]}")
        return x + self.table[offset : offset + length].to(x.dtype)


class LearnedPositionalEncoding(nn.Module):
    """One learned vector per position."""

    def __init__(self, d_model: int, max_positions: int = 512) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_positions, d_model)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """Return ``x [B, T, d]`` plus the embeddings of positions ``offset .. offset+T-1``."""
        length = x.shape[1]
        if not isinstance(offset, Tensor) and offset + length > self.embedding.num_embeddings:
            raise ValueError(
                f"sequence of {offset + length} positions exceeds max_positions {self.embedding.num_embeddings}"
            )
        positions = torch.arange(length, device=x.device) + offset
        return x + self.embedding(positions).to(x.dtype)


def build_positional_encoding(kind: str, d_model: int, max_positions: int) -> nn.Module:
    """Return the positional encoding named by ``kind`` (``sinusoidal`` or ``learned``)."""
    if kind == "sinusoidal":
        return SinusoidalPositionalEncoding(d_model, max_positions)
    if kind == "learned":
        return LearnedPositionalEncoding(d_model, max_positions)
    raise ValueError(f"unknown positional encoding {kind!r}")
