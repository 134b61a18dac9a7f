"""The search loop, written once over numpy arrays: greedy and beam search for every runtime.

A runtime supplies a *step* (:class:`Step`): the PyTorch model (``stepwise.decode.pytorch``) or the
ONNX Runtime decoder graph (``stepwise.decode.onnx_runtime``). Each call feeds one new token per row
and hands back that row's ``K`` best next tokens with their log-probabilities (PAD and BOS are
never among them), plus, when asked, this step's self- and cross-attention. The step keeps the
KV cache; ``past_order`` says which cache row each current row continues, so reordering the
beam and dropping finished sentences are one gather.

Beam search keeps ``k`` hypotheses per sentence in ``B * k`` rows. Each hypothesis's ``k`` best
continuations contain the sentence's ``k`` best overall, so a step ranks ``k * k`` candidates per
sentence instead of ``k * V``. A finished hypothesis stays in the beam, growing only by padding at
no cost. Each sentence has its own output budget (:func:`length_limits`), so a sentence decodes
the same alone or in any batch. At the end hypotheses are ranked with the GNMT length penalty
``score / ((5 + length) / 6) ** alpha``. Greedy search is the same loop with ``k = 1``. Where the
step allows it (``can_drop_rows``), sentences whose beams are all finished leave the batch, in
chunks, as CTranslate2 does.

When asked, every step's attention is recorded and followed back through the beam reorderings,
so each result carries its own maps in the shared layout: per kind (``encoder``, ``decoder``,
``cross``) an array ``[L, H, T_q, T_k]`` cut to the real lengths, where the target length counts
the generated tokens including the final EOS.

A caller can follow the search as it runs (``on_step``, the service's streaming): after every
step it gets a :class:`Progress`, each sentence's best hypothesis so far, ranked as the end of
the search ranks them, so the last step's best is the hypothesis returned.

This module imports numpy only: the ONNX Runtime path must not need torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# (rows decoding at this step, the row each continued, self-attention [L, n, H, T], cross [L, n, H, S])
_Trace = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass
class Hypothesis:
    """One decoded sentence.

    Attributes:
        tokens: generated token ids, without BOS and EOS.
        score: summed log-probability (length-normalised for beam search).
        finished: the hypothesis ended with EOS (rather than at its length budget).
        attention: per kind, an array ``[L, H, T_q, T_k]`` cut to the real lengths; None unless asked.
    """

    tokens: list[int]
    score: float
    finished: bool
    attention: dict[str, np.ndarray] | None = None


class Step(Protocol):
    """One runtime's decoder step over one batch (its encoder output and KV cache)."""

    can_drop_rows: bool
    """Whether :meth:`select_rows` may be called (finished sentences leave the batch)."""
    encoder_attention: np.ndarray | None
    """``[L, B, H, S, S]`` encoder self-attention of the batch (None unless asked)."""

    def __call__(
        self, tokens: np.ndarray, past_order: np.ndarray, need_attention: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Feed ``tokens [n, 1]``; row ``i`` continues cache row ``past_order[i]``.

        Returns:
            ``(top_log_probs [n, K], top_ids [n, K], self_attention [L, n, H, 1, T] or None,
            cross_attention [L, n, H, 1, S] or None)``, candidates best first.
        """
        ...

    def select_rows(self, positions: np.ndarray) -> None:
        """Keep only these rows (positions in the current batch): whole sentences, all ``k`` rows of
        each, so a step that keeps the encoder output once per sentence keeps those sentences'."""
        ...


class Progress:
    """The search after one step, for a caller following it (``search(on_step=...)``).

    Each sentence's *best hypothesis so far* is the one of its ``k`` (finished or not) that the
    search would return if it stopped now: the highest score, length-penalised as at the end. With
    greedy search it only grows; with beam search a later step may prefer a hypothesis that parts
    from it earlier. Valid only during the call (it reads the loop's arrays).
    """

    def __init__(self, step: int, tokens: np.ndarray, scores: np.ndarray, sentence_done: np.ndarray, k: int,
                 length_penalty: float, eos_id: int, pad_id: int, trace: list[_Trace],
                 source_lengths: np.ndarray) -> None:
        self.step = step
        self._generated = tokens[:, 1 : step + 2]
        self._best, self._lengths, _ = _rank(self._generated, scores, k, length_penalty, eos_id, pad_id)
        self._done = sentence_done
        self._trace = trace
        self._source_lengths = source_lengths

    def best(self, sentence: int) -> list[int]:
        """The best hypothesis's tokens so far, EOS included when it has ended."""
        row = int(self._best[sentence])
        return self._generated[row, : int(self._lengths[row])].tolist()

    def done(self, sentence: int) -> bool:
        """Whether the sentence is finished: its best hypothesis is final."""
        return bool(self._done[sentence])

    def cross_attention(self, sentence: int, start: int = 0) -> np.ndarray:
        """The best hypothesis's cross-attention rows from target position ``start`` on,
        ``[L, H, n, S]`` with ``S`` the sentence's real source length (needs ``return_attention``)."""
        if not self._trace:
            raise ValueError("cross-attention is recorded only with return_attention=True")
        row = int(self._best[sentence])
        length, real = int(self._lengths[row]), int(self._source_lengths[sentence])
        layers, _, heads, _ = self._trace[0][3].shape
        rows = np.zeros((layers, heads, max(length - start, 0), real), dtype=np.float32)
        if length > start:
            positions = _trace_back(self._trace, [row], start)[:, 0]
            for t in range(start, length):
                rows[:, :, t - start] = self._trace[t][3][:, positions[t - start], :, :real]
        return rows


def length_limits(source_lengths: np.ndarray | Sequence[int], max_length: int | None, max_positions: int) -> np.ndarray:
    """Per-sentence output budget: ``max_length`` if given, else ``2 * S + 10`` for each sentence's
    own length ``S`` (so a sentence decodes the same alone or in any batch), within the positional
    table (at most ``max_positions - 1`` tokens after BOS)."""
    lengths = np.asarray(source_lengths, dtype=np.int64)
    limit = np.full_like(lengths, max_length) if max_length is not None else 2 * lengths + 10
    return np.minimum(limit, max_positions - 1)


def search(
    step: Step,
    source_lengths: np.ndarray | Sequence[int],
    *,
    beam_size: int,
    length_penalty: float,
    max_length: int | None,
    max_positions: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    return_attention: bool = False,
    on_step: Callable[[Progress], None] | None = None,
) -> list[Hypothesis]:
    """Greedy (``beam_size == 1``) or beam search; see the module docstring.

    Args:
        step: the runtime's step over the encoded batch: ``beam_size`` rows per sentence (rows
            ``b * k ... b * k + k - 1`` are sentence ``b``), which share the sentence's memory.
        source_lengths: real (unpadded) length of each source, EOS included.
        beam_size: hypotheses kept per sentence; the step must return at least this many candidates.
        length_penalty: GNMT alpha for ranking the final hypotheses (beam search only; 0 = raw score).
        max_length: most tokens to generate; default :func:`length_limits`.
        max_positions: the model's positional table size.
        bos_id: id fed at the first step.
        eos_id: id that ends a hypothesis.
        pad_id: id a finished hypothesis grows by.
        return_attention: record attention maps of the returned hypotheses.
        on_step: called after every step with the :class:`Progress` so far (streaming); an
            exception it raises stops the search and propagates.

    Returns:
        The best :class:`Hypothesis` per sentence, in input order.
    """
    source_lengths = np.asarray(source_lengths, dtype=np.int64)
    batch, k = len(source_lengths), beam_size
    rows = batch * k
    row_limit = np.repeat(length_limits(source_lengths, max_length, max_positions), k)
    max_steps = int(row_limit.max())
    # the whole batch's hypotheses, written back from the rows still decoding when some leave,
    # when a caller follows the search, and at the end
    tokens = np.full((rows, max_steps + 1), pad_id, dtype=np.int64)
    tokens[:, 0] = bos_id
    scores = np.zeros((batch, k), dtype=np.float32)
    scores[:, 1:] = -np.inf  # all beams start identical: only the first one expands at the first step
    scores = scores.reshape(rows)
    finished = np.zeros(rows, dtype=bool)
    sentence_done = np.zeros(batch, dtype=bool)
    trace: list[_Trace] = []
    # the rows still decoding (every beam of unfinished sentences), each array indexed by position
    # in the step's current batch: their global row, history, score, finished flag and budget
    active = np.arange(rows, dtype=np.int64)
    history, score, done, limit = tokens.copy(), scores.copy(), finished.copy(), row_limit
    positions = np.arange(rows, dtype=np.int64)
    past_order = positions  # the cache row each row continues
    first_of_sentence = np.arange(0, rows, k)  # row offset of each sentence's beams
    any_done = False  # some row decoding has finished (it grows by padding from then on)

    for t in range(max_steps):
        top_log_probs, top_ids, self_w, cross_w = step(history[:, t : t + 1], past_order, return_attention)
        n = len(active)
        if k == 1:
            next_tokens, gains = top_ids[:, 0], top_log_probs[:, 0]
            if any_done:  # a finished hypothesis grows by padding, at no cost
                next_tokens = np.where(done, pad_id, next_tokens)
                gains = np.where(done, np.float32(0.0), gains)
            score += gains
            origin, past_order = active, positions
        else:
            gains, ids = top_log_probs[:, :k], top_ids[:, :k]
            if any_done:  # a finished hypothesis has one continuation: padding, at no cost
                gains, ids = gains.copy(), ids.copy()
                gains[done] = -np.inf
                gains[done, 0] = 0.0
                ids[done] = pad_id
            # each sentence's k hypotheses × their k best tokens: the k best of those k*k
            candidates = (score[:, None] + gains).reshape(n // k, k * k)
            top_index = np.argsort(-candidates, axis=-1, kind="stable")[:, :k]
            chosen = (first_of_sentence[: n // k, None] * k + top_index).reshape(n)  # into candidates, flat
            past_order = chosen // k  # the row each new hypothesis continues
            next_tokens = ids.reshape(-1)[chosen]
            score = candidates.reshape(-1)[chosen]
            history[:, : t + 1] = history[past_order, : t + 1]
            done = done[past_order]
            origin = active[past_order]
        if return_attention:
            trace.append((active, origin, self_w[:, :, :, 0], cross_w[:, :, :, 0]))
        history[:, t + 1] = next_tokens
        done |= (next_tokens == eos_id) | (t + 1 >= limit)
        finished_rows = int(np.count_nonzero(done))
        any_done, last = finished_rows > 0, finished_rows == n
        # which sentences have all their beams finished: needed only when some sentence can have
        # (one count per step instead of reductions over the rows: the per-step Python is part of
        # a small model's token time at batch 1)
        if on_step is None and not last and finished_rows < k:
            continue
        beams_done = done if k == 1 else done.reshape(-1, k).all(axis=1)
        if on_step is not None or last:
            tokens[active, : t + 2] = history[:, : t + 2]
            scores[active], finished[active] = score, done
            sentence_done[active[::k] // k] = beams_done
        if on_step is not None:
            on_step(Progress(t, tokens, scores, sentence_done, k, length_penalty, eos_id, pad_id, trace,
                             source_lengths))
        if last:
            break
        if step.can_drop_rows and beams_done.any():
            keep = (np.flatnonzero(~beams_done)[:, None] * k + np.arange(k)).reshape(-1)
            # drop in chunks (each drop copies the memory): once a quarter of the rows are done
            if len(keep) <= 0.75 * n:
                gone = np.repeat(beams_done, k)
                tokens[active[gone], : t + 2] = history[gone, : t + 2]
                scores[active[gone]], finished[active[gone]] = score[gone], True
                sentence_done[active[gone][::k] // k] = True
                step.select_rows(keep)
                active, history, score, done, limit = active[keep], history[keep], score[keep], done[keep], limit[keep]
                past_order, positions = past_order[keep], positions[: len(keep)]

    generated = tokens[:, 1:]
    best, lengths, final = _rank(generated, scores, k, length_penalty, eos_id, pad_id)
    computed_at = _trace_back(trace, best) if return_attention else None

    results = []
    for b in range(batch):
        row = int(best[b])
        ids = generated[row, : int(lengths[row])].tolist()
        ended = bool(ids) and ids[-1] == eos_id
        attention = None
        if return_attention:
            real = int(source_lengths[b])
            encoder = step.encoder_attention[:, b, :, :real, :real]  # type: ignore[index]
            attention = _collect_attention(trace, computed_at[:, b], len(ids), real, encoder)  # type: ignore[index]
        results.append(Hypothesis(tokens=ids[:-1] if ended else ids, score=float(final[row]), finished=ended,
                                  attention=attention))
    return results


def hypothesis_lengths(generated: np.ndarray, eos_id: int, pad_id: int) -> np.ndarray:
    """Tokens per row up to and including the first EOS (or all non-padding ones)."""
    is_eos = generated == eos_id
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, (generated != pad_id).sum(axis=1))


def _rank(generated: np.ndarray, scores: np.ndarray, k: int, length_penalty: float, eos_id: int,
          pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sentence's best row, every row's length and final score (GNMT-penalised for beams)."""
    lengths = hypothesis_lengths(generated, eos_id, pad_id)
    final = scores.copy()
    if k > 1 and length_penalty > 0:
        final = final / ((5.0 + lengths) / 6.0) ** length_penalty
    best = np.arange(len(scores) // k) * k + final.reshape(-1, k).argmax(axis=-1)
    return best, lengths, final


def _trace_back(trace: list[_Trace], rows: np.ndarray | Sequence[int], start: int = 0) -> np.ndarray:
    """Where the hypotheses now in ``rows`` were computed at steps ``start`` to the last one.

    Follows the beam's back-pointers from the last step down (a hypothesis, finished or not, may
    move to another row at any later step; the rows of a sentence that left the batch no longer
    move). Returns ``[steps, len(rows)]`` positions into each step's active rows (meaningless at
    steps after a hypothesis ended).
    """
    rows = np.array(rows, dtype=np.int64)
    positions = np.zeros((len(trace) - start, len(rows)), dtype=np.int64)
    seen: tuple[np.ndarray, np.ndarray] | None = None  # the last (active, positions), reused while unchanged
    for t in range(len(trace) - 1, start - 1, -1):
        active, origins = trace[t][0], trace[t][1]
        if origins is not active:  # (greedy search: every row continues itself, nothing moves)
            at = np.minimum(np.searchsorted(active, rows), len(active) - 1)
            rows = np.where(active[at] == rows, origins[at], rows)  # the row that computed step t
            seen = None
        if seen is None or seen[0] is not active:
            seen = (active, np.searchsorted(active, rows))
        positions[t - start] = seen[1]
    return positions


def _collect_attention(trace: list[_Trace], positions: np.ndarray, length: int, src_real: int,
                       encoder: np.ndarray) -> dict[str, np.ndarray]:
    """Stack one hypothesis's attention, computed at ``positions`` (:func:`_trace_back`) of each step."""
    layers, _, heads, _ = trace[0][3].shape
    decoder = np.zeros((layers, heads, length, length), dtype=np.float32)
    cross = np.zeros((layers, heads, length, src_real), dtype=np.float32)
    for t in range(length):
        _, _, self_w, cross_w = trace[t]
        at = int(positions[t])
        decoder[:, :, t, : t + 1] = self_w[:, at]
        cross[:, :, t] = cross_w[:, at, :, :src_real]
    return {"encoder": np.ascontiguousarray(encoder, dtype=np.float32), "decoder": decoder, "cross": cross}
