"""Which cross-attention aligns words best: alignment error rate per layer and head.

``python -m bench.alignment CHECKPOINT [CHECKPOINT ...]`` teacher-forces each hand-aligned verse
below (the German source, the English reference) through the model, merges the cross-attention
into words with :mod:`stepwise.serve.alignment`, takes the argmax link per target word, and prints the
alignment error rate (Och & Ney; lower is better) of every layer × head, of each layer's head
average, and of the average of everything, summed over the verses (links pooled, as AER is
usually reported); each once with the service's rule (a target piece aligned by the attention of
the step that predicts it) and once shifted (by the step that reads it as input, "Shift-Att",
Chen et al. 2020), beside a no-model diagonal baseline. The service's default
(``alignment.DEFAULT_LAYER``) was picked with it.

The verses come from the validation books (Jonah, Titus): words are the whitespace-separated
tokens, 0-based, ``sure`` the links anyone would draw, ``possible`` the defensible extras
(function words, one word for two). Sure links are possible too.
"""

from __future__ import annotations

import sys

from stepwise.serve.alignment import AVERAGE, alignment_error_rate, attention_source, parse_pharaoh, word_alignment

# (source, reference, sure links, possible extra links), links as Pharaoh "source-target"
VERSES: list[tuple[str, str, str, str]] = [
    ("Und es verdroß Jona sehr, und er wurde zornig.",
     "But it displeased Jonah exceedingly, and he was angry.",
     "0-0 1-1 2-2 3-3 4-4 5-5 6-6 7-7 8-8", ""),
    ("Und Jehova sprach: Ist es recht, daß du zürnest?",
     'Yahweh said, "Is it right for you to be angry?"',
     "1-0 2-1 3-2 4-3 5-4 7-6 8-9", "6-5 6-7 8-7 8-8"),
    ("Die auf nichtige Götzen achten, verlassen ihre Gnade.",
     "Those who regard lying vanities forsake their own mercy.",
     "0-0 4-2 2-3 3-4 5-5 6-6 7-8", "0-1 1-2 6-7"),
    ("Und das Wort Jehovas geschah zum zweiten Male zu Jona also:",
     "The word of Yahweh came to Jonah the second time, saying,",
     "1-0 2-1 3-3 4-4 8-5 9-6 6-8 7-9 10-10", "3-2 5-7"),
    ("Und Jehova befahl dem Fische, und er spie Jona an das Land aus.",
     "Yahweh spoke to the fish, and it vomited out Jonah on the dry land.",
     "1-0 2-1 3-3 4-4 5-5 6-6 7-7 12-8 8-9 9-10 10-11 11-13", "3-2 11-12 7-8"),
    ("Denn die Gnade Gottes ist erschienen, heilbringend für alle Menschen,",
     "For the grace of God has appeared, bringing salvation to all men,",
     "0-0 1-1 2-2 3-4 4-5 5-6 6-7 6-8 7-9 8-10 9-11", "3-3"),
]


def cross_attention(checkpoint_path: str) -> tuple[list[tuple], int, int, int]:
    """Teacher-forced cross-attention ``[L, H, T, S]`` of every verse, with its pieces."""
    import torch

    from stepwise.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    model, tokenizer = checkpoint.build_model().eval(), checkpoint.tokenizer()
    out = []
    for source, reference, sure, possible in VERSES:
        src = tokenizer.encode(source)
        tgt = tokenizer.encode(reference)  # pieces + EOS: what each decoder position predicts
        with torch.no_grad():
            _, attention = model(torch.tensor([src]), torch.tensor([[tokenizer.bos_id, *tgt[:-1]]]),
                                 return_attention=True)
        cross = torch.stack([layer[0] for layer in attention["cross"]]).numpy()  # [L, H, T, S]
        out.append((cross, tokenizer.pieces(src), tokenizer.pieces(tgt), source, reference, sure, possible))
    layers, heads = out[0][0].shape[:2]
    return out, layers, heads, checkpoint.step


def error_rate(verses: list[tuple], layer: int | str, head: int | str, *, shifted: bool = False) -> float:
    """AER over all verses (links pooled) of one layer/head choice.

    ``shifted``: align target piece ``t`` with the row of the step that reads it (``t + 1``, as
    "Shift-Att" does) instead of the row of the step that predicts it (the service's rule).
    """
    hypothesis: set[tuple[int, ...]] = set()
    sure_links: set[tuple[int, ...]] = set()
    possible_links: set[tuple[int, ...]] = set()
    for n, (cross, src_pieces, tgt_pieces, source, reference, sure, possible) in enumerate(verses):
        weights = attention_source(cross, layer, head)
        if shifted:  # rows 1..T read pieces 0..T-1; the EOS piece is read by no row
            weights, tgt_pieces = weights[1:], tgt_pieces[:-1]
        aligned = word_alignment(weights, src_pieces, tgt_pieces)
        assert aligned.source_words == source.split() and aligned.target_words == reference.split()
        hypothesis |= {(n, i, j) for i, j in aligned.hard()}
        sure_links |= {(n, i, j) for i, j in parse_pharaoh(sure)}
        possible_links |= {(n, i, j) for i, j in parse_pharaoh(possible)}
    return alignment_error_rate(hypothesis, sure_links, possible_links)


def diagonal_error_rate() -> float:
    """AER of the no-model baseline: target word j linked to the source word at the same relative place."""
    hypothesis, sure_links, possible_links = set(), set(), set()
    for n, (source, reference, sure, possible) in enumerate(VERSES):
        src, tgt = len(source.split()), len(reference.split())
        hypothesis |= {(n, min(int((j + 0.5) * src / tgt), src - 1), j) for j in range(tgt)}
        sure_links |= {(n, i, j) for i, j in parse_pharaoh(sure)}
        possible_links |= {(n, i, j) for i, j in parse_pharaoh(possible)}
    return alignment_error_rate(hypothesis, sure_links, possible_links)


def main(paths: list[str]) -> None:
    print(f"diagonal baseline (no model): AER {diagonal_error_rate():.3f}")
    for path in paths:
        verses, layers, heads, step = cross_attention(path)
        print(f"\nstep {step}: AER (lower is better) over {len(verses)} verses")
        print("| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " | head average |")
        print("| --- |" + " --- |" * (heads + 1))
        for shifted in (False, True):
            for layer in [*range(layers), AVERAGE]:
                cells = [error_rate(verses, layer, head, shifted=shifted) for head in [*range(heads), AVERAGE]]
                name = f"{layer}, shifted" if shifted else str(layer)
                print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
