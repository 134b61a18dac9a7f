"""The ONNX Runtime runtime: an export directory in, translations and attention out.

Three ONNX Runtime sessions: the encoder (run once per batch), one decoder step that takes the
KV cache in and gives it back one position longer (:class:`DecoderSteps`), and the scorer, a
teacher-forced pass over given target tokens (:meth:`OnnxTranslator.score_ids`: each token's
log-probability, every kind of attention and the ALTI+ contributions, :class:`Scored`). The search itself
(greedy and beam, length budget, GNMT length penalty, attention traced back through the beam) is
the shared loop of :mod:`stepwise.decode.search`, the same one the PyTorch path runs. This module
imports numpy, onnxruntime and sentencepiece only (no torch), so the service, the benchmarks and
the exporter's parity check all share it.

Cache layout: one keys and one values tensor per layer, ``[B*k, H, T, d_k]`` (``k`` rows per
sentence in beam search; the cross-attention keys/values and the source mask are ``[B, ...]``, one
per sentence, and the graph regroups the queries); attention outputs
stacked over layers, ``[L, B, H, T_q, T_k]``. The decoder graph ends in top-K, so each step
hands back ``[B, K]`` candidates instead of the ``[B, V]`` distribution (``K`` = the beam width,
fed as ``top_k``: a narrower TopK is cheaper), and gathers the cache rows named by
``past_order`` itself. The graphs take ``{encoder,decoder,cross}_head_mask [L, H]``
(head ablation, :mod:`stepwise.export`): fed all ones unless a ``head_mask`` is given.

Sessions share one global thread pool, so the encoder's and the decoder's pools do not fight
over the cores.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from stepwise.decode.search import Hypothesis, Progress, search
from stepwise.errors import DeviceUnavailable, ExportFormatError
from stepwise.tokenizer import Tokenizer, truncate

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
SCORER_FILE = "scorer.onnx"
TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FILE = "manifest.json"
# 5: the teacher-forced scorer graph (log-probabilities, attention, contributions); 4: cross-attention
# keys/values and source mask once per sentence, not per beam row; 3: head-mask
# inputs; 2: per-layer caches, top-K output; 1: stacked caches, full log-probs
EXPORT_FORMAT = 5
TOP_K = 16  # candidates the decoder graph returns per row: the widest beam it supports

_THREAD_POOL_LOCK = threading.Lock()
_THREAD_POOL_THREADS: int | None = None


@dataclass
class Translation:
    """Text-level result: what the service returns (before choosing attention kinds)."""

    translation: str
    source_tokens: list[str]
    target_tokens: list[str]
    attention: dict[str, np.ndarray] | None
    score: float
    timings: dict[str, float] = field(default_factory=dict)
    log_probs: list[float] | None = None  # each target token's log-probability (scored translations)
    contributions: dict[str, list[float]] | None = None  # source_share, source (:class:`Scored`)


@dataclass
class Scored:
    """One teacher-forced target: what :meth:`OnnxTranslator.score_ids` returns per sentence.

    Attributes:
        tokens: the target ids scored (the given tokens, then EOS when the target has one).
        log_probs: ``[T]`` each token's log-probability given the source and the tokens before it.
        score: their sum.
        attention: per kind ``[L, H, T_q, T_k]`` cut to the real lengths (the search's layout).
        contributions: ``[T, S + T]`` each prediction's ALTI+ contributions of the source and target
            positions (:mod:`stepwise.model.contributions`), rows summing to 1.
    """

    tokens: list[int]
    log_probs: np.ndarray
    score: float
    attention: dict[str, np.ndarray]
    contributions: np.ndarray

    def contribution_summary(self) -> dict[str, list[float]]:
        """``source_share`` (per target token: its prediction's share from the source, in [0, 1]) and
        ``source`` (per source token: its contribution averaged over the target tokens)."""
        source_length = self.contributions.shape[1] - len(self.tokens)
        from_source = self.contributions[:, :source_length]
        return {"source_share": [round(float(v), 5) for v in from_source.sum(axis=1).clip(0.0, 1.0)],
                "source": [round(float(v), 5) for v in from_source.mean(axis=0)]}


def _init_global_thread_pool(threads: int) -> None:
    """One intra-op/inter-op pool for every session of this process (ORT's global pool)."""
    global _THREAD_POOL_THREADS
    with _THREAD_POOL_LOCK:
        if _THREAD_POOL_THREADS is None:
            ort.set_global_thread_pool_sizes(threads, 1)
            _THREAD_POOL_THREADS = threads


def cache_names(layers: int) -> dict[str, list[str]]:
    """Names of the per-layer cache tensors of the graphs, by kind."""
    kinds = ("cross_keys", "cross_values", "past_keys", "past_values", "present_keys", "present_values")
    return {kind: [f"{kind}_{i}" for i in range(layers)] for kind in kinds}


def head_mask_from_pairs(pairs: dict[str, list[list[int]]], layers: dict[str, int], heads: int
                         ) -> dict[str, np.ndarray]:
    """Heads to switch off, ``{kind: [[layer, head], ...]}`` (0-based), as ``[L, H]`` masks of ones
    with zeros at those heads, for every kind in ``layers`` (a kind not named stays all ones).

    The indices are taken as checked (``stepwise.serve.options.check_request`` does it against the model).
    """
    masks = {kind: np.ones((count, heads), dtype=np.float32) for kind, count in layers.items()}
    for kind, listed in pairs.items():
        for layer, head in listed:
            masks[kind][layer, head] = 0.0
    return masks


def export_format(export_dir: str | Path) -> int | None:
    """The ``format`` of an export directory's manifest (None when there is no manifest)."""
    path = Path(export_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    return int(json.loads(path.read_text()).get("format", 1))


def session_options(*, on_cpu: bool = True, threads: int | None = None) -> ort.SessionOptions:
    """Options for every session of this process: full graph optimisation and, on the CPU, the
    one global thread pool (``threads``, else ``STEPWISE_ORT_THREADS``, else every core; the
    first call in a process sets its size)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if on_cpu:
        threads = threads or int(os.environ.get("STEPWISE_ORT_THREADS", "0")) or (os.cpu_count() or 1)
        _init_global_thread_pool(threads)
        options.use_per_session_threads = False
    return options


def available_providers(device: str = "auto") -> list[str]:
    """CUDA (then CPU) when asked or available; CPU otherwise."""
    have = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise DeviceUnavailable(f"CUDA execution provider not available (have {', '.join(have)})")
    return ["CPUExecutionProvider"]


class DecoderSteps:
    """Encoder output and KV cache of one batch; each call runs one decoder step (the ONNX
    Runtime :class:`stepwise.decode.search.Step`).

    On CPU the cache is a numpy array fed back as the next input. On CUDA the cache stays on
    the GPU: outputs are bound to device memory with IOBinding and the next step reads them
    in place; only the top-K candidates and attention cross to the host.
    """

    def __init__(self, translator: OnnxTranslator, src: np.ndarray, src_mask: np.ndarray, beam_size: int,
                 head_mask: dict[str, np.ndarray] | None = None, candidates: int | None = None) -> None:
        self.session = translator.decoder
        masks = translator.full_head_mask(head_mask)
        names = cache_names(translator.n_layers)
        self.cross_names = names["cross_keys"] + names["cross_values"]
        self.past_names = names["past_keys"] + names["past_values"]
        self.outputs = ["top_log_probs", "top_ids", *names["present_keys"], *names["present_values"],
                        "self_attention", "cross_attention"]
        *cross, self.encoder_attention = translator.encoder.run(
            [*self.cross_names, "encoder_attention"], {"src_ids": src, "src_pad_mask": src_mask,
                                                         "encoder_head_mask": masks["encoder"]})
        # the memory and mask stay one per sentence [B, ...]: the graph regroups a sentence's k
        # hypotheses' queries against it; the cache has one row per hypothesis [B*k, ...]
        self.beam_size = beam_size
        rows = src_mask.shape[0] * beam_size
        self.src_mask = src_mask
        empty_shape = (rows, translator.n_heads, 0, translator.d_k)
        self.on_device = translator.provider == "CUDAExecutionProvider"
        if self.on_device:
            self.inputs = {name: ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
                           for name, value in zip(self.cross_names, cross, strict=True)}
            empty = ort.OrtValue.ortvalue_from_shape_and_type(empty_shape, np.float32, "cuda", 0)
        else:
            self.inputs = dict(zip(self.cross_names, cross, strict=True))
            empty = np.zeros(empty_shape, dtype=np.float32)
        self.inputs.update({name: empty for name in self.past_names})
        # the same head masks every step (on CUDA placed on the device once, like the memory)
        for kind in ("decoder", "cross"):
            value = masks[kind]
            self.inputs[f"{kind}_head_mask"] = (ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0) if self.on_device
                                                else value)
        if translator.candidates_input:  # each step returns this many candidates per row
            width = np.array([candidates or beam_size], dtype=np.int64)
            self.inputs["top_k"] = ort.OrtValue.ortvalue_from_numpy(width) if self.on_device else width
        # on the CPU finished sentences leave the batch (as CTranslate2 does); on CUDA the
        # device-resident inputs keep every row
        self.can_drop_rows = not self.on_device

    def select_rows(self, positions: np.ndarray) -> None:
        """Keep only these rows' (positions in the current batch) sentences of the memory and mask.

        Sentences leave with all their ``k`` rows, so every ``k``-th position names one. The cache
        needs no copy here: ``past_order`` gathers it inside the graph.
        """
        sentences = positions[:: self.beam_size] // self.beam_size
        for name in self.cross_names:  # the head masks are per model, not per row
            self.inputs[name] = self.inputs[name][sentences]
        self.src_mask = self.src_mask[sentences]

    def __call__(
        self, tokens: np.ndarray, past_order: np.ndarray, need_attention: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One step: ``(top_log_probs [B, K], top_ids [B, K], self_attention, cross_attention)``."""
        if not self.on_device:  # self.inputs is the feed: this step's tokens and order go in, the cache comes back
            self.inputs["tokens"], self.inputs["src_pad_mask"], self.inputs["past_order"] = (
                tokens, self.src_mask, past_order)
            top_log_probs, top_ids, *present, self_w, cross_w = self.session.run(self.outputs, self.inputs)
            self.inputs.update(zip(self.past_names, present, strict=True))
            return top_log_probs, top_ids, self_w, cross_w
        binding = self.session.io_binding()
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens))
        binding.bind_cpu_input("src_pad_mask", self.src_mask)
        binding.bind_cpu_input("past_order", past_order)
        for name, value in self.inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            on_host = name.startswith("top_") or (need_attention and name.endswith("_attention"))
            binding.bind_output(name, "cpu" if on_host else "cuda", 0)
        self.session.run_with_iobinding(binding)
        top_log_probs, top_ids, *present, self_w, cross_w = binding.get_outputs()
        self.inputs.update(zip(self.past_names, present, strict=True))
        if need_attention:
            return top_log_probs.numpy(), top_ids.numpy(), self_w.numpy(), cross_w.numpy()
        return top_log_probs.numpy(), top_ids.numpy(), None, None


class OnnxTranslator:
    """Loads an export directory and translates with ONNX Runtime."""

    def __init__(self, export_dir: str | Path, *, device: str = "auto", threads: int | None = None) -> None:
        self.export_dir = Path(export_dir)
        manifest_path = self.export_dir / MANIFEST_FILE
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        found = int(self.manifest.get("format", 1))
        if found != EXPORT_FORMAT:
            raise ExportFormatError(f"{self.export_dir}: export format {found}, this stepwise reads {EXPORT_FORMAT}: "
                                    "run `stepwise export` again")
        model_cfg = self.manifest.get("config", {}).get("model", {})
        self.max_positions = int(model_cfg.get("max_positions", 512))
        self.tokenizer = Tokenizer.load(self.export_dir / TOKENIZER_FILE)
        providers = available_providers(device)
        options = session_options(on_cpu=providers[0] == "CPUExecutionProvider", threads=threads)
        self.encoder = ort.InferenceSession(str(self.export_dir / ENCODER_FILE), options, providers=providers)
        # the decoder's ``top_k`` input has a default (an initializer listed as an input, on purpose:
        # a run may override it), which ONNX Runtime warns about at every load: errors only
        options.log_severity_level = 3
        self.decoder = ort.InferenceSession(str(self.export_dir / DECODER_FILE), options, providers=providers)
        self.scorer = ort.InferenceSession(str(self.export_dir / SCORER_FILE), options, providers=providers)
        self.provider = self.decoder.get_providers()[0]
        past = [i for i in self.decoder.get_inputs() if i.name.startswith("past_keys_")]  # [B, H, T, d_k] each
        self.n_layers, self.n_heads, self.d_k = len(past), int(past[0].shape[1]), int(past[0].shape[3])
        encoder_mask = next(i for i in self.encoder.get_inputs() if i.name == "encoder_head_mask")
        self.layers = {"encoder": int(encoder_mask.shape[0]), "decoder": self.n_layers, "cross": self.n_layers}
        # the widest beam: the exported top-K (a dimension of the output, or with a ``top_k``
        # input a width fed per run, recorded in the manifest)
        width = next(o.shape[1] for o in self.decoder.get_outputs() if o.name == "top_ids")
        self.top_k = width if isinstance(width, int) else int(self.manifest.get("top_k", TOP_K))
        self.candidates_input = any(i.name == "top_k" for i in self.decoder.get_overridable_initializers())
        log.info("loaded %s on %s", self.export_dir, self.provider)

    def full_head_mask(self, head_mask: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """Every kind's ``[L, H]`` float32 mask: the ones given, all ones for the rest (no ablation)."""
        given = head_mask or {}
        masks = {}
        for kind, layers in self.layers.items():
            mask = given.get(kind)
            if mask is None:
                masks[kind] = np.ones((layers, self.n_heads), dtype=np.float32)
            else:
                masks[kind] = np.ascontiguousarray(mask, dtype=np.float32)
                if masks[kind].shape != (layers, self.n_heads):
                    raise ValueError(f"{kind} head mask has shape {masks[kind].shape}, "
                                     f"the model needs {(layers, self.n_heads)}")
        return masks

    def start(self, src: np.ndarray, src_mask: np.ndarray, *, beam_size: int = 1,
              head_mask: dict[str, np.ndarray] | None = None, candidates: int | None = None) -> DecoderSteps:
        """Encode a batch and return the step function over its KV cache (on the session's device).

        Each step returns ``candidates`` (default ``beam_size``) best next tokens per row, where the
        export takes a ``top_k`` input; an older export always returns its top-K.
        """
        return DecoderSteps(self, src, src_mask, beam_size, head_mask, candidates)

    def decode_ids(
        self, sources: list[list[int]], *, beam_size: int = 1, length_penalty: float = 0.6,
        max_length: int | None = None, return_attention: bool = False,
        head_mask: dict[str, np.ndarray] | None = None, on_step: Callable[[Progress], None] | None = None,
    ) -> list[Hypothesis]:
        """Greedy (``beam_size == 1``) or beam search over encoded sources (each ending with EOS).

        ``head_mask``: per kind (``encoder``, ``decoder``, ``cross``) an ``[L, H]`` array scaling
        each head's output (0 = head switched off); kinds left out are all ones. ``on_step``: see
        :func:`stepwise.decode.search.search`.
        """
        if not 1 <= beam_size <= self.top_k:
            raise ValueError(f"beam_size must be between 1 and {self.top_k} (the export's top-K)")
        tok = self.tokenizer
        src_len = max(len(s) for s in sources)
        src = np.full((len(sources), src_len), tok.pad_id, dtype=np.int64)
        for i, ids in enumerate(sources):
            src[i, : len(ids)] = ids
        step = self.start(src, src == tok.pad_id, beam_size=beam_size, head_mask=head_mask)
        return search(step, [len(s) for s in sources], beam_size=beam_size, length_penalty=length_penalty,
                      max_length=max_length, max_positions=self.max_positions, bos_id=tok.bos_id,
                      eos_id=tok.eos_id, pad_id=tok.pad_id, return_attention=return_attention, on_step=on_step)

    def score_ids(self, sources: list[list[int]], targets: list[list[int]], *,
                  head_mask: dict[str, np.ndarray] | None = None) -> list[Scored]:
        """Teacher-force ``targets`` on ``sources`` in one batch: the encoder once, then ``scorer.onnx``.

        Args:
            sources: source ids, each ending with EOS (:meth:`encode_text`).
            targets: the target ids to score: a translation's tokens followed by EOS (an unfinished
                hypothesis: its tokens alone). Position ``t`` is predicted from BOS and ``targets[:t]``.
            head_mask: as in :meth:`decode_ids`.

        Returns:
            One :class:`Scored` per pair, in order; the attention is the search's for the same tokens.
        """
        tok = self.tokenizer
        masks = self.full_head_mask(head_mask)
        src = np.full((len(sources), max(len(s) for s in sources)), tok.pad_id, dtype=np.int64)
        for i, ids in enumerate(sources):
            src[i, : len(ids)] = ids
        src_mask = src == tok.pad_id
        tgt = np.full((len(targets), max(1, max(len(t) for t in targets))), tok.pad_id, dtype=np.int64)
        following = tgt.copy()
        for i, ids in enumerate(targets):
            tgt[i, : len(ids)] = [tok.bos_id, *ids[:-1]][: len(ids)]
            following[i, : len(ids)] = ids
        names = cache_names(self.n_layers)
        cross_names = names["cross_keys"] + names["cross_values"]
        *cross, encoder_attention = self.encoder.run(
            [*cross_names, "encoder_attention"],
            {"src_ids": src, "src_pad_mask": src_mask, "encoder_head_mask": masks["encoder"]})
        log_probs, decoder_attention, cross_attention, rollout = self.scorer.run(
            ["log_probs", "decoder_attention", "cross_attention", "contributions"],
            {"src_pad_mask": src_mask, "tgt_ids": tgt, "next_ids": following,
             "decoder_head_mask": masks["decoder"], "cross_head_mask": masks["cross"],
             **dict(zip(cross_names, cross, strict=True))})
        width = src.shape[1]
        results = []
        for i, (source, target) in enumerate(zip(sources, targets, strict=True)):
            s, t = len(source), len(target)
            attention = {"encoder": encoder_attention[:, i, :, :s, :s], "decoder": decoder_attention[:, i, :, :t, :t],
                         "cross": cross_attention[:, i, :, :t, :s]}
            rows = rollout[i, :t]
            results.append(Scored(tokens=list(target), log_probs=log_probs[i, :t], score=float(log_probs[i, :t].sum()),
                                  attention=attention,
                                  contributions=np.concatenate([rows[:, :s], rows[:, width : width + t]], axis=1)))
        return results

    # -- text in, text out ----------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Source ids (with EOS), cut to the positional table (:func:`stepwise.tokenizer.truncate`)."""
        return truncate(self.tokenizer.encode(text), self.max_positions)

    def translate(
        self, texts: list[str], *, beam_size: int = 1, max_length: int | None = None,
        return_attention: bool = False, batch_size: int = 32, head_mask: dict[str, np.ndarray] | None = None,
        on_step: Callable[[list[int], Progress], None] | None = None, contributions: bool = False,
    ) -> list[Translation]:
        """Translate texts, batching by length; keeps the input order (``head_mask``: see :meth:`decode_ids`).

        ``contributions``: also score each batch's translations through the scorer graph
        (:meth:`score_ids`) for their :meth:`Scored.contribution_summary`.

        ``on_step(texts, progress)`` follows each batch's search (streaming): ``texts`` are the
        indices into ``texts`` of the batch's sentences, in the order ``progress`` numbers them.
        """
        sources = [self.encode_text(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(sources[i]))
        results: list[Translation | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            began = time.perf_counter()
            follow = None if on_step is None else partial(on_step, chunk)
            hyps = self.decode_ids([sources[i] for i in chunk], beam_size=beam_size, max_length=max_length,
                                   return_attention=return_attention, head_mask=head_mask, on_step=follow)
            emitted = [hyp.tokens + ([self.tokenizer.eos_id] if hyp.finished else []) for hyp in hyps]
            scored = (self.score_ids([sources[i] for i in chunk], emitted, head_mask=head_mask) if contributions
                      else [None] * len(chunk))
            elapsed_ms = (time.perf_counter() - began) * 1000
            for i, hyp, ids, pass_ in zip(chunk, hyps, emitted, scored, strict=True):
                results[i] = Translation(
                    translation=self.tokenizer.decode(hyp.tokens),
                    source_tokens=self.tokenizer.pieces(sources[i]),
                    target_tokens=self.tokenizer.pieces(ids),
                    attention=hyp.attention, score=hyp.score,
                    timings={"decode_ms": round(elapsed_ms, 3), "batch_size": len(chunk)},
                    contributions=None if pass_ is None else pass_.contribution_summary())
        return results  # type: ignore[return-value]

    def score(
        self, texts: list[str], translations: list[str], *, batch_size: int = 32,
        head_mask: dict[str, np.ndarray] | None = None,
    ) -> list[Translation]:
        """Teacher-force given translations of ``texts`` (:meth:`score_ids`), batching by length.

        Each result carries the given translation, its tokens (ending with EOS), ``log_probs`` per
        token, their sum as ``score``, every kind of attention and the contribution summary.
        """
        sources = [self.encode_text(t) for t in texts]
        targets = [self.encode_text(t) for t in translations]
        order = sorted(range(len(texts)), key=lambda i: (len(sources[i]), len(targets[i])))
        results: list[Translation | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            began = time.perf_counter()
            scored = self.score_ids([sources[i] for i in chunk], [targets[i] for i in chunk], head_mask=head_mask)
            elapsed_ms = (time.perf_counter() - began) * 1000
            for i, pass_ in zip(chunk, scored, strict=True):
                results[i] = Translation(
                    translation=translations[i], source_tokens=self.tokenizer.pieces(sources[i]),
                    target_tokens=self.tokenizer.pieces(targets[i]), attention=pass_.attention, score=pass_.score,
                    timings={"decode_ms": round(elapsed_ms, 3), "batch_size": len(chunk)},
                    log_probs=[round(float(v), 5) for v in pass_.log_probs],
                    contributions=pass_.contribution_summary())
        return results  # type: ignore[return-value]
