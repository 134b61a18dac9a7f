"""stepwise: a readable "Attention Is All You Need" encoder-decoder transformer for translation."""

__version__ = "0.1.0"
