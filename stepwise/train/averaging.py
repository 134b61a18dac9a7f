"""Checkpoint averaging: the elementwise mean of the weights of a run's last saves.

Averaging the last few checkpoints of a run smooths out the noise of the final steps (the
paper's base models average the last 5 checkpoints, section 6.1). The result is a normal
self-contained checkpoint: the newest save's config, tokenizer and step, the mean weights, no
optimizer state (it is a model to evaluate, export and serve, not a run to resume), and
``data_state["averaged_steps"]`` listing the steps it averages. ``stepwise evaluate``,
``stepwise export``, the promotion gate and the service read it like any other checkpoint.

``stepwise average RUN_DIR --last 5 -o averaged.pt`` does it from the command line, and
``train.average_last`` at the end of training (the trainer registers the result as its own
model version, with its validation BLEU).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from stepwise.errors import InvalidRequest, ModelNotFound, StepwiseError
from stepwise.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def find_saves(sources: Sequence[str | Path]) -> list[Path]:
    """Checkpoint files named by ``sources``: files as given, a run folder's ``checkpoints/step-*.pt``.

    A folder may be the run's output folder or its ``checkpoints`` folder itself.

    Raises:
        ModelNotFound: a source that does not exist, or a folder without saves.
    """
    paths: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
            found = sorted(folder.glob("step-*.pt"))
            if not found:
                raise ModelNotFound(f"{source}: no step-*.pt checkpoints in {folder}")
            paths.extend(found)
        elif source.is_file():
            paths.append(source)
        else:
            raise ModelNotFound(f"{source}: no such checkpoint or run folder")
    return paths


def average_checkpoints(checkpoints: Sequence[Checkpoint]) -> Checkpoint:
    """The elementwise mean of the weights of ``checkpoints`` (at least one), as a checkpoint.

    Floating-point tensors are averaged in float64 and stored in their own dtype; any other
    tensor (an integer buffer) must be equal in all of them. Config, tokenizer and step are the
    newest checkpoint's; metrics are empty (the caller evaluates the average).

    Raises:
        StepwiseError: the checkpoints do not share one model shape and tokenizer.
    """
    if not checkpoints:
        raise StepwiseError("nothing to average: no checkpoints given")
    ordered = sorted(checkpoints, key=lambda c: c.step)
    newest = ordered[-1]
    for other in ordered[:-1]:
        if other.config.model != newest.config.model or other.tokenizer_model != newest.tokenizer_model:
            raise StepwiseError(f"cannot average step {other.step} with step {newest.step}: different model "
                                "config or tokenizer (not saves of one run)")
        if other.model_state.keys() != newest.model_state.keys():
            raise StepwiseError(f"cannot average step {other.step} with step {newest.step}: different weights")
    averaged: dict[str, torch.Tensor] = {}
    for name, tensor in newest.model_state.items():
        tensors = [c.model_state[name] for c in ordered]
        if any(t.shape != tensor.shape for t in tensors):
            raise StepwiseError(f"cannot average {name}: shapes differ between the checkpoints")
        if tensor.is_floating_point():
            mean = torch.stack([t.to(torch.float64) for t in tensors]).mean(0)
            averaged[name] = mean.to(tensor.dtype)
        elif all(torch.equal(t, tensor) for t in tensors):
            averaged[name] = tensor.clone()
        else:
            raise StepwiseError(f"cannot average {name}: a non-float tensor that differs between the checkpoints")
    return Checkpoint(config=newest.config, model_state=averaged, tokenizer_model=newest.tokenizer_model,
                      step=newest.step, data_state={"averaged_steps": [c.step for c in ordered]})


def average_last(sources: Sequence[str | Path], out: str | Path, *, last: int | None = None) -> Checkpoint:
    """Average the last ``last`` saves (by step; all when None) found in ``sources`` into ``out``.

    Args:
        sources: checkpoint files and/or run folders (see :func:`find_saves`).
        out: the averaged checkpoint's path; written atomically.
        last: how many of the newest saves to average.

    Returns:
        The averaged checkpoint (as written).
    """
    if last is not None and last < 1:
        raise InvalidRequest(f"must be >= 1, got {last}", field="--last")
    checkpoints = sorted((load_checkpoint(path) for path in find_saves(sources)), key=lambda c: c.step)
    chosen = checkpoints[-last:] if last else checkpoints
    steps = [c.step for c in chosen]
    if len(set(steps)) != len(steps):
        raise StepwiseError(f"two checkpoints of the same step among {steps}: give the saves of one run")
    averaged = average_checkpoints(chosen)
    save_checkpoint(out, averaged)
    log.info("averaged steps %s into %s", ", ".join(map(str, steps)), out)
    return averaged
