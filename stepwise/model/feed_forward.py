"""Position-wise feed-forward network (paper section 3.3, equation 2).

Applied to each position separately and identically::

    FFN(x) = max(0, x W_1 + b_1) W_2 + b_2

with inner size ``d_ff`` (2048 in the base model). GELU is offered as an alternative to ReLU.
"""

from __future__ import annotations

from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class PositionwiseFeedForward(nn.Module):
    """Two linear maps with an activation (and dropout) between them."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        self.linear1 = nn.Linear(d_model, d_ff)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, d_model] -> [B, T, d_model]``."""
        return self.linear2(self.dropout(self.activation(self.linear1(x))))
