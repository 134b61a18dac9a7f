"""A real `bentoml serve` of service.py, called over HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from stepwise.decode.onnx_runtime import available_providers
from stepwise.errors import ExportError, ExportFormatError, InvalidRequest, ModelNotFound
from stepwise.export import export_checkpoint
from stepwise.serve.options import (
    DECODE_BATCH,
    MAX_BATCH_TEXTS,
    MAX_BEAM_SIZE,
    MAX_OUTPUT_TOKENS,
    MAX_TEXT_CHARS,
    check_request,
)
from stepwise.serve.store import ModelStore
from stepwise.serve.translation import Job, translate
from stepwise.train.checkpoint import load_checkpoint
from stepwise.train.evaluate import translate_ids

from support.models import SAMPLE_PAIRS, make_checkpoint
from support.processes import BentoProcess, ClearMLServerProcess, register_exports, register_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tiny_export: tuple[Path, Path]) -> tuple[Path, Path]:
    """The session's tiny checkpoint and export (the shared service's model)."""
    return tiny_export


@pytest.fixture(scope="module")
def service(tiny_service: BentoProcess) -> BentoProcess:
    """The session's shared service: these tests only read from it."""
    return tiny_service


def _pytorch(checkpoint_path: Path, text: str, beam: int) -> tuple[list[str], list[str]]:
    checkpoint = load_checkpoint(checkpoint_path)
    tokenizer = checkpoint.tokenizer()
    (hyp,) = translate_ids(checkpoint.build_model(), [tokenizer.encode(text)], beam_size=beam)
    emitted = hyp.tokens + ([tokenizer.eos_id] if hyp.finished else [])
    return tokenizer.pieces(tokenizer.encode(text)), tokenizer.pieces(emitted)


@pytest.mark.integration
@pytest.mark.parametrize("beam", [1, 4, MAX_BEAM_SIZE])  # the widest beam is the decoder's, not a second limit
def test_translation_and_attention_match_pytorch(service: BentoProcess, exported: tuple[Path, Path],
                                                 beam: int) -> None:
    text = SAMPLE_PAIRS[1][0]
    answer = service.post("/translate", {"text": text, "beam_size": beam, "attention": "all"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    source, target = _pytorch(exported[0], text, beam)
    assert body["source_tokens"] == source and body["target_tokens"] == target
    assert set(body["attention"]) == {"encoder", "decoder", "cross"}
    s, t = len(source), len(target)
    enc, dec, cross = (np.array(body["attention"][k]) for k in ("encoder", "decoder", "cross"))
    assert enc.shape == (2, 4, s, s) and dec.shape == (2, 4, t, t) and cross.shape == (2, 4, t, s)
    for weights in (enc, dec, cross):
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-4)
    assert np.abs(np.triu(dec, k=1)).max() == 0  # causal
    assert body["model"]["name"] == "transformer-test" and body["timings"]["total_ms"] > 0


@pytest.mark.integration
def test_attention_selection_and_batch_endpoint(service: BentoProcess) -> None:
    text = "Liebet eure Feinde."
    none = service.post("/translate", {"text": text, "attention": "none"}).json()
    assert none["attention"] == {}
    full = service.post("/translate", {"text": text, "attention": "all"}).json()["attention"]
    subset = service.post("/translate", {"text": text, "layers": [1], "heads": [0, 2]}).json()
    assert list(subset["attention"]) == ["cross"]
    np.testing.assert_array_equal(np.array(subset["attention"]["cross"]), np.array(full["cross"])[[1]][:, [0, 2]])
    picked = service.post("/translate", {"text": text, "attention": "all", "layers": [1, 0], "heads": [3]}).json()
    assert set(picked["attention"]) == {"encoder", "decoder", "cross"}
    for kind, weights in picked["attention"].items():
        np.testing.assert_array_equal(np.array(weights), np.array(full[kind])[[1, 0]][:, [3]])
    texts = [src for src, _ in SAMPLE_PAIRS]
    batch = service.post("/translate_batch", {"texts": texts, "beam_size": 2})
    assert batch.status_code == 200
    singles = [service.post("/translate", {"text": t, "beam_size": 2}).json()["translation"] for t in texts]
    assert [r["translation"] for r in batch.json()] == singles


BAD_INPUTS = [
    ({"text": ""}, "text"),
    ({"text": "   \n\t"}, "text"),
    ({"text": "x" * 2001}, "text"),
    ({"text": "hallo", "colour": "red"}, "colour"),
    ({"text": "hallo", "beam_size": 0}, "beam_size"),
    ({"text": "hallo", "beam_size": MAX_BEAM_SIZE + 1}, "beam_size"),
    ({"text": "hallo", "max_length": 0}, "max_length"),
    ({"text": "hallo", "max_length": 5000}, "max_length"),
    ({"text": 42}, "text"),
    ({"text": "hallo", "beam_size": "2"}, "beam_size"),
    ({"text": "hallo", "attention": "some"}, "attention"),
    ({"text": "hallo", "layers": [9]}, "layers"),
    ({"text": "hallo", "layers": [2]}, "layers"),
    ({"text": "hallo", "attention": "all", "layers": [0, 2]}, "layers"),
    ({"text": "hallo", "heads": [4]}, "heads"),
    ({"text": "hallo", "heads": [-1]}, "heads"),
    ({"text": "hallo", "model": "no-such-tag"}, "model"),
    ({}, "text"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("body", "field"), BAD_INPUTS)
def test_bad_input_is_4xx_naming_the_field(service: BentoProcess, body: dict, field: str) -> None:
    answer = service.post("/translate", body)
    assert 400 <= answer.status_code < 500, answer.text
    payload = answer.json()
    assert "Traceback" not in answer.text
    assert any(field in d.get("loc", []) for d in payload["detail"]) or payload["error"].startswith(field)


@pytest.mark.integration
def test_malformed_json_invalid_utf8_and_bad_batches(service: BentoProcess) -> None:
    headers = {"Content-Type": "application/json"}
    for raw in (b'{"text": "hallo"', b'{"text": "\xff\xfe"}', b"[1, 2]", b"null"):
        answer = requests.post(f"{service.url}/translate", data=raw, headers=headers, timeout=30)
        assert answer.status_code == 400 and "error" in answer.json(), (raw, answer.text)
    for body, field in (({"texts": []}, "texts"), ({"texts": ["ok", " "]}, "texts"), ({"texts": "ok"}, "texts")):
        answer = service.post("/translate_batch", body)
        assert answer.status_code == 400 and field in json.dumps(answer.json()["detail"])
    assert service.post("/translate", {"text": "Liebet eure Feinde."}).status_code == 200  # still serving


@pytest.mark.integration
def test_64_concurrent_requests_are_batched(service: BentoProcess) -> None:
    texts = [f"{src} {i}" for i in range(16) for src, _ in SAMPLE_PAIRS[:4]]
    mark = service.log_mark()  # the shared service's log: this test's batches are those logged after it
    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(lambda t: service.post("/translate", {"text": t, "attention": "cross"}), texts))
    assert [a.status_code for a in answers] == [200] * 64
    sizes = [int(line.split("translating a batch of ")[1].split()[0])
             for line in service.log_since(mark).splitlines() if "translating a batch of" in line]
    assert max(sizes) > 1, sizes
    assert max(a.json()["timings"]["requests_in_batch"] for a in answers) > 1


@pytest.mark.integration
def test_model_endpoint_describes_what_is_loaded(service: BentoProcess, exported: tuple[Path, Path]) -> None:
    described = service.post("/model", {}).json()
    assert described["provider"] == "CPUExecutionProvider" and described["source"] == "STEPWISE_MODEL_DIR"
    assert described["manifest"]["name"] == "transformer-test" and described["layers"] == 2
    assert requests.get(f"{service.url}/info/model", timeout=30).json()["export_dir"] == str(exported[1])
    assert requests.get(f"{service.url}/livez", timeout=30).status_code == 200


@pytest.mark.integration
def test_model_endpoint_reports_every_limit(service: BentoProcess) -> None:
    described = service.post("/model", {}).json()
    assert described["limits"] == {"max_text_chars": MAX_TEXT_CHARS, "max_batch_texts": MAX_BATCH_TEXTS,
                                   "max_output_tokens": MAX_OUTPUT_TOKENS, "max_beam_size": MAX_BEAM_SIZE,
                                   "decode_batch": DECODE_BATCH}
    assert described["max_beam_size"] <= described["limits"]["max_beam_size"]  # the default model's own


@pytest.mark.integration
def test_hot_swap_on_promotion_drops_no_request(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    env = {**clearml_server.env, "STEPWISE_ORT_THREADS": "1", "STEPWISE_EXPORT_CACHE": str(tmp_path / "exports")}
    first, second = make_checkpoint(tmp_path / "a.pt", seed=11), make_checkpoint(tmp_path / "b.pt", seed=12)
    id_a, id_b = register_files(env, [first, second], project="stepwise-serve", cwd=tmp_path)
    register_exports(env, [id_a, id_b], tmp_path)  # as training registers them: the service never exports

    def promote(model_id: str) -> None:
        done = subprocess.run([sys.executable, "-m", "stepwise", "promote", model_id, "--force", "--sentences", "3"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    promote(id_a)
    server = BentoProcess(tmp_path / "bentoml.log", env)  # no STEPWISE_MODEL_DIR: resolves production
    try:
        text = SAMPLE_PAIRS[0][0]
        before = server.post("/translate", {"text": text}).json()
        assert before["model"]["id"] == id_a
        assert before["target_tokens"] == _pytorch(first, text, 1)[1]
        # a second version by id is loaded beside the default (compare two versions)
        other = server.post("/translate", {"text": text, "model": id_b}).json()
        assert other["model"]["id"] == id_b and other["target_tokens"] == _pytorch(second, text, 1)[1]

        promote(id_b)
        answers: list[tuple[float, float, int, str | None]] = []  # (sent, answered, status, model id)
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                answer = server.post("/translate", {"text": text})
                model = answer.json()["model"]["id"] if answer.status_code == 200 else None
                answers.append((sent, time.monotonic(), answer.status_code, model))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        while len(answers) < 8:  # traffic is flowing before the swap starts
            time.sleep(0.05)
        reload_sent = time.monotonic()
        swapped = server.post("/reload", {}).json()
        reload_answered = time.monotonic()
        while sum(sent > reload_answered for sent, *_ in answers) < 8:  # and keeps flowing after it
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        assert swapped["changed"] and swapped["model"]["id"] == id_b
        assert [status for _, _, status, _ in answers] == [200] * len(answers)
        # requests in flight while the swap happened were answered (by either version) ...
        assert any(sent < reload_answered and answered > reload_sent for sent, answered, _, _ in answers)
        assert {model for *_, model in answers} == {id_a, id_b}
        # ... and every request sent after the swap was translated by the new version
        assert {model for sent, _, _, model in answers if sent > reload_answered} == {id_b}
        assert server.post("/model", {}).json()["model"]["id"] == id_b
        after = server.post("/translate", {"text": text}).json()
        assert after["model"]["id"] == id_b and after["target_tokens"] == _pytorch(second, text, 1)[1]
        assert server.post("/reload", {}).json()["changed"] is False
        # ONNX Runtime's CUDA provider when this onnxruntime build offers it, else the CPU
        assert server.post("/model", {}).json()["provider"] == available_providers("auto")[0]
    finally:
        server.stop()


# -- the model store on its own: the one request check, and exports that cannot be loaded ----------
def _export_with_layers(folder: Path, encoder_layers: int, decoder_layers: int) -> Path:
    """An untrained model whose encoder and decoder depths differ, exported to ONNX."""
    from stepwise.config import Config
    from stepwise.model import Transformer
    from stepwise.tokenizer import Tokenizer
    from stepwise.train.checkpoint import Checkpoint

    tokenizer = Tokenizer.train([s for pair in SAMPLE_PAIRS for s in pair] * 4, vocab_size=120)
    config = Config.from_dict({"name": "uneven", "model": {
        "vocab_size": tokenizer.vocab_size, "d_model": 32, "n_heads": 4, "n_encoder_layers": encoder_layers,
        "n_decoder_layers": decoder_layers, "d_ff": 64, "dropout": 0.0, "max_positions": 64}})
    torch.manual_seed(3)
    model = Transformer(config.model).eval()
    checkpoint = Checkpoint(config=config, model_state=model.state_dict(), tokenizer_model=tokenizer.model_proto,
                            step=0)
    export_checkpoint(checkpoint, folder / "export")
    return folder / "export"


@pytest.mark.integration
def test_requests_are_checked_against_each_attention_kind(tmp_path: Path) -> None:
    """Layer indices are checked against every kind asked for; nothing is silently dropped."""
    store = ModelStore(model_dir=str(_export_with_layers(tmp_path, encoder_layers=1, decoder_layers=2)))
    loaded = store.default
    assert loaded.layer_counts() == {"encoder": 1, "decoder": 2, "cross": 2}
    request = {"text": "Liebet eure Feinde.", "beam_size": 1, "attention": "all", "layers": [1], "heads": None}
    with pytest.raises(InvalidRequest, match="encoder attention has 1 layers") as raised:
        check_request(Job.parse(request).options, loaded)
    assert raised.value.field == "layers"
    cross_only = {**request, "attention": "cross"}
    check_request(Job.parse(cross_only).options, loaded)  # the decoder has a second layer
    (full,) = translate(loaded, [Job.parse({**request, "layers": None})])
    (picked,) = translate(loaded, [Job.parse(cross_only)])
    assert full["attention"]["encoder"].shape[0] == 1 and full["attention"]["cross"].shape[0] == 2
    np.testing.assert_array_equal(picked["attention"]["cross"], full["attention"]["cross"][[1]])
    with pytest.raises(InvalidRequest, match="beam_size"):
        check_request(Job.parse({**cross_only, "beam_size": loaded.translator.top_k + 1}).options, loaded)


@pytest.mark.integration
def test_unusable_export_directories_are_named_errors(exported: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no such directory"):
        ModelStore(model_dir=str(tmp_path / "missing"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(exported[1], corrupt)
    (corrupt / "decoder.onnx").write_bytes((corrupt / "decoder.onnx").read_bytes()[:1000])
    with pytest.raises(ExportError, match=f"export {corrupt}: cannot be loaded"):
        ModelStore(model_dir=str(corrupt))
    manifest = json.loads((corrupt / "manifest.json").read_text())
    (corrupt / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(ExportFormatError, match="run `stepwise export` again"):
        ModelStore(model_dir=str(corrupt))


@pytest.mark.unit
def test_missing_gpu_is_device_unavailable() -> None:
    import onnxruntime as ort

    from stepwise.errors import DeviceUnavailable

    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert available_providers("cuda")[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(DeviceUnavailable, match="CUDA execution provider not available"):
            available_providers("cuda")
    assert available_providers("cpu") == ["CPUExecutionProvider"]
