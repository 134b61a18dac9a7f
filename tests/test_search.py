"""The shared search loop (``stepwise.decode.search``): its k×k beam ranking against a textbook
full-vocabulary beam search, the output budget on both runtimes, the ONNX Runtime path without
torch, and the one input-length rule across training, PyTorch and ONNX translation."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from stepwise.config import Config
from stepwise.decode.onnx_runtime import DecoderSteps, OnnxTranslator
from stepwise.decode.pytorch import TorchSteps, beam_search, decode, greedy_decode
from stepwise.decode.search import length_limits, search
from stepwise.export import export_checkpoint
from stepwise.model import Transformer
from stepwise.tokenizer import Tokenizer, truncate
from stepwise.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from stepwise.train.data import encode_pairs
from stepwise.train.evaluate import encode_sources, translate, translate_ids

from support.models import SAMPLE_PAIRS, make_model, padded_batch
from support.search_tables import BOS, EOS, PAD, TableSteps, table_log_probs


def reference_beam_search(log_probs: Callable[[tuple[int, ...]], np.ndarray], *, beam_size: int,
                          length_penalty: float, budget: int) -> list[int]:
    """The textbook beam search for one sentence, given its next-token log-probabilities per prefix:
    every (hypothesis, token) pair of the vocabulary ranked each step, a finished hypothesis carried
    at its score; the best by the GNMT length penalty at the end."""
    beams: list[tuple[tuple[int, ...], float, bool]] = [((), 0.0, False)]
    for _ in range(budget):
        candidates = []
        for tokens, score, done in beams:
            if done:
                candidates.append((tokens, score, True))
                continue
            for token, gain in enumerate(log_probs(tokens)):
                if np.isfinite(gain):
                    candidates.append(((*tokens, token), score + float(gain), token == EOS))
        beams = sorted(candidates, key=lambda c: -c[1])[:beam_size]
        if all(done for _, _, done in beams):
            break
    if beam_size == 1:
        return list(beams[0][0])
    return list(max(beams, key=lambda b: b[1] / ((5.0 + len(b[0])) / 6.0) ** length_penalty)[0])


@pytest.mark.unit
@pytest.mark.parametrize("can_drop_rows", [True, False])
@pytest.mark.parametrize("beam_size", [1, 2, 4])
def test_k_by_k_beam_equals_full_vocabulary_beam_search(beam_size: int, can_drop_rows: bool) -> None:
    source_lengths = [1, 3, 2, 1, 2, 1]  # budgets 12, 16, 14, ...: sentences finish at different steps
    hyps = search(TableSteps(len(source_lengths), beam_size, can_drop_rows), source_lengths, beam_size=beam_size,
                  length_penalty=0.6, max_length=None, max_positions=64, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    emitted = [h.tokens + ([EOS] if h.finished else []) for h in hyps]
    expected = [reference_beam_search(partial(table_log_probs, s), beam_size=beam_size, length_penalty=0.6,
                                      budget=2 * n + 10) for s, n in enumerate(source_lengths)]
    assert emitted == expected
    # the table makes the check meaningful: some end with EOS, some run out of budget, lengths vary
    assert any(h.finished for h in hyps) and len({len(e) for e in emitted}) > 2


@pytest.mark.unit
@pytest.mark.parametrize("beam_size", [2, 4])
def test_pytorch_beam_search_equals_full_vocabulary_beam_search(beam_size: int) -> None:
    model = make_model(seed=3, vocab_size=24)  # an untrained model whose beams part from greedy search
    src, src_mask = padded_batch(24, [6, 4, 7, 5], seed=11)

    def model_log_probs(sentence: torch.Tensor, prefix: tuple[int, ...]) -> np.ndarray:
        with torch.no_grad():
            logits = model(sentence[None], torch.tensor([[model.config.bos_id, *prefix]]))
        log_probs = torch.log_softmax(logits[0, -1].float(), -1)
        log_probs[[model.config.pad_id, model.config.bos_id]] = float("-inf")
        return log_probs.numpy()

    hyps = beam_search(model, src, src_mask, beam_size=beam_size, length_penalty=0.6, max_length=9)
    greedy = greedy_decode(model, src, src_mask, max_length=9)
    assert any(g.tokens != h.tokens for g, h in zip(greedy, hyps, strict=True))
    for b, hyp in enumerate(hyps):
        sentence = src[b, : int((~src_mask[b]).sum())]
        expected = reference_beam_search(partial(model_log_probs, sentence), beam_size=beam_size,
                                         length_penalty=0.6, budget=9)
        assert hyp.tokens + ([EOS] if hyp.finished else []) == expected


# -- the output budget -------------------------------------------------------------------------
def never_eos(model: Transformer) -> Transformer:
    """Make a pre-LN model unable to prefer EOS: the final norm's bias puts 100 on feature 0, which
    only EOS's output row reads (with weight -1), so EOS's logit is about -100 at every step."""
    eos = model.config.eos_id
    with torch.no_grad():
        model.decoder_norm.bias[0] = 100.0
        model.output_projection.weight[:, 0] = 0.0
        model.output_projection.weight[eos, 0] = -1.0
    return model


@pytest.mark.unit
def test_default_budget_is_two_source_lengths_plus_ten_within_the_positional_table() -> None:
    model = never_eos(make_model(seed=2, vocab_size=40, norm_placement="pre", max_positions=48))
    lengths = [3, 9, 20]  # budgets 16, 28 and 50 -> 47 (max_positions - 1)
    src, src_mask = padded_batch(40, lengths, seed=4)
    assert length_limits(lengths, None, 48).tolist() == [16, 28, 47]
    for beam in (1, 3):
        hyps = decode(model, src, src_mask, beam_size=beam)
        assert [len(h.tokens) for h in hyps] == [16, 28, 47]
        assert not any(h.finished for h in hyps)
        # max_length caps every sentence, short or long
        capped = decode(model, src, src_mask, beam_size=beam, max_length=12)
        assert [len(h.tokens) for h in capped] == [12, 12, 12]


# -- the ONNX Runtime path ----------------------------------------------------------------------
def write_checkpoint(path: Path, *, max_positions: int = 64, eos: bool = True, seed: int = 0) -> Path:
    """A small untrained pre-LN model with a real tiny tokenizer; ``eos=False``: never ends."""
    tokenizer = Tokenizer.train([s for pair in SAMPLE_PAIRS for s in pair] * 4, vocab_size=120)
    config = Config.from_dict({"name": "search-test", "model": {
        "vocab_size": tokenizer.vocab_size, "d_model": 32, "n_heads": 4, "n_encoder_layers": 2,
        "n_decoder_layers": 2, "d_ff": 64, "dropout": 0.0, "max_positions": max_positions,
        "norm_placement": "pre"}})
    torch.manual_seed(seed)
    model = Transformer(config.model).eval()
    if not eos:
        never_eos(model)
    return save_checkpoint(path, Checkpoint(config=config, model_state=model.state_dict(),
                                            tokenizer_model=tokenizer.model_proto, step=0))


@pytest.mark.integration
def test_onnx_path_decodes_with_torch_blocked(tmp_path: Path) -> None:
    export_checkpoint(load_checkpoint(write_checkpoint(tmp_path / "model.pt")), tmp_path / "export")
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from stepwise.decode.onnx_runtime import OnnxTranslator
import stepwise.decode.search
translator = OnnxTranslator({str(tmp_path / "export")!r}, device="cpu")
for beam in (1, 3):
    (out,) = translator.translate(["Im Anfang war das Wort."], beam_size=beam, return_attention=True)
    assert out.target_tokens and out.attention["cross"].shape[2] == len(out.target_tokens)
print("torch" in sys.modules and sys.modules["torch"] is None, sorted(m for m in sys.modules if "torch" in m))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "['torch']"]  # only the blocked entry: nothing torch-like loaded


@pytest.mark.integration
def test_onnx_default_budget_and_max_length(tmp_path: Path) -> None:
    export_checkpoint(load_checkpoint(write_checkpoint(tmp_path / "model.pt", max_positions=48, eos=False)),
                      tmp_path / "export")
    translator = OnnxTranslator(tmp_path / "export", device="cpu")
    sources = [[7, 8, EOS], [9] * 8 + [EOS], [10] * 19 + [EOS]]  # 3, 9, 20 tokens: budgets 16, 28, 47 (cap)
    for beam in (1, 3):
        hyps = translator.decode_ids(sources, beam_size=beam)
        assert [len(h.tokens) for h in hyps] == [16, 28, 47]
        assert not any(h.finished for h in hyps)
        capped = translator.decode_ids(sources, beam_size=beam, max_length=12)
        assert [len(h.tokens) for h in capped] == [12, 12, 12]


@pytest.mark.integration
def test_sentences_leaving_at_different_steps_decode_as_alone_pytorch_and_onnx(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sentence's memory is kept once for its k beams; when sentences leave the batch (here at
    their budgets 16, 20 and 28 steps) both runtimes select the sentences' memory and mask, and the
    beams of those still decoding go on as if each sentence were alone."""
    checkpoint = load_checkpoint(write_checkpoint(tmp_path / "model.pt", eos=False, seed=2))
    export_checkpoint(checkpoint, tmp_path / "export")
    translator = OnnxTranslator(tmp_path / "export", device="cpu")
    model = checkpoint.build_model()
    sources = [[7, 8, EOS], [9, 11] * 2 + [EOS], [12] * 8 + [EOS], [13, 14] * 6 + [EOS]]  # budgets 16, 20, 28, 36
    pad = translator.tokenizer.pad_id
    src = torch.full((len(sources), max(map(len, sources))), pad)
    for i, ids in enumerate(sources):
        src[i, : len(ids)] = torch.tensor(ids)
    kept: list[int] = []  # the rows each drop keeps

    def recording(original: Callable) -> Callable:
        def select_rows(self: object, positions: np.ndarray) -> None:
            kept.append(len(positions))
            original(self, positions)
        return select_rows

    for steps in (TorchSteps, DecoderSteps):
        monkeypatch.setattr(steps, "select_rows", recording(steps.select_rows))
    beam = 3
    batch_torch = decode(model, src, src == pad, beam_size=beam, return_attention=True)
    batch_onnx = translator.decode_ids(sources, beam_size=beam, return_attention=True)
    assert kept == [9, 6, 3] * 2  # three sentences left, one at a time, on each runtime
    for ids, ours, theirs in zip(sources, batch_onnx, batch_torch, strict=True):
        (alone,) = decode(model, torch.tensor([ids]), beam_size=beam, return_attention=True)
        assert ours.tokens == theirs.tokens == alone.tokens and len(alone.tokens) == 2 * len(ids) + 10
        for kind in ("encoder", "decoder", "cross"):
            np.testing.assert_allclose(ours.attention[kind], alone.attention[kind], atol=1e-4)
            np.testing.assert_allclose(theirs.attention[kind], alone.attention[kind], atol=1e-5)


# -- one input-length rule ----------------------------------------------------------------------
@pytest.mark.integration
def test_too_long_input_is_cut_the_same_way_everywhere(tmp_path: Path) -> None:
    max_positions = 16
    checkpoint = load_checkpoint(write_checkpoint(tmp_path / "model.pt", max_positions=max_positions))
    export_checkpoint(checkpoint, tmp_path / "export")
    tokenizer = checkpoint.tokenizer()
    long = " ".join(src for src, _ in SAMPLE_PAIRS)
    full = tokenizer.encode(long)
    assert len(full) > max_positions
    cut = truncate(full, max_positions)
    assert len(cut) == max_positions - 1 and cut[-1] == tokenizer.eos_id and cut[:-1] == full[: max_positions - 2]
    short = tokenizer.encode(SAMPLE_PAIRS[0][0])
    assert truncate(short, max_positions) == short

    # ONNX translation and PyTorch translation (and the trainer's heatmaps, which use encode_sources)
    translator = OnnxTranslator(tmp_path / "export", device="cpu")
    assert translator.encode_text(long) == cut
    assert encode_sources(tokenizer, [long], max_positions) == [cut]
    model = checkpoint.build_model().eval()
    (onnx_out,) = translator.translate([long])
    (torch_ids,) = translate_ids(model, [cut])
    assert translate(model, tokenizer, [long]) == [tokenizer.decode(torch_ids.tokens)] == [onnx_out.translation]
    assert onnx_out.source_tokens == tokenizer.pieces(cut)

    # training: a pair whose source the rule would cut is dropped (a cut source no longer matches its target)
    pairs = [(long, "x"), SAMPLE_PAIRS[0]]
    assert encode_pairs(pairs, tokenizer, max_length=1000, max_positions=max_positions) == [
        (short, tokenizer.encode(SAMPLE_PAIRS[0][1], add_eos=False))]
