"""Checkpoints: self-contained files that hold everything needed to resume or to serve.

One ``.pt`` file holds the model weights, the config (JSON), the tokenizer model bytes, and,
for resuming, the optimizer and scheduler state, the step, the data position and every RNG
state. The exporter needs nothing else, so a registered checkpoint is a complete artifact.

Writes are atomic: the file is written beside its final name and renamed over it, so a
killed run leaves either the previous checkpoint or the new one, never half of one.

Checkpoints are data, not code: :func:`load_checkpoint` reads them with
``torch.load(weights_only=True)``, which rebuilds tensors, numbers, strings, bytes, lists, tuples
and dicts and, allow-listed here, the NumPy arrays of the saved random state. A file that asks
for anything else (a pickled object whose loading would run code) is refused with one line.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepwise.config import Config
from stepwise.errors import CheckpointError, ModelNotFound
from stepwise.model import Transformer
from stepwise.tokenizer import Tokenizer

FORMAT_VERSION = 1


def _numpy_globals() -> list[Any]:
    """What unpickling a NumPy array needs (the saved NumPy random state is one)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *(
        type(np.dtype(kind)) for kind in ("uint32", "int64", "float64"))]


@dataclass
class Checkpoint:
    """The contents of a checkpoint file."""

    config: Config
    model_state: dict[str, torch.Tensor]
    tokenizer_model: bytes
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    data_state: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = None

    def build_model(self) -> Transformer:
        """The model with these weights, in eval mode."""
        model = Transformer(self.config.model)
        model.load_state_dict(self.model_state)
        return model.eval()

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the model was trained with."""
        return Tokenizer(self.tokenizer_model)


def rng_state() -> dict[str, Any]:
    """Every random generator training touches."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "config": checkpoint.config.to_dict(),
        "model": checkpoint.model_state,
        "tokenizer_model": checkpoint.tokenizer_model,
        "step": checkpoint.step,
        "metrics": checkpoint.metrics,
        "optimizer": checkpoint.optimizer_state,
        "scheduler": checkpoint.scheduler_state,
        "data": checkpoint.data_state,
        "rng": checkpoint.rng_state,
    }
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            torch.save(payload, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint.

    Raises:
        ModelNotFound: no file at ``path``.
        CheckpointError: the file cannot be read, is corrupt, or is not a stepwise checkpoint.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelNotFound(f"checkpoint {path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read ({exc.strerror})") from None
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "allowlist" not in str(exc) and "Unsupported global" not in str(exc):  # garbage, or a cut-off file
            raise CheckpointError(f"checkpoint {path}: not a stepwise checkpoint (UnpicklingError)") from None
        # weights_only refused to build something that is not data (the pickle would run code)
        wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({wanted.group(1)})" if wanted else ""
        raise CheckpointError(f"checkpoint {path}: refused, it holds an object that is not data{what}; "
                              "checkpoints are loaded as data only") from None
    except Exception as exc:  # noqa: BLE001 - any other failure means "not a checkpoint"
        raise CheckpointError(f"checkpoint {path}: not a stepwise checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: not a stepwise checkpoint (format {FORMAT_VERSION} expected)")
    missing = [key for key in ("config", "model", "tokenizer_model", "step") if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path}: corrupt (no {', '.join(missing)})")
    return Checkpoint(
        config=Config.from_dict(payload["config"]),
        model_state=payload["model"],
        tokenizer_model=payload["tokenizer_model"],
        step=payload["step"],
        metrics=payload.get("metrics") or {},
        optimizer_state=payload.get("optimizer"),
        scheduler_state=payload.get("scheduler"),
        data_state=payload.get("data"),
        rng_state=payload.get("rng"),
    )
