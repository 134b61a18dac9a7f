"""Training: ``python -m train`` or ``stepwise train`` (and ``torchrun ... -m train`` for DDP)."""
