"""The command line given something that is not there, or not readable, says so in one line.

Each command runs as a user would run it (``python -m stepwise ...`` in its own process) against
a fresh embedded ClearML server: a non-zero exit, no traceback, one line that names the thing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stepwise.errors import InvalidRequest

from support.models import make_checkpoint
from support.processes import ClearMLServerProcess, register_files

UNKNOWN_ID = "0123456789abcdef0123456789abcdef"


def _stepwise(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stepwise", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def _assert_one_line_error(done: subprocess.CompletedProcess, names: str) -> str:
    output = (done.stdout + done.stderr).strip()
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    # a version registered with the plain SDK has no recorded digest: it is used with a logged warning
    lines = [line for line in output.splitlines() if "has no recorded file digest" not in line]
    assert len(lines) == 1, output
    assert lines[0].startswith("stepwise: error: ") and names in lines[0], output
    return lines[0]


@pytest.mark.integration
def test_unknown_ids_tags_and_paths_are_one_line_errors(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    env = clearml_server.env
    for args in (["promote", "does-not-exist", "--tag", "production"], ["promote", UNKNOWN_ID],
                 ["demote", UNKNOWN_ID], ["export", "--model-id", UNKNOWN_ID, "--out", str(tmp_path / "x")],
                 ["evaluate", UNKNOWN_ID]):
        line = _assert_one_line_error(_stepwise(env, *args), args[1] if args[0] != "export" else UNKNOWN_ID)
        assert "no registered model with id" in line
    line = _assert_one_line_error(_stepwise(env, "evaluate", "tag:no-such-tag"), "no-such-tag")
    assert "no registered version" in line
    _assert_one_line_error(_stepwise(env, "export", "--tag", "no-such-tag", "--out", str(tmp_path / "y")),
                           "no-such-tag")
    missing = tmp_path / "missing.pt"
    line = _assert_one_line_error(_stepwise(env, "evaluate", str(missing)), str(missing))
    assert "no such file" in line
    _assert_one_line_error(_stepwise(env, "export", "--checkpoint", str(missing), "--out", str(tmp_path / "z")),
                           str(missing))
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


@pytest.mark.integration
def test_corrupt_checkpoints_are_one_line_errors(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    env = clearml_server.env
    good = make_checkpoint(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for args in (["evaluate", str(truncated)],
                 ["export", "--checkpoint", str(truncated), "--out", str(tmp_path / "x")]):
        assert "not a stepwise checkpoint" in _assert_one_line_error(_stepwise(env, *args), str(truncated))
    # a registered version whose weights are not a checkpoint
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint\xff" * 64)
    (model_id,) = register_files(env, [junk], project="stepwise-cli", cwd=tmp_path)
    for args in (["evaluate", model_id], ["export", "--model-id", model_id, "--out", str(tmp_path / "y")]):
        assert "not a stepwise checkpoint" in _assert_one_line_error(_stepwise(env, *args), "checkpoint")
    # the gate scores registered ONNX exports: a version without one is named, with the command that makes one
    line = _assert_one_line_error(_stepwise(env, "promote", model_id), model_id)
    assert "no registered ONNX export" in line and f"run `stepwise export --model-id {model_id}`" in line


@pytest.mark.integration
def test_registry_down_is_one_line_error(clearml_server: ClearMLServerProcess) -> None:
    env = clearml_server.env
    clearml_server.stop()
    for args in (["promote", UNKNOWN_ID], ["demote", UNKNOWN_ID], ["evaluate", UNKNOWN_ID], ["models", "list"]):
        line = _assert_one_line_error(_stepwise(env, *args), clearml_server.url)
        assert "unreachable" in line and "no registered model" not in line


@pytest.mark.unit
def test_attention_bias_argument_checks_are_errors_not_asserts() -> None:
    """``attention_bias`` checks its arguments with exceptions (asserts vanish under ``python -O``)."""
    from stepwise.model.attention import attention_bias

    with pytest.raises(InvalidRequest, match="key_length"):
        attention_bias(key_padding_mask=None, causal=True, query_length=2, key_length=None)
    with pytest.raises(InvalidRequest, match="query_length") as raised:
        attention_bias(key_padding_mask=None, causal=True, query_length=None, key_length=3)
    assert raised.value.field == "query_length"
