"""Building blocks of the transformer: attention, positional encoding, feed-forward."""

from stepwise.components.attention import MultiHeadAttention, attention_bias, scaled_dot_product_attention
from stepwise.components.feed_forward import PositionwiseFeedForward
from stepwise.components.positional_encoding import (
    LearnedPositionalEncoding,
    SinusoidalPositionalEncoding,
    build_positional_encoding,
)

__all__ = [
    "LearnedPositionalEncoding",
    "MultiHeadAttention",
    "PositionwiseFeedForward",
    "SinusoidalPositionalEncoding",
    "attention_bias",
    "build_positional_encoding",
    "scaled_dot_product_attention",
]
