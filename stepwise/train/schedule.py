"""Learning-rate schedules (paper section 5.3, equation 3).

The paper's schedule ("noam") warms up linearly and then decays with the inverse square root
of the step::

    lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5)

scaled by ``train.lr``. ``inverse_sqrt`` is the same shape peaking at exactly ``train.lr``;
``constant`` warms up linearly to ``train.lr`` and stays there. These three count steps only.

``linear`` and ``cosine`` know when the run ends. They warm up linearly to ``train.lr`` (over
``train.warmup_steps``, or ``train.warmup_minutes`` of training time), then decay, linearly or
along half a cosine, to ``train.min_lr_ratio * train.lr``, reached exactly when the budget is
spent: ``train.max_minutes`` of training time when a time budget is set, else
``train.max_steps``. The decay covers whatever the warmup leaves of the budget, starting where
the warmup ended (its step and training time are recorded in the scheduler's state, so this is
exact even when the warmup counts steps and the budget counts minutes, and a run resumed with a
larger budget stretches its decay to the new end).

Training time is the :class:`TrainingClock`: wall-clock seconds inside the training loop,
evaluations and checkpoint saves included (they are part of what a budget buys, and so a
ten-minute run ends ten minutes after its first step), start-up (data, tokenizer, model)
excluded, and so is the ONNX export made at each save (:meth:`TrainingClock.paused`: the
registry's copy of a checkpoint, not part of training; it adds its seconds to the run's wall
time, not to the budget). It adds up over ``--resume``: the trainer stores it in every checkpoint, so a resumed
run continues the same schedule and stops when the run, not the invocation, has spent its budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from stepwise.config import Config, TrainConfig

# the schedules that decay to the end of the budget (the others count steps only)
TO_THE_END = ("linear", "cosine")


class TrainingClock:
    """Seconds a run has spent training, over every invocation (see the module docstring).

    The clock is read once per optimizer step (:meth:`tick`); the schedule, the deadline and
    the checkpoint all use that reading, so they agree with each other, and, in a data-parallel
    run, across ranks (``agree`` hands every rank rank 0's reading: the same learning rate on
    every replica, the same last step).

    Args:
        spent: seconds spent by earlier invocations (a resumed run's checkpoint holds them).
    """

    def __init__(self, spent: float = 0.0) -> None:
        self.spent = spent
        self.started: float | None = None
        self.reading = spent

    def start(self) -> None:
        """This invocation's training loop begins: from now on the clock runs."""
        self.started = time.monotonic()

    def tick(self, agree: Callable[[float], float] | None = None) -> float:
        """Read the clock: earlier invocations' seconds plus this one's since :meth:`start`.

        Args:
            agree: maps this process's reading to the one all ranks use (default: itself).
        """
        now = self.spent + (time.monotonic() - self.started if self.started is not None else 0.0)
        self.reading = agree(now) if agree is not None else now
        return self.reading

    def seconds(self) -> float:
        """Training seconds at the last :meth:`tick`."""
        return self.reading

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The time spent inside does not count (the clock's readings skip it)."""
        before = time.monotonic()
        try:
            yield
        finally:
            if self.started is not None:
                self.started += time.monotonic() - before


def lr_factor(config: Config) -> Callable[[int], float]:
    """Multiplier of ``train.lr`` at each optimizer step (LambdaLR convention): noam, inverse_sqrt, constant."""
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


def warmup_fraction(train: TrainConfig, *, step: int, seconds: float) -> float:
    """How much of the warmup is done (1 and above: done), in steps or in training minutes."""
    if train.warmup_minutes:
        return seconds / (train.warmup_minutes * 60)
    return max(step, 1) / train.warmup_steps


def budget_progress(train: TrainConfig, *, step: int, seconds: float, start: dict[str, float]) -> float:
    """Fraction of the budget left after ``start`` that is spent (``start``: ``{"step", "seconds"}``).

    The budget is ``max_minutes`` of training time when set, else ``max_steps``.
    """
    if train.max_minutes:
        position, end, begin = seconds, train.max_minutes * 60, start["seconds"]
    else:
        position, end, begin = step, train.max_steps, start["step"]
    return (position - begin) / (end - begin) if end > begin else 1.0


def decay_factor(kind: str, progress: float, min_ratio: float) -> float:
    """The factor after warmup: 1 at ``progress`` 0 down to ``min_ratio`` at ``progress`` 1 (clamped).

    Args:
        kind: ``"linear"`` or ``"cosine"`` (half a cosine period).
        progress: fraction of the decay done.
        min_ratio: the final factor.
    """
    progress = min(max(progress, 0.0), 1.0)
    shape = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


class ScheduleToTheEnd(torch.optim.lr_scheduler.LRScheduler):
    """``linear`` / ``cosine``: warmup, then decay to ``min_lr_ratio`` exactly when the budget ends.

    Like LambdaLR, ``step()`` after each optimizer step sets the learning rate of the next one;
    here from the step count *and* the :class:`TrainingClock`. Its state holds ``warmup_end``,
    the ``{"step", "seconds"}`` at which the warmup ended (None before), so a resumed run decays
    along the same line.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig, clock: TrainingClock) -> None:
        self.train = train
        self.clock = clock
        self.warmup_end: dict[str, float] | None = None
        super().__init__(optimizer)

    def factor(self, step: int, seconds: float) -> float:
        """Multiplier of ``train.lr`` after ``step`` steps and ``seconds`` of training."""
        train = self.train
        warmup = warmup_fraction(train, step=step, seconds=seconds)
        if warmup < 1.0:
            return warmup
        if self.warmup_end is None:
            self.warmup_end = {"step": step, "seconds": seconds}
        progress = budget_progress(train, step=step, seconds=seconds, start=self.warmup_end)
        return decay_factor(train.lr_schedule, progress, train.min_lr_ratio)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        factor = self.factor(self.last_epoch, self.clock.seconds())
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state without the optimizer, the config and the clock (the trainer restores those)."""
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "train", "clock")}


def build_optimizer(
    model: torch.nn.Module, config: Config, clock: TrainingClock | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The paper's Adam (section 5.3; β1 = 0.9, β2 = 0.98, ε = 1e-9 by default) and the configured schedule.

    It is built as :class:`torch.optim.AdamW`, so that ``train.weight_decay`` (0 by default, as in
    the paper) is *decoupled* weight decay (Loshchilov & Hutter, 2019): each step shrinks the
    weights by ``lr · weight_decay`` beside the adaptive update. ``torch.optim.Adam``'s
    ``weight_decay`` would instead add an L2 term to the gradient, which Adam's per-parameter
    scaling then weakens for exactly the weights with large gradients. With ``weight_decay`` 0
    the two compute the same update: the paper's Adam, exactly.

    Args:
        model: what to optimize.
        config: the run's config (``train`` section).
        clock: the run's training clock; the ``linear`` and ``cosine`` schedules read it when
            there is a time budget (default: a clock that stays at 0).

    Returns:
        ``(optimizer, scheduler)``: :class:`ScheduleToTheEnd` for ``linear``/``cosine``, else a
        LambdaLR multiplying ``train.lr`` by :func:`lr_factor`.
    """
    train = config.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=tuple(train.adam_betas), eps=train.adam_eps,
                                  weight_decay=train.weight_decay)
    if train.lr_schedule in TO_THE_END:
        return optimizer, ScheduleToTheEnd(optimizer, train, clock or TrainingClock())
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
