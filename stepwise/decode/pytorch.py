"""The PyTorch decoder step, and greedy and beam search through the shared loop.

The loop itself (length budget, beam ranking, finished hypotheses, GNMT length penalty,
attention traced back through the beam) is :mod:`stepwise.decode.search`, written once for every
runtime. This module supplies its PyTorch step (:class:`TorchSteps`): the model encodes the
batch once, projects the encoder memory into every decoder layer's cross-attention keys and
values once, and each step then runs one new position per layer against the self-attention KV
cache, returning the top-K next tokens (PAD and BOS never generated) and, when asked, this
step's attention.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from stepwise.decode.search import Hypothesis, length_limits, search
from stepwise.model.transformer import HeadMask, Transformer

__all__ = ["Hypothesis", "TorchSteps", "beam_search", "decode", "greedy_decode", "length_limits"]


class TorchSteps:
    """Encoder output and KV cache of one batch for :func:`stepwise.decode.search.search`; each call runs
    one decoder step of ``model`` (see :class:`stepwise.decode.search.Step`).

    The cross-attention keys/values and the source mask are kept once per sentence (``[B, ...]``)
    while the cache has a row per hypothesis (``[B*k, ...]``). Sentences can be dropped:
    :meth:`select_rows` indexes the memory and the mask by sentence, and ``past_order`` gathers the
    self-attention cache. Use it under ``torch.no_grad()`` (as :func:`greedy_decode` and
    :func:`beam_search` do).
    """

    can_drop_rows = True

    def __init__(self, model: Transformer, src_ids: Tensor, src_pad_mask: Tensor | None, beam_size: int,
                 need_attention: bool, head_mask: HeadMask | None = None) -> None:
        cfg = model.config
        self.model = model
        self.head_mask = head_mask  # every step runs the same ablated model
        self.top_k = beam_size
        self.device = src_ids.device
        memory, enc_weights = model.encode(src_ids, src_pad_mask, need_weights=need_attention,
                                           head_mask=head_mask)
        self.encoder_attention = _to_numpy(enc_weights) if need_attention else None
        # one copy per sentence: its k hypotheses share it (cross-attention regroups their queries)
        self.beam_size = beam_size
        self.cross_kv = model.cross_key_values(memory)
        self.src_pad_mask = src_pad_mask
        self.past: list[tuple[Tensor, Tensor]] | None = None
        # added to the log-probabilities: PAD and BOS are never generated
        self.never = torch.zeros(cfg.vocab_size, device=self.device)
        self.never[[cfg.pad_id, cfg.bos_id]] = float("-inf")

    def select_rows(self, positions: np.ndarray) -> None:
        """Keep only these rows' sentences of the memory and mask (``past_order`` gathers the cache).

        Sentences leave with all their ``k`` rows, so every ``k``-th position names one.
        """
        index = torch.from_numpy(positions[:: self.beam_size] // self.beam_size).to(self.device)
        self.cross_kv = [(key[index], value[index]) for key, value in self.cross_kv]
        if self.src_pad_mask is not None:
            self.src_pad_mask = self.src_pad_mask[index]

    def __call__(
        self, tokens: np.ndarray, past_order: np.ndarray, need_attention: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One step: ``(top_log_probs [n, K], top_ids [n, K], self_attention, cross_attention)``."""
        past = self.past
        if past is not None and not (len(past_order) == past[0][0].shape[0]
                                     and np.array_equal(past_order, np.arange(len(past_order)))):
            index = torch.from_numpy(past_order).to(self.device)
            past = [(key.index_select(0, index), value.index_select(0, index)) for key, value in past]
        logits, self.past, self_w, cross_w = self.model.decode(
            torch.from_numpy(tokens).to(self.device), self.cross_kv, src_pad_mask=self.src_pad_mask, past=past,
            need_weights=need_attention, head_mask=self.head_mask)
        log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1) + self.never
        top_log_probs, top_ids = log_probs.topk(self.top_k, dim=-1)
        if not need_attention:
            return top_log_probs.cpu().numpy(), top_ids.cpu().numpy(), None, None
        return top_log_probs.cpu().numpy(), top_ids.cpu().numpy(), _to_numpy(self_w), _to_numpy(cross_w)


def _to_numpy(weights: list[Tensor]) -> np.ndarray:
    """Per-layer ``[B, H, T_q, T_k]`` tensors as one float32 array ``[L, B, H, T_q, T_k]``."""
    return torch.stack(weights).float().cpu().numpy()


@torch.no_grad()
def greedy_decode(
    model: Transformer,
    src_ids: Tensor,
    src_pad_mask: Tensor | None = None,
    *,
    max_length: int | None = None,
    return_attention: bool = False,
    head_mask: HeadMask | None = None,
) -> list[Hypothesis]:
    """Pick the most probable token at every step.

    Args:
        model: the transformer (put in eval mode by the caller).
        src_ids: ``[B, S]`` source ids (ending with EOS).
        src_pad_mask: ``[B, S]`` True at padding.
        max_length: most tokens to generate; default :func:`length_limits`.
        return_attention: record attention maps for every step.
        head_mask: per kind ``[layers, heads]`` head-output factors (ablation; see ``Transformer``).

    Returns:
        One :class:`Hypothesis` per source sentence.
    """
    return _search(model, src_ids, src_pad_mask, beam_size=1, length_penalty=0.0, max_length=max_length,
                   return_attention=return_attention, head_mask=head_mask)


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
    head_mask: HeadMask | None = None,
) -> list[Hypothesis]:
    """Keep the ``beam_size`` best hypotheses per sentence; see :mod:`stepwise.decode.search`.

    Args:
        model: the transformer (eval mode).
        src_ids: ``[B, S]`` source ids.
        src_pad_mask: ``[B, S]`` True at padding.
        beam_size: hypotheses kept per sentence (1 behaves like greedy search).
        length_penalty: GNMT alpha; 0 ranks by raw log-probability.
        max_length: most tokens to generate.
        return_attention: record attention maps of the returned hypotheses.
        head_mask: per kind ``[layers, heads]`` head-output factors (ablation).

    Returns:
        The best :class:`Hypothesis` per source sentence.
    """
    return _search(model, src_ids, src_pad_mask, beam_size=beam_size, length_penalty=length_penalty,
                   max_length=max_length, return_attention=return_attention, head_mask=head_mask)


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
    head_mask: HeadMask | None = None,
) -> list[Hypothesis]:
    cfg = model.config
    if not 1 <= beam_size <= cfg.vocab_size:
        raise ValueError(f"beam_size must be between 1 and the vocabulary size {cfg.vocab_size}")
    batch, src_len = src_ids.shape
    lengths = [src_len] * batch if src_pad_mask is None else (~src_pad_mask).sum(1).tolist()
    step = TorchSteps(model, src_ids, src_pad_mask, beam_size, return_attention, head_mask)
    return search(step, lengths, beam_size=beam_size, length_penalty=length_penalty, max_length=max_length,
                  max_positions=cfg.max_positions, bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id,
                  return_attention=return_attention)
