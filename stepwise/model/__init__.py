"""The paper: "Attention Is All You Need" (Vaswani et al. 2017) as small modules.

* :mod:`~stepwise.model.attention`: scaled dot-product and multi-head attention (section 3.2);
* :mod:`~stepwise.model.positional_encoding`: sinusoidal and learned positions (section 3.5);
* :mod:`~stepwise.model.feed_forward`: the position-wise feed-forward network (section 3.3);
* :mod:`~stepwise.model.layers`: encoder and decoder layers (section 3.1);
* :mod:`~stepwise.model.transformer`: the encoder-decoder (figure 1), with a KV cache for decoding;
* :mod:`~stepwise.model.reference`: PyTorch's ``nn.Transformer`` carrying the same weights, for parity.
"""

from stepwise.model.attention import MultiHeadAttention, attention_bias, scaled_dot_product_attention
from stepwise.model.feed_forward import PositionwiseFeedForward
from stepwise.model.layers import DecoderLayer, EncoderLayer
from stepwise.model.positional_encoding import (
    LearnedPositionalEncoding,
    SinusoidalPositionalEncoding,
    build_positional_encoding,
)
from stepwise.model.transformer import Transformer

__all__ = [
    "DecoderLayer",
    "EncoderLayer",
    "LearnedPositionalEncoding",
    "MultiHeadAttention",
    "PositionwiseFeedForward",
    "SinusoidalPositionalEncoding",
    "Transformer",
    "attention_bias",
    "build_positional_encoding",
    "scaled_dot_product_attention",
]
