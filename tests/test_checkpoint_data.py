"""Checkpoints are data, not code: loading one never runs what a pickle asks for (issue 21)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepwise.config import Config
from stepwise.errors import CheckpointError
from stepwise.model import Transformer
from stepwise.train.checkpoint import Checkpoint, load_checkpoint, rng_state, save_checkpoint
from stepwise.train.schedule import build_optimizer

pytestmark = pytest.mark.unit

RAN: list[str] = []


def _run_code(marker: str) -> str:
    RAN.append(marker)
    return marker


class _CodeOnLoad:
    """An object whose unpickling calls a function (as ``os.system`` would be called)."""

    def __reduce__(self) -> tuple:
        return (_run_code, ("code ran",))


def test_a_training_checkpoint_loads_as_data(tmp_path: Path) -> None:
    config = Config.from_dict({"model": {"vocab_size": 64, "d_model": 32, "n_heads": 4, "n_encoder_layers": 1,
                                         "n_decoder_layers": 1, "d_ff": 64}})
    model = Transformer(config.model)
    optimizer, scheduler = build_optimizer(model, config)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    scheduler.step()
    saved = Checkpoint(config=config, model_state=model.state_dict(), tokenizer_model=b"proto", step=7,
                       metrics={"bleu": 1.5}, optimizer_state=optimizer.state_dict(),
                       scheduler_state=scheduler.state_dict(), rng_state=rng_state(),
                       data_state={"epoch": 1, "batch_in_epoch": 2, "clearml_task_id": None, "train_seconds": 0.5})
    loaded = load_checkpoint(save_checkpoint(tmp_path / "step.pt", saved))
    assert loaded.step == 7 and loaded.tokenizer_model == b"proto" and loaded.metrics == {"bleu": 1.5}
    assert loaded.rng_state is not None and loaded.rng_state["numpy"][0] == "MT19937"
    assert all(torch.equal(loaded.model_state[k], v) for k, v in saved.model_state.items())


@pytest.mark.parametrize("where", ["tokenizer_model", "metrics", "rng"])
def test_a_checkpoint_that_would_run_code_is_refused_with_one_line(tmp_path: Path, where: str) -> None:
    payload = {"format": 1, "config": Config.from_dict({}).to_dict(), "model": {}, "tokenizer_model": b"",
               "step": 0, where: _CodeOnLoad()}
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    RAN.clear()
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    assert RAN == []
    message = str(refused.value)
    assert "\n" not in message and "not data" in message and str(path) in message
