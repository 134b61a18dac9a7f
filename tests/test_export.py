"""ONNX export: graphs pass onnx.checker, parity with PyTorch, atomic writes, registry round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from stepwise import export as export_module
from stepwise.decode.onnx_runtime import ExportFormatError, OnnxTranslator, session_options
from stepwise.decode.pytorch import decode
from stepwise.export import ExportError, check_parity, export_checkpoint, fuse_shared_input_projections
from stepwise.train.checkpoint import load_checkpoint

from support.models import SAMPLE_PAIRS, make_checkpoint
from support.processes import ClearMLServerProcess, register_files


@pytest.mark.integration
def test_export_fresh_model_passes_checker_and_parity(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(make_checkpoint(tmp_path / "model.pt"))
    manifest = export_checkpoint(checkpoint, tmp_path / "export", source={"id": "abc", "name": "x", "tags": []})
    out = tmp_path / "export"
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json", "scorer.onnx",
                                                     "tokenizer.model"]
    for name in ("encoder.onnx", "decoder.onnx"):
        onnx.checker.check_model(str(out / name), full_check=True)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["source_model"]["id"] == "abc" and on_disk["opset"] == 17
    assert on_disk["config"]["model"]["d_model"] == 32 and "exported_at" in on_disk
    parity = manifest["parity"]
    everything = f"{parity['sentences']}/{parity['sentences']}"
    assert parity["tokens_equal_beam1"] == parity["tokens_equal_beam4"] == everything
    assert parity["max_abs_log_prob_diff"] < 1e-3 and parity["max_abs_attention_diff"] < 1e-4
    assert not list(tmp_path.glob(".export.*"))  # no temporary folders left


@pytest.mark.integration
def test_onnx_loop_matches_pytorch_with_padding_and_beams(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(make_checkpoint(tmp_path / "model.pt", seed=4))
    export_checkpoint(checkpoint, tmp_path / "export")
    translator = OnnxTranslator(tmp_path / "export", device="cpu")
    model = checkpoint.build_model()
    sources = [translator.encode_text(src) for src, _ in SAMPLE_PAIRS]  # different lengths: padded batch
    for beam in (1, 3):
        ours = translator.decode_ids(sources, beam_size=beam, max_length=20, return_attention=True)
        for src, hyp in zip(sources, ours, strict=True):
            (ref,) = decode(model, torch.tensor([src]), beam_size=beam, max_length=20, return_attention=True)
            assert hyp.tokens == ref.tokens
            for kind in ("encoder", "decoder", "cross"):
                np.testing.assert_allclose(hyp.attention[kind], ref.attention[kind], atol=1e-4)


@pytest.mark.integration
def test_decoder_top_k_equals_pytorch_distribution(tmp_path: Path) -> None:
    """The graph's top-K (PAD/BOS excluded) is PyTorch's top-K of the full distribution, per row."""
    checkpoint = load_checkpoint(make_checkpoint(tmp_path / "model.pt", seed=5))
    export_checkpoint(checkpoint, tmp_path / "export")
    translator = OnnxTranslator(tmp_path / "export", device="cpu")
    model = checkpoint.build_model().eval()
    tok = translator.tokenizer
    sources = [translator.encode_text(src) for src, _ in SAMPLE_PAIRS[:3]]
    width = max(map(len, sources))
    src = np.array([s + [tok.pad_id] * (width - len(s)) for s in sources], dtype=np.int64)
    prefix = np.array([[tok.bos_id, 7, 9, 11]] * len(sources), dtype=np.int64)
    with torch.no_grad():
        logits = model(torch.tensor(src), torch.tensor(prefix), torch.tensor(src == tok.pad_id))
        full = torch.log_softmax(logits.float(), -1)
    full[..., [tok.pad_id, tok.bos_id]] = float("-inf")
    reference = full.topk(translator.top_k, dim=-1)
    step = translator.start(src, src == tok.pad_id, candidates=translator.top_k)
    narrow = translator.start(src, src == tok.pad_id, beam_size=1)  # a step returns as many as the beam needs
    for t in range(prefix.shape[1]):
        top_log_probs, top_ids, _, _ = step(prefix[:, t : t + 1], np.arange(len(sources)), False)
        np.testing.assert_allclose(top_log_probs, reference.values[:, t].numpy(), atol=1e-4)
        assert (top_ids == reference.indices[:, t].numpy()).all()
        assert not np.isin(top_ids, [tok.pad_id, tok.bos_id]).any()
        best_log_prob, best_id, _, _ = narrow(prefix[:, t : t + 1], np.arange(len(sources)), False)
        assert best_id.shape == (len(sources), 1) and (best_id == top_ids[:, :1]).all()
        np.testing.assert_allclose(best_log_prob, top_log_probs[:, :1], atol=1e-6)
    with pytest.raises(ValueError, match="beam_size"):
        translator.decode_ids(sources, beam_size=translator.top_k + 1)


@pytest.mark.integration
def test_export_from_an_older_exporter_is_refused_clearly(tmp_path: Path) -> None:
    export_checkpoint(load_checkpoint(make_checkpoint(tmp_path / "model.pt")), tmp_path / "export")
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    (tmp_path / "export" / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(ExportFormatError, match="export format 1.*run `stepwise export` again"):
        OnnxTranslator(tmp_path / "export", device="cpu")


@pytest.mark.unit
def test_projection_fusion_keeps_outputs_and_merges_shared_inputs() -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, outputs = [], [], []
    for name, width in (("q", 4), ("k", 4), ("v", 6)):  # three projections of x, one of y
        inits += [numpy_helper.from_array(rng.normal(size=(8, width)).astype(np.float32), f"W{name}"),
                  numpy_helper.from_array(rng.normal(size=width).astype(np.float32), f"b{name}")]
        nodes += [helper.make_node("MatMul", ["x", f"W{name}"], [f"{name}_mm"], name=f"{name}_mm"),
                  helper.make_node("Add", [f"b{name}", f"{name}_mm"], [name], name=f"{name}_add")]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 5, width]))
    inits.append(numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "Wy"))
    nodes.append(helper.make_node("MatMul", ["x", "Wy"], ["y"], name="y_mm"))  # no bias: left alone
    outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 3]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)

    def run(m: onnx.ModelProto) -> list[np.ndarray]:
        session = ort.InferenceSession(m.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})

    before = run(model)
    assert fuse_shared_input_projections(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node].count("MatMul") == 2  # q, k, v as one; y alone
    assert {i.name for i in model.graph.initializer} >= {"Wy"} and "Wq" not in {i.name for i in model.graph.initializer}
    for a, b in zip(before, run(model), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.integration
def test_parity_check_catches_a_different_model(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(make_checkpoint(tmp_path / "a.pt", seed=1))
    export_checkpoint(checkpoint, tmp_path / "export")
    other = load_checkpoint(make_checkpoint(tmp_path / "b.pt", seed=2)).build_model()
    with pytest.raises(ExportError, match="parity"):
        check_parity(other, tmp_path / "export", [s for s, _ in SAMPLE_PAIRS[:3]])


@pytest.mark.integration
def test_failed_export_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = load_checkpoint(make_checkpoint(tmp_path / "model.pt"))
    out = tmp_path / "export"
    export_checkpoint(checkpoint, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing_parity(*args: object, **kwargs: object) -> dict:
        raise ExportError("parity: simulated mismatch")

    monkeypatch.setattr(export_module, "check_parity", failing_parity)
    with pytest.raises(ExportError):
        export_checkpoint(load_checkpoint(make_checkpoint(tmp_path / "other.pt", seed=9)), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []
    with pytest.raises(ExportError):
        export_checkpoint(checkpoint, tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.integration
def test_export_cli_bad_checkpoint_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, "-m", "stepwise", "export", "--checkpoint", str(tmp_path / "junk.pt"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"stepwise: error: checkpoint {tmp_path / 'junk.pt'}: not a stepwise checkpoint (UnpicklingError)"]


@pytest.mark.integration
def test_export_from_registry_registers_onnx_model(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    env = clearml_server.env
    checkpoint = make_checkpoint(tmp_path / "model.pt")
    (source_id,) = register_files(env, [checkpoint], project="stepwise-export", cwd=tmp_path)
    # run as the child of a process with a ClearML task context (`stepwise up`'s children inherit
    # one): there Task.init hands back a stub, not a Task, and the export must register all the same
    inherited = {**env, "CLEARML_PROC_MASTER_ID": "1:"}
    result = subprocess.run([sys.executable, "-m", "stepwise", "export", "--tag", "candidate", "--out",
                             str(tmp_path / "export")], env=inherited, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout[result.stdout.index("{\n"):])  # after the SDK's own lines
    assert summary["source"] == source_id and summary["registered_id"]
    listed = subprocess.run([sys.executable, "-m", "stepwise", "models", "list", "--tag", f"source:{source_id}",
                             "--json"], env=env, capture_output=True, text=True, timeout=120)
    (onnx_version,) = json.loads(listed.stdout)
    assert onnx_version["id"] == summary["registered_id"] and onnx_version["framework"] == "ONNX"
    assert onnx_version["metadata"]["source_model_id"] == source_id
    assert onnx_version["metadata"]["parity_tokens_greedy"].endswith("/8")
    # a machine without torch pulls it back as a folder
    pulled = subprocess.run([sys.executable, "-c", "import sys\nfrom stepwise.registry import client as registry\n"
                             "print(registry.download_export(sys.argv[1]))", onnx_version["id"]], env=env,
                            capture_output=True, text=True, timeout=120)
    folder = Path(pulled.stdout.strip().splitlines()[-1])
    assert (folder / "decoder.onnx").read_bytes() == (tmp_path / "export" / "decoder.onnx").read_bytes()


@pytest.mark.unit
def test_beam_parity_tells_ties_from_differences() -> None:
    """Different beam hypotheses of the same score (a near-tie a barely trained model meets) are a
    tie; a different score is a difference; greedy search allows no ties."""
    from stepwise.decode.search import Hypothesis
    from stepwise.export import compare_hypotheses

    ours = [Hypothesis([1, 2], -1.0, True), Hypothesis([3], -2.0, True), Hypothesis([4], -3.0, True)]
    theirs = [Hypothesis([1, 2], -1.0, True), Hypothesis([5], -2.0004, True), Hypothesis([6], -3.5, True)]
    assert compare_hypotheses(ours, theirs, tie_tolerance=1e-3) == ([0], [1], [2])
    assert compare_hypotheses(ours, theirs, tie_tolerance=None) == ([0], [], [1, 2])
