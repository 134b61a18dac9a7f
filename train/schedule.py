"""Learning-rate schedules (paper section 5.3, equation 3).

The paper's schedule ("noam") warms up linearly and then decays with the inverse square root
of the step::

    lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5)

scaled by ``train.lr``. ``inverse_sqrt`` is the same shape peaking at exactly ``train.lr``;
``constant`` warms up linearly to ``train.lr`` and stays there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from stepwise.config import Config


def lr_factor(config: Config) -> Callable[[int], float]:
    """Multiplier of ``train.lr`` at each optimizer step (LambdaLR convention)."""
    warmup = config.train.warmup_steps
    kind = config.train.lr_schedule
    d_model = config.model.d_model

    def factor(step: int) -> float:
        step = max(step, 1)
        if kind == "noam":
            return d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
        if kind == "inverse_sqrt":
            return min(step / warmup, math.sqrt(warmup / step))
        return min(1.0, step / warmup)

    return factor


def build_optimizer(
    model: torch.nn.Module, config: Config
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The paper's Adam (section 5.3; β1 = 0.9, β2 = 0.98, ε = 1e-9 by default) and the configured schedule.

    It is built as :class:`torch.optim.AdamW`, so that ``train.weight_decay`` (0 by default, as in
    the paper) is *decoupled* weight decay (Loshchilov & Hutter, 2019): each step shrinks the
    weights by ``lr · weight_decay`` beside the adaptive update. ``torch.optim.Adam``'s
    ``weight_decay`` would instead add an L2 term to the gradient, which Adam's per-parameter
    scaling then weakens for exactly the weights with large gradients. With ``weight_decay`` 0
    the two compute the same update: the paper's Adam, exactly.

    Returns:
        ``(optimizer, scheduler)``; the scheduler multiplies ``train.lr`` by :func:`lr_factor`.
    """
    train = config.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=tuple(train.adam_betas), eps=train.adam_eps,
                                  weight_decay=train.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
