"""Head ablation (issue 12): a per-head mask scales each head's output before W^O, in PyTorch and ONNX."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from stepwise.decode.onnx_runtime import (
    OnnxTranslator,
    cache_names,
    head_mask_from_pairs,
    session_options,
)
from stepwise.decode.pytorch import decode
from stepwise.export import _export_graphs, export_checkpoint
from stepwise.model.attention import MultiHeadAttention
from stepwise.train.checkpoint import load_checkpoint

from support.models import SAMPLE_PAIRS, make_checkpoint, make_model
from support.processes import ClearMLServerProcess, register_files, run_python


def _capture_w_o_input(module: torch.nn.Linear) -> tuple[list[torch.Tensor], object]:
    """Record what W^O (``out_proj``) reads: the concatenated heads ``[B, T, H * d_k]``."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().clone()))
    return seen, handle


@pytest.mark.unit
@pytest.mark.parametrize("need_weights", [False, True])  # the fused path and the explicit path
def test_masked_head_contributes_nothing_to_the_output(need_weights: bool) -> None:
    torch.manual_seed(0)
    attention = MultiHeadAttention(d_model=32, n_heads=4).eval()
    x = torch.randn(2, 5, 32)
    d_k, off = 8, 2
    seen, handle = _capture_w_o_input(attention.out_proj)
    full, full_weights = attention(x, x, need_weights=need_weights)
    mask = torch.ones(4)
    mask[off] = 0.0
    ablated, ablated_weights = attention(x, x, need_weights=need_weights, head_mask=mask)
    handle.remove()
    heads_in, heads_masked = seen
    # the masked head's slice of Concat(head_1..head_h) is zero, the others are untouched
    assert torch.count_nonzero(heads_masked[..., off * d_k:(off + 1) * d_k]) == 0
    keep = [i for i in range(32) if not off * d_k <= i < (off + 1) * d_k]
    assert torch.equal(heads_masked[..., keep], heads_in[..., keep])
    # the output is the unmasked one minus that head's term head_off · W^O[:, slice]
    w_o = attention.out_proj.weight[:, off * d_k:(off + 1) * d_k]
    expected = full - heads_in[..., off * d_k:(off + 1) * d_k] @ w_o.T
    torch.testing.assert_close(ablated, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ablated, full, atol=1e-3)
    if need_weights:  # the weights returned stay the softmax weights
        assert torch.equal(ablated_weights, full_weights)


@pytest.mark.unit
def test_model_masks_the_heads_named_in_each_kind() -> None:
    model = make_model(seed=3)
    src, tgt = torch.randint(4, 64, (2, 6)), torch.randint(4, 64, (2, 5))
    masks = {kind: torch.ones(2, 4) for kind in ("encoder", "decoder", "cross")}
    off = {"encoder": (1, 0), "decoder": (0, 3), "cross": (1, 2)}
    for kind, (layer, head) in off.items():
        masks[kind][layer, head] = 0.0
    modules = {"encoder": model.encoder_layers[off["encoder"][0]].self_attn.out_proj,
               "decoder": model.decoder_layers[off["decoder"][0]].self_attn.out_proj,
               "cross": model.decoder_layers[off["cross"][0]].cross_attn.out_proj}
    hooks = {kind: _capture_w_o_input(module) for kind, module in modules.items()}
    with torch.no_grad():
        plain = model(src, tgt)
        ablated = model(src, tgt, head_mask=masks)
    for kind, (seen, handle) in hooks.items():
        handle.remove()
        head = off[kind][1]
        assert torch.count_nonzero(seen[0][..., head * 8:(head + 1) * 8]) > 0
        assert torch.count_nonzero(seen[1][..., head * 8:(head + 1) * 8]) == 0, kind
    assert not torch.allclose(plain, ablated, atol=1e-3)


@pytest.mark.unit
def test_all_ones_mask_is_no_mask_exactly_in_pytorch() -> None:
    model = make_model(seed=4)
    src, tgt = torch.randint(4, 64, (2, 6)), torch.randint(4, 64, (2, 5))
    ones = {kind: torch.ones(2, 4) for kind in ("encoder", "decoder", "cross")}
    with torch.no_grad():
        plain, plain_attention = model(src, tgt, return_attention=True)
        masked, masked_attention = model(src, tgt, return_attention=True, head_mask=ones)
    assert torch.equal(plain, masked)
    for kind in plain_attention:
        assert all(torch.equal(a, b) for a, b in zip(plain_attention[kind], masked_attention[kind], strict=True))
    for beam in (1, 3):
        (a,) = decode(model, src[:1], beam_size=beam, max_length=8, return_attention=True)
        (b,) = decode(model, src[:1], beam_size=beam, max_length=8, return_attention=True, head_mask=ones)
        assert a.tokens == b.tokens and a.score == b.score
        assert all(np.array_equal(a.attention[k], b.attention[k]) for k in a.attention)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    folder = tmp_path_factory.mktemp("head-mask")
    checkpoint = load_checkpoint(make_checkpoint(folder / "model.pt", seed=8))
    manifest = export_checkpoint(checkpoint, folder / "export")
    parity = manifest["parity"]  # the exporter's own check compared a masked head of each kind
    every = f"{parity['sentences']}/{parity['sentences']}"
    assert parity["tokens_equal_beam1_masked"] == parity["tokens_equal_beam4_masked"] == every
    return checkpoint, folder / "export"


@pytest.mark.integration
def test_onnx_with_masked_heads_matches_pytorch(exported: tuple[object, Path]) -> None:
    checkpoint, folder = exported
    translator = OnnxTranslator(folder, device="cpu")
    model = checkpoint.build_model()
    masks = head_mask_from_pairs({"encoder": [[0, 1], [1, 3]], "decoder": [[1, 0]], "cross": [[0, 2], [1, 1]]},
                                 translator.layers, translator.n_heads)
    torch_masks = {kind: torch.from_numpy(m) for kind, m in masks.items()}
    sources = [translator.encode_text(src) for src, _ in SAMPLE_PAIRS]
    changed = 0
    for beam in (1, 3):
        ours = translator.decode_ids(sources, beam_size=beam, max_length=20, return_attention=True, head_mask=masks)
        plain = translator.decode_ids(sources, beam_size=beam, max_length=20)
        for src, hyp, unmasked in zip(sources, ours, plain, strict=True):
            (ref,) = decode(model, torch.tensor([src]), beam_size=beam, max_length=20, return_attention=True,
                            head_mask=torch_masks)
            assert hyp.tokens == ref.tokens
            assert hyp.score == pytest.approx(ref.score, abs=1e-3)
            for kind in ("encoder", "decoder", "cross"):
                np.testing.assert_allclose(hyp.attention[kind], ref.attention[kind], atol=1e-4)
            changed += hyp.tokens != unmasked.tokens or abs(hyp.score - unmasked.score) > 1e-3
    assert changed  # the mask reached the graphs: the ablated model translates differently


@pytest.mark.integration
def test_all_ones_mask_graph_equals_the_graph_without_mask_inputs(exported: tuple[object, Path],
                                                                   tmp_path: Path) -> None:
    """The format-3 graphs fed all ones give the format-2 graphs' outputs exactly."""
    checkpoint, folder = exported
    model = checkpoint.build_model()
    _export_graphs(model, tmp_path, 17, head_mask_inputs=False)
    options = session_options()  # what the service uses
    run = {name: (ort.InferenceSession(str(folder / f"{name}.onnx"), options, providers=["CPUExecutionProvider"]),
                  ort.InferenceSession(str(tmp_path / f"{name}.onnx"), options, providers=["CPUExecutionProvider"]))
           for name in ("encoder", "decoder")}
    cfg = model.config
    ones_enc = np.ones((cfg.n_encoder_layers, cfg.n_heads), dtype=np.float32)
    ones_dec = np.ones((cfg.n_decoder_layers, cfg.n_heads), dtype=np.float32)
    src = np.array([[5, 9, 17, 30, 2], [7, 8, 2, 0, 0]], dtype=np.int64)
    src_mask = src == 0
    masked, plain = run["encoder"]
    out_masked = masked.run(None, {"src_ids": src, "src_pad_mask": src_mask, "encoder_head_mask": ones_enc})
    out_plain = plain.run(None, {"src_ids": src, "src_pad_mask": src_mask})
    assert all(np.array_equal(a, b) for a, b in zip(out_masked, out_plain, strict=True))
    names = cache_names(cfg.n_decoder_layers)
    cross = dict(zip(names["cross_keys"] + names["cross_values"], out_plain[:-1], strict=True))
    empty = np.zeros((2, cfg.n_heads, 0, cfg.d_model // cfg.n_heads), dtype=np.float32)
    feed = {"tokens": np.full((2, 1), cfg.bos_id, dtype=np.int64), "src_pad_mask": src_mask,
            "past_order": np.arange(2, dtype=np.int64), **cross,
            **{n: empty for n in names["past_keys"] + names["past_values"]}}
    masked, plain = run["decoder"]
    out_masked = masked.run(None, {**feed, "decoder_head_mask": ones_dec, "cross_head_mask": ones_dec})
    out_plain = plain.run(None, feed)
    assert all(np.array_equal(a, b) for a, b in zip(out_masked, out_plain, strict=True))


STORE_GET_REFUSED = """
import json, sys
from stepwise.errors import ModelNotFound
from stepwise.serve.store import ModelStore
model_dir, export_root, model_id = sys.argv[1:]
store = ModelStore(model_dir=model_dir, export_root=export_root, device="cpu")
try:
    store.get(model_id)
except ModelNotFound as exc:
    print("REFUSED", json.dumps({"field": exc.field, "message": str(exc)}))
"""


@pytest.mark.integration
def test_service_refuses_a_version_whose_export_is_format_2(exported: tuple[object, Path], tmp_path: Path,
                                                             clearml_server: ClearMLServerProcess) -> None:
    """A registered version whose kept export predates the head masks is not served (the service never
    exports): a not-found on the ``model`` field that says how to export it again. The old export is kept."""
    _, folder = exported
    (model_id,) = register_files(clearml_server.env, [make_checkpoint(tmp_path / "model.pt", seed=8)],
                                 project="stepwise-head-mask")
    old = tmp_path / "exports" / model_id
    shutil.copytree(folder, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": 2}))
    code = STORE_GET_REFUSED.replace("sys.argv[1:]", repr([str(folder), str(tmp_path / "exports"), model_id]))
    out = run_python(code, {**clearml_server.env, "STEPWISE_ORT_THREADS": "1"}, timeout=300)
    refused = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("REFUSED"))[8:])
    assert refused["field"] == "model"
    assert f"version {model_id} has no ONNX export" in refused["message"]
    assert f"stepwise export --model-id {model_id}" in refused["message"]
    assert json.loads((old / "manifest.json").read_text())["format"] == 2  # nothing was exported
