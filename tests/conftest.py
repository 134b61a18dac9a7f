"""Shared fixtures: small models built from the real config type."""

from __future__ import annotations

import pytest
import torch

from stepwise.config import ModelConfig
from stepwise.models import Transformer


def make_model(seed: int = 0, **overrides: object) -> Transformer:
    """A small, dropout-free transformer in eval mode."""
    settings = dict(vocab_size=64, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64,
                    dropout=0.0)
    settings.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**settings)).eval()


def padded_batch(vocab: int, lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``[B, max(lengths)]`` (no special ids) with a padding mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return ids.masked_fill(mask, 0), mask


@pytest.fixture
def small_model() -> Transformer:
    return make_model()
