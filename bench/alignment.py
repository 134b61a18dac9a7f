"""How well each reading of the cross-attention aligns words, beside eflomal, on the gold set.

``python -m bench alignment [--checkpoint PATH]`` (or ``python -m bench.alignment [PATH ...]``) scores
word alignments against the hand-made gold links of the 94 validation verses
(:mod:`stepwise.train.gold`, ``bench/gold/GUIDELINES.md``): alignment error rate (Och & Ney; lower is
better), precision against the possible links and recall of the sure links, each with the links of
all verses pooled, as AER is usually reported.

Systems:

- **diagonal**: no model; target word ``j`` linked to the source word at the same relative place.
- **eflomal** (Östling & Tiedemann 2016), trained on the training split plus the gold verses
  as training's guided alignment runs it (:mod:`stepwise.train.alignments`: whitespace words,
  punctuation at a word's edges stripped; the words keep their places, so its links index the
  same words): forward (each English word gets one German word),
  reverse (each German word gets one English word), their intersection, their union and
  grow-diag-final-and (Koehn et al. 2005), the usual symmetrisation.
- **the model** (with ``--checkpoint``): each verse teacher-forced (German source, English
  reference), the cross-attention merged into words with :mod:`stepwise.serve.alignment` and
  the argmax link taken per target word, read three ways:

  - *predicting step*: a target piece aligned by the attention of the step that predicts it (the
    service's rule);
  - *reading step*: by the step that reads it as input (``t + 1``, "Shift-Att", Chen et al. 2020);
  - *value-norm*: the predicting step's weights scaled by the norm of what each source position
    sends through the head, ``‖α·f(x)‖`` with ``f(x) = x W_V W_O`` (Kobayashi et al. 2020), rows
    renormalised;

  each per layer × head, per layer (head average) and averaged over everything; a checkpoint
  trained with guided alignment (``train.guided_alignment_weight``) also gets the row of its
  guided head, read at the predicting step as training guided it. The summary table
  gives each reading's best layer × head (picked on these same verses, so an optimistic figure),
  each layer's head average and the overall average; the AER of every layer × head follows in one
  grid per reading.

Results go to ``bench/results/alignment-DEVICE.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import preset_of, table, write_results
from stepwise.serve.alignment import AVERAGE, Choice, attention_source, word_alignment
from stepwise.train.alignments import eflomal_directions, grow_diag_final_and
from stepwise.train.gold import GoldVerse, read_gold, scores

Links = set[tuple[int, int]]
READINGS = ("predicting step", "reading step", "value-norm")


# ---------------------------------------------------------------------------------------------- baselines

def diagonal(verses: list[GoldVerse]) -> list[Links]:
    """The no-model baseline: target word ``j`` linked to the source word at the same relative place."""
    out = []
    for verse in verses:
        src, tgt = len(verse.source_words), len(verse.target_words)
        out.append({(min(int((j + 0.5) * src / tgt), src - 1), j) for j in range(tgt)})
    return out


# ---------------------------------------------------------------------------------------------- eflomal

def eflomal_alignments(verses: list[GoldVerse], training: Iterable[tuple[str, str]]) -> dict[str, list[Links]]:
    """eflomal's links for the gold verses, aligned together with ``training`` (the gold verses last).

    Returns:
        ``{"forward", "reverse", "intersection", "union", "grow-diag-final-and"}`` -> links per verse.
    """
    pairs = [*training, *((verse.source, verse.reference) for verse in verses)]
    forward, reverse = eflomal_directions(pairs)
    forward, reverse = forward[-len(verses):], reverse[-len(verses):]
    return {
        "forward": forward,
        "reverse": reverse,
        "intersection": [f & r for f, r in zip(forward, reverse, strict=True)],
        "union": [f | r for f, r in zip(forward, reverse, strict=True)],
        "grow-diag-final-and": [grow_diag_final_and(f, r) for f, r in zip(forward, reverse, strict=True)],
    }


# ---------------------------------------------------------------------------------------------- the model

def cross_attention(checkpoint_path: str, verses: list[GoldVerse]) -> tuple[list[dict], Any]:
    """Teacher-forced cross-attention of every verse, per reading, with its pieces.

    Returns:
        One dict per verse (``"maps"``: reading -> ``[L, H, T, S]``, ``"source"``/``"target"``:
        the pieces each map's columns/rows stand for), and the checkpoint.
    """
    import torch

    from stepwise.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    model, tokenizer = checkpoint.build_model().eval(), checkpoint.tokenizer()
    out = []
    for verse in verses:
        src = tokenizer.encode(verse.source)
        tgt = tokenizer.encode(verse.reference)  # pieces + EOS: what each decoder position predicts
        with torch.no_grad():
            _, attention = model(torch.tensor([src]), torch.tensor([[tokenizer.bos_id, *tgt[:-1]]]),
                                 return_attention=True)
            memory, _ = model.encode(torch.tensor([src]))
            norms = []  # ‖f_h(x_s)‖ per layer: [H, S], f_h(x) = x W_V^h W_O^h (biases of W_O shared, left out)
            for layer in model.decoder_layers:
                mha = layer.cross_attn
                value = mha.v_proj(memory)[0].view(-1, mha.n_heads, mha.d_k).transpose(0, 1)  # [H, S, d_k]
                w_out = mha.out_proj.weight.view(mha.d_model, mha.n_heads, mha.d_k).permute(1, 2, 0)  # [H, d_k, d]
                norms.append(torch.linalg.vector_norm(value @ w_out, dim=-1))
        cross = torch.stack([layer[0] for layer in attention["cross"]]).numpy()  # [L, H, T, S]
        weighted = cross * torch.stack(norms).numpy()[:, :, None, :]
        weighted /= np.maximum(weighted.sum(axis=-1, keepdims=True), 1e-12)
        source_pieces, target_pieces = tokenizer.pieces(src), tokenizer.pieces(tgt)
        out.append({"maps": {"predicting step": cross, "reading step": cross, "value-norm": weighted},
                    "source": source_pieces, "target": target_pieces, "verse": verse})
    return out, checkpoint


def model_links(verses: list[dict], reading: str, layer: Choice, head: Choice) -> list[Links]:
    """The argmax link per target word of one reading, layer and head, for every verse."""
    out = []
    for item in verses:
        weights = attention_source(item["maps"][reading], layer, head)
        target_pieces = item["target"]
        if reading == "reading step":  # rows 1..T read pieces 0..T-1; the EOS piece is read by no row
            weights, target_pieces = weights[1:], target_pieces[:-1]
        aligned = word_alignment(weights, item["source"], target_pieces)
        verse = item["verse"]
        if aligned.source_words != verse.source_words or aligned.target_words != verse.target_words:
            raise ValueError(f"the tokenizer's words differ from the whitespace words of {verse.source!r}")
        out.append(set(aligned.hard()))
    return out


def model_sections(checkpoint_path: str, verses: list[GoldVerse]) -> tuple[list[list], list[str]]:
    """Summary rows of every reading of one checkpoint, and the AER grid of each reading."""
    items, checkpoint = cross_attention(checkpoint_path, verses)
    step, train = checkpoint.step, checkpoint.config.train
    model = f"{preset_of(checkpoint.config.name)} step {step}"  # the rows of several checkpoints side by side
    layers, heads = items[0]["maps"]["predicting step"].shape[:2]
    rows, grids = [], []
    if train.guided_alignment_weight > 0:  # the head training pulled towards eflomal's links
        layer, head = range(layers)[train.guided_alignment_layer], train.guided_alignment_head
        rows.append([f"{model}, predicting step, guided head (weight {train.guided_alignment_weight:g}): "
                     f"layer {layer} head {head}", *scores(model_links(items, "predicting step", layer, head), verses)])
    for reading in READINGS:
        grid = {(layer, head): scores(model_links(items, reading, layer, head), verses)
                for layer in [*range(layers), AVERAGE] for head in [*range(heads), AVERAGE]}
        best = min(((layer, head) for layer in range(layers) for head in range(heads)), key=lambda key: grid[key][0])
        name = f"{model}, {reading}"
        rows.append([f"{name}, best: layer {best[0]} head {best[1]}", *grid[best]])
        rows += [[f"{name}, layer {layer} (head average)", *grid[(layer, AVERAGE)]] for layer in range(layers)]
        rows.append([f"{name}, average of all layers and heads", *grid[(AVERAGE, AVERAGE)]])
        grids.append(table(f"AER per layer × head: {model}, {reading}",
                           ["layer", *(f"head {h}" for h in range(heads)), "head average"],
                           [[str(layer), *(f"{grid[(layer, head)][0]:.3f}" for head in [*range(heads), AVERAGE])]
                            for layer in [*range(layers), AVERAGE]]))
    return rows, grids


# ---------------------------------------------------------------------------------------------- the bench

def bench_alignment(checkpoints: list[str], *, config: str = "default", eflomal: bool = True) -> list[str]:
    """Every system's AER, precision and recall on the gold set, as markdown sections.

    Args:
        checkpoints: model checkpoints to read attention from (none: the baselines only).
        config: the preset whose training split eflomal learns from.
        eflomal: run eflomal (about 1–2 minutes of CPU on the full training split).
    """
    from stepwise.config import load_config
    from stepwise.train.data import load_split

    verses = read_gold()
    data = load_config(config).data
    if [(v.source, v.reference) for v in verses] != [tuple(p) for p in load_split(data, "valid")]:
        raise ValueError(f"the gold verses are not the validation split of the {config!r} preset")
    rows = [["diagonal (no model)", *scores(diagonal(verses), verses)]]
    notes = []
    if eflomal:
        training = load_split(data, "train")
        start = time.perf_counter()
        for direction, links in eflomal_alignments(verses, training).items():
            rows.append([f"eflomal, {direction}", *scores(links, verses)])
        notes.append(f"eflomal aligned {len(training):,} training pairs + {len(verses)} gold verses in "
                     f"{time.perf_counter() - start:.0f} s (its samplers are random: a rerun moves its rows "
                     "by about 0.01).")
    if not checkpoints:
        notes.append("No checkpoint given: the model's readings need one (`--checkpoint PATH`).")
    grids = []
    for path in checkpoints:
        model_rows, model_grids = model_sections(path, verses)
        rows += model_rows
        grids += model_grids
    sure = sum(len(v.sure) for v in verses)
    possible = sum(len(v.possible) for v in verses)
    summary = table(f"Word alignment on the gold set ({len(verses)} validation verses, {sure} sure + "
                    f"{possible} possible links; AER lower is better)",
                    ["system", "AER", "precision", "recall"],
                    [[name, *(f"{value:.3f}" for value in values)] for name, *values in rows])
    return [summary, *(note + "\n" for note in notes), *grids]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="*", help="checkpoints to read attention from")
    parser.add_argument("--checkpoint", action="append", default=[], help="a checkpoint to read (repeatable)")
    parser.add_argument("--config", default="default", help="preset whose training split eflomal learns from")
    parser.add_argument("--no-eflomal", action="store_true", help="leave eflomal out")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    sections = bench_alignment([*args.checkpoints, *args.checkpoint], config=args.config, eflomal=not args.no_eflomal)
    write_results("alignment", sections, "cpu", Path(args.out) if args.out else None)


if __name__ == "__main__":
    main(sys.argv[1:])
