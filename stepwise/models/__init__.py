"""The encoder-decoder transformer and its layers."""

from stepwise.models.transformer import Transformer
from stepwise.models.transformer_layers import DecoderLayer, EncoderLayer

__all__ = ["DecoderLayer", "EncoderLayer", "Transformer"]
