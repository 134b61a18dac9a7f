"""Training: the loop, schedules, data, checkpoints, averaging and evaluation.

``stepwise train`` or ``python -m stepwise.train`` (``torchrun ... -m stepwise.train`` for DDP).
"""
