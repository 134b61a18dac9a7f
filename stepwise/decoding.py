"""Incremental decoding with a KV cache: greedy search and beam search share one loop.

At step ``t`` the decoder sees only the newest token; the keys and values of earlier
positions come from the cache (``past``), and cross-attention keys/values are projected from
the encoder memory once. Each step therefore costs one position per layer instead of ``t``.

Beam search keeps ``beam_size`` hypotheses per sentence, all in one batch of
``B * beam_size`` rows. Each step scores every (hypothesis, next token) pair by summed
log-probability, keeps the best ``beam_size`` per sentence and reorders the cache rows to
follow them. A finished hypothesis stays in the beam, extending only with padding at no
cost. At the end hypotheses are ranked with the GNMT length penalty
``score / ((5 + length) / 6) ** alpha``. Greedy search is the same loop with the argmax.

When asked, the attention of every generated step is recorded and followed back through the
beam reorderings, so each result carries its own maps in the shared layout
``{"encoder": [L x (H, S, S)], "decoder": [L x (H, T, T)], "cross": [L x (H, T, S)]}``
where ``T`` counts the generated tokens including the final EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stepwise.models.transformer import Transformer


@dataclass
class Hypothesis:
    """One decoded sentence.

    Attributes:
        tokens: generated token ids, without BOS and EOS.
        score: summed log-probability (length-normalised for beam search).
        finished: the hypothesis ended with EOS (rather than at ``max_length``).
        attention: per kind, one ``[H, T, K]`` tensor per layer; None unless asked.
    """

    tokens: list[int]
    score: float
    finished: bool
    attention: dict[str, list[Tensor]] | None = None


def length_limits(source_lengths: Tensor, max_length: int | None, max_positions: int) -> Tensor:
    """Per-sentence output budget: ``max_length`` if given, else ``2 * S + 10`` for each sentence's
    own length ``S`` (so a sentence decodes the same alone or in any batch), within the positional
    table."""
    if max_length is not None:
        return torch.full_like(source_lengths, min(max_length, max_positions - 1))
    return torch.clamp(2 * source_lengths + 10, max=max_positions - 1)


@torch.no_grad()
def greedy_decode(
    model: Transformer,
    src_ids: Tensor,
    src_pad_mask: Tensor | None = None,
    *,
    max_length: int | None = None,
    return_attention: bool = False,
) -> list[Hypothesis]:
    """Pick the most probable token at every step.

    Args:
        model: the transformer (put in eval mode by the caller).
        src_ids: ``[B, S]`` source ids (ending with EOS).
        src_pad_mask: ``[B, S]`` True at padding.
        max_length: most tokens to generate; default :func:`length_limits`.
        return_attention: record attention maps for every step.

    Returns:
        One :class:`Hypothesis` per source sentence.
    """
    return _search(model, src_ids, src_pad_mask, beam_size=1, length_penalty=0.0, max_length=max_length,
                   return_attention=return_attention)


@torch.no_grad()
def beam_search(
    model: Transformer,
    src_ids: Tensor,
    src_pad_mask: Tensor | None = None,
    *,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    max_length: int | None = None,
    return_attention: bool = False,
) -> list[Hypothesis]:
    """Keep the ``beam_size`` best hypotheses per sentence; see the module docstring.

    Args:
        model: the transformer (eval mode).
        src_ids: ``[B, S]`` source ids.
        src_pad_mask: ``[B, S]`` True at padding.
        beam_size: hypotheses kept per sentence (1 behaves like greedy search).
        length_penalty: GNMT alpha; 0 ranks by raw log-probability.
        max_length: most tokens to generate.
        return_attention: record attention maps of the returned hypotheses.

    Returns:
        The best :class:`Hypothesis` per source sentence.
    """
    return _search(model, src_ids, src_pad_mask, beam_size=beam_size, length_penalty=length_penalty,
                   max_length=max_length, return_attention=return_attention)


def decode(
    model: Transformer, src_ids: Tensor, src_pad_mask: Tensor | None = None, *, beam_size: int = 1,
    **kwargs: object,
) -> list[Hypothesis]:
    """Greedy search for ``beam_size == 1``, beam search otherwise."""
    if beam_size == 1:
        kwargs.pop("length_penalty", None)
        return greedy_decode(model, src_ids, src_pad_mask, **kwargs)  # type: ignore[arg-type]
    return beam_search(model, src_ids, src_pad_mask, beam_size=beam_size, **kwargs)  # type: ignore[arg-type]


def _search(
    model: Transformer,
    src_ids: Tensor,
    src_pad_mask: Tensor | None,
    *,
    beam_size: int,
    length_penalty: float,
    max_length: int | None,
    return_attention: bool,
) -> list[Hypothesis]:
    cfg = model.config
    batch, src_len = src_ids.shape
    k = beam_size
    rows = batch * k
    device = src_ids.device
    src_lengths = torch.full((batch,), src_len, device=device) if src_pad_mask is None else (~src_pad_mask).sum(1)
    row_limit = length_limits(src_lengths, max_length, cfg.max_positions).repeat_interleave(k)

    memory, enc_weights = model.encode(src_ids, src_pad_mask, need_weights=return_attention)
    # every hypothesis of a sentence shares its memory: repeat each sentence k times
    cross_kv = [(key.repeat_interleave(k, 0), value.repeat_interleave(k, 0))
                for key, value in model.cross_key_values(memory)]
    row_pad_mask = None if src_pad_mask is None else src_pad_mask.repeat_interleave(k, 0)

    tokens = torch.full((rows, 1), cfg.bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(batch, k, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: let only the first one expand
    scores = scores.view(rows)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    past = None
    first_row = torch.arange(batch, device=device)[:, None] * k
    steps: list[tuple[Tensor, list[Tensor], list[Tensor]]] = []  # (origin, self, cross) per step

    for step in range(int(row_limit.max())):
        logits, past, self_w, cross_w = model.decode(tokens[:, -1:], cross_kv, src_pad_mask=row_pad_mask,
                                                     past=past, need_weights=return_attention)
        log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1)
        log_probs[:, [cfg.pad_id, cfg.bos_id]] = float("-inf")  # never generated
        # a finished hypothesis may only grow by padding, at no cost
        log_probs[finished] = float("-inf")
        log_probs[finished, cfg.pad_id] = 0.0

        if k == 1:
            next_tokens = log_probs.argmax(dim=-1)
            scores = scores + log_probs.gather(1, next_tokens[:, None]).squeeze(1)
            origin = torch.arange(rows, device=device)
        else:
            vocab = log_probs.shape[-1]
            candidates = (scores[:, None] + log_probs).view(batch, k * vocab)
            top_scores, top_index = candidates.topk(k, dim=-1)
            origin = (first_row + torch.div(top_index, vocab, rounding_mode="floor")).view(rows)
            next_tokens = (top_index % vocab).view(rows)
            scores = top_scores.view(rows)
            # follow the surviving hypotheses: reorder everything indexed by row
            tokens = tokens[origin]
            finished = finished[origin]
            past = [(key[origin], value[origin]) for key, value in past]

        if return_attention:
            steps.append((origin, [w[:, :, 0] for w in self_w], [w[:, :, 0] for w in cross_w]))
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        finished = finished | (next_tokens == cfg.eos_id) | (step + 1 >= row_limit)
        if bool(finished.all()):
            break

    generated = tokens[:, 1:]
    lengths = _lengths(generated, cfg.eos_id, cfg.pad_id)
    final = scores.clone()
    if k > 1 and length_penalty > 0:
        final = final / ((5.0 + lengths.float()) / 6.0) ** length_penalty
    best = first_row.squeeze(1) + final.view(batch, k).argmax(dim=-1)

    results = []
    for b in range(batch):
        row = int(best[b])
        ids = generated[row, : int(lengths[row])].tolist()
        ended = bool(ids) and ids[-1] == cfg.eos_id
        attention = None
        if return_attention:
            src_real = src_len if src_pad_mask is None else int((~src_pad_mask[b]).sum())
            attention = _collect_attention(steps, row, len(ids), b, src_real, enc_weights)
        if ended:
            ids = ids[:-1]
        results.append(Hypothesis(tokens=ids, score=float(final[row]), finished=ended, attention=attention))
    return results


def _lengths(generated: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """Number of tokens up to and including the first EOS (or all non-padding ones)."""
    is_eos = generated == eos_id
    any_eos = is_eos.any(dim=1)
    first_eos = is_eos.float().argmax(dim=1)
    return torch.where(any_eos, first_eos + 1, (generated != pad_id).sum(dim=1))


def _collect_attention(
    steps: list[tuple[Tensor, list[Tensor], list[Tensor]]],
    row: int,
    length: int,
    sentence: int,
    src_real: int,
    enc_weights: list[Tensor],
) -> dict[str, list[Tensor]]:
    """Walk the beam back-pointers from ``row`` and stack that hypothesis's attention."""
    self_rows: list[list[Tensor]] = []
    cross_rows: list[list[Tensor]] = []
    for t in range(length - 1, -1, -1):
        origin, self_w, cross_w = steps[t]
        row = int(origin[row])  # the row that computed step t for this hypothesis
        self_rows.append([w[row] for w in self_w])  # L x [H, t+1]
        cross_rows.append([w[row, :, :src_real] for w in cross_w])  # L x [H, S]
    self_rows.reverse()
    cross_rows.reverse()
    n_layers = len(self_rows[0]) if self_rows else 0
    decoder, cross = [], []
    for layer in range(n_layers):
        heads = self_rows[0][layer].shape[0]
        square = self_rows[0][layer].new_zeros(heads, length, length)
        for t in range(length):
            square[:, t, : t + 1] = self_rows[t][layer]
        decoder.append(square)
        cross.append(torch.stack([cross_rows[t][layer] for t in range(length)], dim=1))
    encoder = [w[sentence, :, :src_real, :src_real] for w in enc_weights]
    return {"encoder": encoder, "decoder": decoder, "cross": cross}
