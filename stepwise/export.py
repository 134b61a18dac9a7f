"""Compile a checkpoint to ONNX: an encoder graph, a one-step decoder graph with a KV cache, and a
teacher-forced scorer graph.

``encoder.onnx``
    in: ``src_ids [B, S]`` (int64), ``src_pad_mask [B, S]`` (bool, True at padding),
    ``encoder_head_mask [L_enc, H]`` (float32: each self-attention head's output is scaled by it
    before ``W^O``; all ones = no ablation)
    out: ``cross_keys_{i}``/``cross_values_{i} [B, H, S, d_k]`` for each decoder layer ``i``
    (its cross-attention keys and values, projected once), ``encoder_attention [L, B, H, S, S]``
``decoder.onnx`` (one step over ``B`` sentences of ``k`` rows each: beam search's hypotheses,
``k = 1`` for greedy; rows ``b*k ... b*k+k-1`` are sentence ``b``)
    in: ``tokens [B*k, 1]``, ``src_pad_mask [B, S]``, ``past_order [B*k]`` (which cache row each row
    continues: beam search reorders hypotheses and finished sentences leave the batch, and doing
    it inside the graph keeps the cache on the device), ``decoder_head_mask``/``cross_head_mask
    [L_dec, H]`` (head ablation of the self- and cross-attention heads), and per layer ``cross_keys_{i}``,
    ``cross_values_{i} [B, H, S, d_k]`` (one per sentence: its ``k`` rows' queries are regrouped
    against it, ``k`` = rows / sentences; format 4), ``past_keys_{i}``/``past_values_{i} [B*k, H, T, d_k]``
    (T may be 0; the position is T); optionally ``top_k [1]`` (int64, default the exported K = 16: how many
    candidates to return, :func:`candidates_as_input`)
    out: ``top_log_probs``/``top_ids [B*k, K]`` (the K best next tokens, best first, PAD and BOS
    excluded: beam search of width k <= K needs no more, so the V-sized distribution never leaves
    the graph), ``present_keys_{i}``/``present_values_{i} [B*k, H, T+1, d_k]``,
    ``self_attention [L, B*k, H, 1, T+1]``, ``cross_attention [L, B*k, H, 1, S]``

``scorer.onnx`` (format 5: the teacher-forced pass, :class:`ScorerGraph`; the encoder runs once
and its outputs feed it)
    in: ``src_pad_mask [B, S]``, ``tgt_ids [B, T]`` (BOS + the given tokens, padded), ``next_ids
    [B, T]`` (the given tokens + EOS, padded), ``decoder_head_mask``/``cross_head_mask [L_dec, H]``,
    per layer ``cross_keys_{i}``/``cross_values_{i} [B, H, S, d_k]``
    out: ``log_probs [B, T]`` (each given token's log-probability, PAD and BOS at -inf as the step
    graph ranks), ``decoder_attention [L, B, H, T, T]``, ``cross_attention [L, B, H, T, S]``,
    ``contributions [B, T, S + T]`` (ALTI+, :mod:`stepwise.model.contributions`)

The head masks (format 3) cost one multiply per attention sub-layer; ``python -m bench headmask``
times the decoder step against a graph without them.

Per-layer cache tensors (not one stacked tensor) let ONNX Runtime read each layer's keys and
values where they are: stacking and unstacking copied the whole cache and memory every step.
Batch, source and cache lengths are dynamic. Before anything is final the export is checked
against PyTorch on held-out sentences (same greedy and beam tokens, log-probabilities and
attention within stated tolerances); it is written to a temporary folder and renamed into
place only when the check passes, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from stepwise.decode.onnx_runtime import (
    DECODER_FILE,
    ENCODER_FILE,
    EXPORT_FORMAT,
    MANIFEST_FILE,
    SCORER_FILE,
    TOKENIZER_FILE,
    TOP_K,
    OnnxTranslator,
    Scored,
    cache_names,
)
from stepwise.decode.pytorch import decode
from stepwise.decode.search import Hypothesis
from stepwise.errors import CorpusError, ExportError, ModelNotFound
from stepwise.model import Transformer, contributions
from stepwise.model.attention import attention_bias
from stepwise.train.checkpoint import Checkpoint
from stepwise.train.data import load_split

log = logging.getLogger(__name__)

OPSET = 17
LOG_PROB_TOLERANCE = 1e-3
ATTENTION_TOLERANCE = 1e-4
PARITY_SENTENCES = 8
FALLBACK_SENTENCES = [  # used when the checkpoint's corpus is not installed
    "Im Anfang war das Wort.",
    "Und Gott sprach: Es werde Licht!",
    "Der Herr ist mein Hirte, mir wird nichts mangeln.",
    "Selig sind die Friedfertigen.",
]


class EncoderGraph(nn.Module):
    """What ``encoder.onnx`` computes (``head_mask_input=False``: the format-2 graph, for ``bench``)."""

    def __init__(self, model: Transformer, head_mask_input: bool = True) -> None:
        super().__init__()
        self.model = model
        self.head_mask_input = head_mask_input

    def forward(self, src_ids: Tensor, src_pad_mask: Tensor, *head_mask: Tensor) -> tuple[Tensor, ...]:
        masks = {"encoder": head_mask[0]} if self.head_mask_input else None
        memory, weights = self.model.encode(src_ids, src_pad_mask, need_weights=True, head_mask=masks)
        kv = self.model.cross_key_values(memory)
        return (*[k for k, _ in kv], *[v for _, v in kv], torch.stack(weights))


class DecoderStepGraph(nn.Module):
    """What ``decoder.onnx`` computes: one step of incremental decoding, ending in top-K.

    With ``head_mask_input`` (the default) the inputs after ``past_order`` start with
    ``decoder_head_mask`` and ``cross_head_mask``; without, it is the format-2 graph (``bench``).
    """

    def __init__(self, model: Transformer, top_k: int = TOP_K, head_mask_input: bool = True) -> None:
        super().__init__()
        self.model = model
        self.head_mask_input = head_mask_input
        self.top_k = min(top_k, model.config.vocab_size)
        # added to the log-probabilities: PAD and BOS are never generated (as in decoding.decode)
        never = torch.zeros(model.config.vocab_size)
        never[[model.config.pad_id, model.config.bos_id]] = float("-inf")
        self.register_buffer("never", never, persistent=False)

    def forward(self, tokens: Tensor, src_pad_mask: Tensor, past_order: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        masks, caches = ({"decoder": inputs[0], "cross": inputs[1]}, inputs[2:]) if self.head_mask_input else (
            None, inputs)
        layers = len(self.model.decoder_layers)
        cross_k, cross_v, past_k, past_v = (caches[i * layers : (i + 1) * layers] for i in range(4))
        cross = list(zip(cross_k, cross_v, strict=True))
        past = [(k.index_select(0, past_order), v.index_select(0, past_order)) for k, v in zip(past_k, past_v,
                                                                                               strict=True)]
        logits, present, self_w, cross_w = self.model.decode(tokens, cross, src_pad_mask=src_pad_mask, past=past,
                                                             need_weights=True, head_mask=masks)
        # one position per step: [B, 1, V] -> [B, V] by a reshape to a constant shape, which costs
        # nothing (logits[:, -1] was a Gather copying [B, V] every step, 1% of a 128-row step)
        logits = logits.reshape(-1, self.never.shape[0])
        log_probs = torch.log_softmax(logits.float(), dim=-1) + self.never
        top_log_probs, top_ids = torch.topk(log_probs, self.top_k, dim=-1)
        return (top_log_probs, top_ids, *[k for k, _ in present], *[v for _, v in present], torch.stack(self_w),
                torch.stack(cross_w))


class ScorerGraph(nn.Module):
    """What ``scorer.onnx`` computes: a teacher-forced decoder pass over given target tokens.

    The decoder layers run as :class:`stepwise.model.layers.DecoderLayer` runs them (its own
    sub-modules, the whole target at once under the causal mask), keeping what
    :mod:`stepwise.model.contributions` needs of each attention sub-layer: its residual input, its
    values and its weights. Row ``t`` of every output belongs to input position ``t``, the step
    that predicts ``next_ids[:, t]``; rows past a sentence's length are padding (the causal mask
    keeps them out of the real rows).

    Inputs: ``src_pad_mask [B, S]``, ``tgt_ids [B, T]`` (BOS + given tokens), ``next_ids [B, T]``
    (given tokens + EOS), ``decoder_head_mask``/``cross_head_mask [L, H]``, per layer
    ``cross_keys_{i}``/``cross_values_{i} [B, H, S, d_k]`` (the encoder graph's outputs).
    Outputs: ``log_probs [B, T]`` (each next token's log-probability, PAD and BOS at -inf as the
    step graph ranks them), ``decoder_attention [L, B, H, T, T]``, ``cross_attention [L, B, H, T, S]``,
    ``contributions [B, T, S + T]`` (the rolled-out ALTI+ contributions of the ``S`` source and ``T``
    target positions to each position's prediction).
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        never = torch.zeros(model.config.vocab_size)
        never[[model.config.pad_id, model.config.bos_id]] = float("-inf")
        self.register_buffer("never", never, persistent=False)

    def forward(self, src_pad_mask: Tensor, tgt_ids: Tensor, next_ids: Tensor, decoder_head_mask: Tensor,
                cross_head_mask: Tensor, *cross: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        layers = len(model.decoder_layers)
        dtype = model.tgt_embed.weight.dtype
        length = tgt_ids.shape[1]
        self_bias = attention_bias(causal=True, query_length=length, key_length=length, dtype=dtype,
                                   device=tgt_ids.device)
        cross_bias = attention_bias(key_padding_mask=src_pad_mask, dtype=dtype)
        x = model._embed(model.tgt_embed, tgt_ids)
        rollout = contributions.start(src_pad_mask, tgt_ids)
        self_weights, cross_weights = [], []
        for i, layer in enumerate(model.decoder_layers):
            self_mask, cross_mask = decoder_head_mask[i].reshape(1, -1, 1, 1), cross_head_mask[i].reshape(1, -1, 1, 1)
            seen: dict[str, Tensor] = {}

            def self_attention(h: Tensor, layer: nn.Module = layer, mask: Tensor = self_mask,
                               seen: dict[str, Tensor] = seen) -> Tensor:
                key, value = layer.self_attn.project_key_value(h)
                out, seen["weights"] = layer.self_attn.attend(h, key, value, bias=self_bias, need_weights=True,
                                                              head_mask=mask)
                seen["values"] = value
                return out

            def cross_attention(h: Tensor, layer: nn.Module = layer, mask: Tensor = cross_mask,
                                seen: dict[str, Tensor] = seen, kv: tuple[Tensor, Tensor] = (cross[i],
                                                                                             cross[layers + i])
                                ) -> Tensor:
                out, seen["cross_weights"] = layer.cross_attn.attend(h, *kv, bias=cross_bias, need_weights=True,
                                                                     head_mask=mask)
                return out

            residual = x
            x = layer.self_block(x, self_attention)
            rollout = contributions.mix_self(rollout, *self._shares(layer.self_attn, layer.self_block, residual,
                                                                    seen["weights"], seen["values"], self_mask))
            residual = x
            x = layer.cross_block(x, cross_attention)
            rollout = contributions.mix_cross(rollout, *self._shares(
                layer.cross_attn, layer.cross_block, residual, seen["cross_weights"], cross[layers + i], cross_mask))
            x = layer.ff_block(x, layer.feed_forward)
            self_weights.append(seen["weights"])
            cross_weights.append(seen["cross_weights"])
        logits = model.output_projection(model.decoder_norm(x))
        log_probs = torch.log_softmax(logits.float(), dim=-1) + self.never
        token_log_probs = log_probs.gather(-1, next_ids[..., None]).squeeze(-1)
        return token_log_probs, torch.stack(self_weights), torch.stack(cross_weights), rollout

    @staticmethod
    def _shares(attention: nn.Module, block: nn.Module, residual: Tensor, weights: Tensor, values: Tensor,
                head_mask: Tensor) -> tuple[Tensor, Tensor]:
        """One attention sub-layer's contribution shares (:func:`stepwise.model.contributions.shares`)."""
        terms = contributions.decompose(weights, contributions.head_values(values, attention.out_proj), head_mask)
        return contributions.shares(residual, terms, attention.out_proj.bias, None if block.pre_norm else block.norm)


def fuse_shared_input_projections(model: onnx.ModelProto) -> int:
    """Merge linear projections that read the same tensor into one MatMul + Add + Split.

    The paper's Q, K and V projections (Eq. 1 of section 3.2.2) all read the layer input, and
    every decoder layer's cross-attention K and V read the encoder output; one wide matrix
    product instead of three (or 2·L) narrow ones saves ONNX Runtime a parallel section and a
    bias add per projection, which is most of a small model's per-step cost at batch 1. The
    arithmetic is unchanged: the parity check compares the result with PyTorch.

    Returns the number of groups fused (``model`` is changed in place).
    """
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    groups: dict[str, list[tuple[onnx.NodeProto, onnx.NodeProto, str]]] = defaultdict(list)
    for node in graph.node:  # x @ W (W a 2-D initializer) followed only by + b (b a 1-D initializer)
        if node.op_type != "MatMul" or len(weights.get(node.input[1], onnx.TensorProto()).dims) != 2:
            continue
        users = consumers[node.output[0]]
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        bias = next(name for name in users[0].input if name != node.output[0])
        if len(weights.get(bias, onnx.TensorProto()).dims) == 1:
            groups[node.input[0]].append((node, users[0], bias))
    fused = 0
    for source, members in groups.items():
        if len(members) < 2:
            continue
        matrices = [numpy_helper.to_array(weights[matmul.input[1]]) for matmul, _, _ in members]
        prefix = f"fused_projection_{fused}"
        new_weights = [
            numpy_helper.from_array(np.concatenate(matrices, axis=1), f"{prefix}.weight"),
            numpy_helper.from_array(np.concatenate([numpy_helper.to_array(weights[b]) for _, _, b in members]),
                                    f"{prefix}.bias"),
            numpy_helper.from_array(np.array([m.shape[1] for m in matrices], dtype=np.int64), f"{prefix}.sizes"),
        ]
        graph.initializer.extend(new_weights)
        replacement = [
            helper.make_node("MatMul", [source, new_weights[0].name], [f"{prefix}/mm"], name=f"{prefix}/MatMul"),
            helper.make_node("Add", [f"{prefix}/mm", new_weights[1].name], [f"{prefix}/add"], name=f"{prefix}/Add"),
            helper.make_node("Split", [f"{prefix}/add", new_weights[2].name], [add.output[0] for _, add, _ in members],
                             axis=-1, name=f"{prefix}/Split"),
        ]
        dropped = {node.name for matmul, add, _ in members for node in (matmul, add)}
        nodes = list(graph.node)
        first = next(i for i, node in enumerate(nodes) if node.name in dropped)  # keeps topological order
        kept = [node for node in nodes[:first] if node.name not in dropped]
        kept += replacement + [node for node in nodes[first:] if node.name not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
        fused += 1
    used = {name for node in graph.node for name in node.input}
    kept_weights = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_weights)
    return fused


def candidates_as_input(model: onnx.ModelProto) -> None:
    """Make the decoder graph's top-K width an input, ``top_k [1]`` (int64), that defaults to the
    exported width (an initializer of the same name) and may be set lower per run.

    Beam search of width k needs only k candidates per row, and ONNX Runtime's TopK over the
    vocabulary costs about twice as much for 16 as for 4 (5% of a 128-row step). A caller that
    feeds nothing gets the exported width, as before. ``model`` is changed in place.
    """
    graph = model.graph
    topk = next(node for node in graph.node if node.op_type == "TopK")
    source = topk.input[1]
    constant = next(node for node in graph.node if source in node.output)  # torch exports K as a Constant
    width = numpy_helper.to_array(constant.attribute[0].t).reshape(1).astype(np.int64)
    graph.node.remove(constant)
    topk.input[1] = "top_k"
    graph.initializer.append(numpy_helper.from_array(width, "top_k"))
    graph.input.append(helper.make_tensor_value_info("top_k", onnx.TensorProto.INT64, [1]))
    for output in graph.output:
        if output.name in ("top_log_probs", "top_ids"):
            output.type.tensor_type.shape.dim[1].dim_param = "candidates"


def _export_graphs(model: Transformer, folder: Path, opset: int, *, head_mask_inputs: bool = True) -> None:
    """Write ``encoder.onnx``, ``decoder.onnx`` and ``scorer.onnx`` (without the head-mask inputs:
    the format-2 encoder and decoder only, for ``bench``)."""
    cfg = model.config
    heads, d_k = cfg.n_heads, cfg.d_model // cfg.n_heads
    names = cache_names(cfg.n_decoder_layers)
    src = torch.randint(4, cfg.vocab_size, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    batch_source = {0: "batch", 2: "source"}
    encoder_mask = [torch.ones(cfg.n_encoder_layers, heads)] if head_mask_inputs else []
    decoder_masks = [torch.ones(cfg.n_decoder_layers, heads)] * 2 if head_mask_inputs else []
    encoder_mask_names = ["encoder_head_mask"] if head_mask_inputs else []
    decoder_mask_names = ["decoder_head_mask", "cross_head_mask"] if head_mask_inputs else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python ints from shapes
        torch.onnx.export(
            EncoderGraph(model, head_mask_inputs), (src, mask, *encoder_mask), str(folder / ENCODER_FILE),
            dynamo=False, opset_version=opset, input_names=["src_ids", "src_pad_mask", *encoder_mask_names],
            output_names=[*names["cross_keys"], *names["cross_values"], "encoder_attention"],
            dynamic_axes={"src_ids": {0: "batch", 1: "source"}, "src_pad_mask": {0: "batch", 1: "source"},
                          **{n: batch_source for n in names["cross_keys"] + names["cross_values"]},
                          "encoder_attention": {1: "batch", 3: "source", 4: "source"}})
        # traced with 2 sentences of 2 rows each, so cross-attention takes its regrouping path
        # (group_queries), which with k = 1 (greedy) is the same graph
        cross = [torch.zeros(2, heads, 5, d_k)] * (2 * cfg.n_decoder_layers)
        past = [torch.zeros(4, heads, 3, d_k)] * (2 * cfg.n_decoder_layers)
        cache_in = names["cross_keys"] + names["cross_values"] + names["past_keys"] + names["past_values"]
        cache_out = names["present_keys"] + names["present_values"]
        sentence_source = {0: "sentences", 1: "source"}
        torch.onnx.export(
            DecoderStepGraph(model, head_mask_input=head_mask_inputs),
            (torch.full((4, 1), cfg.bos_id), mask, torch.tensor([1, 0, 3, 2]), *decoder_masks, *cross, *past),
            str(folder / DECODER_FILE), dynamo=False, opset_version=opset,
            input_names=["tokens", "src_pad_mask", "past_order", *decoder_mask_names, *cache_in],
            output_names=["top_log_probs", "top_ids", *cache_out, "self_attention", "cross_attention"],
            dynamic_axes={"tokens": {0: "rows"}, "src_pad_mask": sentence_source, "past_order": {0: "rows"},
                          **{n: {0: "sentences", 2: "source"} for n in names["cross_keys"] + names["cross_values"]},
                          **{n: {0: "rows", 2: "past"} for n in names["past_keys"] + names["past_values"]},
                          **{n: {0: "rows", 2: "length"} for n in cache_out},
                          "top_log_probs": {0: "rows"}, "top_ids": {0: "rows"},
                          "self_attention": {1: "rows", 4: "length"}, "cross_attention": {1: "rows", 4: "source"}})
        graphs = [ENCODER_FILE, DECODER_FILE]
        if head_mask_inputs:  # the teacher-forced pass (format 5), traced with 2 sentences of 4 positions
            target = torch.randint(4, cfg.vocab_size, (2, 4))
            torch.onnx.export(
                ScorerGraph(model), (mask, target, target.roll(-1, dims=1), *decoder_masks, *cross),
                str(folder / SCORER_FILE), dynamo=False, opset_version=opset,
                input_names=["src_pad_mask", "tgt_ids", "next_ids", *decoder_mask_names,
                             *names["cross_keys"], *names["cross_values"]],
                output_names=["log_probs", "decoder_attention", "cross_attention", "contributions"],
                dynamic_axes={"src_pad_mask": {0: "batch", 1: "source"}, "tgt_ids": {0: "batch", 1: "target"},
                              "next_ids": {0: "batch", 1: "target"},
                              **{n: batch_source for n in names["cross_keys"] + names["cross_values"]},
                              "log_probs": {0: "batch", 1: "target"},
                              "decoder_attention": {1: "batch", 3: "target", 4: "target"},
                              "cross_attention": {1: "batch", 3: "target", 4: "source"},
                              "contributions": {0: "batch", 1: "target", 2: "positions"}})
            graphs.append(SCORER_FILE)
    model.eval()  # the TorchScript exporter leaves modules in training mode (dropout on)
    for name in graphs:
        graph = onnx.load(str(folder / name))
        log.debug("%s: fused %d groups of projections", name, fuse_shared_input_projections(graph))
        if name == DECODER_FILE and head_mask_inputs:  # (the format-2 graph ``bench headmask`` times keeps its K)
            candidates_as_input(graph)
        onnx.save(graph, str(folder / name))
        try:
            onnx.checker.check_model(str(folder / name), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{name}: onnx.checker failed: {str(exc).splitlines()[0]}") from None


def parity_sentences(checkpoint: Checkpoint, count: int = PARITY_SENTENCES) -> list[str]:
    """Held-out sentences of the checkpoint's own corpus (validation split), or a fixed set."""
    try:
        return [src for src, _ in load_split(checkpoint.config.data, "valid")[:count]]
    except CorpusError:
        return FALLBACK_SENTENCES[:count]


def parity_head_mask(model: Transformer) -> dict[str, np.ndarray]:
    """The ablation the parity check also compares: head 0 of the last layer off in every kind."""
    cfg = model.config
    masks = {"encoder": np.ones((cfg.n_encoder_layers, cfg.n_heads), dtype=np.float32),
             "decoder": np.ones((cfg.n_decoder_layers, cfg.n_heads), dtype=np.float32),
             "cross": np.ones((cfg.n_decoder_layers, cfg.n_heads), dtype=np.float32)}
    for mask in masks.values():
        mask[-1, 0] = 0.0
    return masks


def compare_hypotheses(ours: list[Hypothesis], theirs: list[Hypothesis], *, tie_tolerance: float | None
                       ) -> tuple[list[int], list[int], list[int]]:
    """Sentence indices whose tokens are the same, tied, or different between two runtimes.

    A beam search over a barely trained model meets near-ties: hypotheses whose scores differ by
    less than the runtimes' rounding, which either runtime may rank first. With ``tie_tolerance``
    two different hypotheses whose final scores are within it count as tied (each runtime found
    an equally good answer); without it, different tokens are different.
    """
    same, ties, differ = [], [], []
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a.tokens == b.tokens:
            same.append(i)
        elif tie_tolerance is not None and abs(a.score - b.score) <= tie_tolerance:
            ties.append(i)
        else:
            differ.append(i)
    return same, ties, differ


def teacher_forced(model: Transformer, source: list[int], target: list[int], *,
                   head_mask: dict[str, Tensor] | None = None) -> Scored:
    """PyTorch's teacher-forced pass over one target (ids ending with EOS): the scorer's reference.

    Returns the :class:`Scored` the scorer graph should give (log-probabilities with PAD and BOS at
    -inf, attention cut to the real lengths; ``contributions`` left empty: the graph's own rule).
    """
    cfg = model.config
    inputs = [cfg.bos_id, *target[:-1]]
    with torch.no_grad():
        logits, attention = model(torch.tensor([source]), torch.tensor([inputs]), return_attention=True,
                                  head_mask=head_mask)
        log_probs = torch.log_softmax(logits.float(), -1)[0]
        log_probs[:, [cfg.pad_id, cfg.bos_id]] = float("-inf")
        chosen = log_probs.gather(-1, torch.tensor(target)[:, None])[:, 0].numpy()
    return Scored(tokens=list(target), log_probs=chosen, score=float(chosen.sum()),
                  attention={kind: torch.stack(weights)[:, 0].numpy() for kind, weights in attention.items()},
                  contributions=np.zeros((len(target), 0), dtype=np.float32))


def check_parity(model: Transformer, folder: Path, sentences: list[str]) -> dict[str, Any]:
    """Compare the ONNX export in ``folder`` with ``model`` on ``sentences``, as exported and with
    one head of each kind masked (:func:`parity_head_mask`).

    The scorer graph is compared too: with PyTorch teacher forcing (:func:`teacher_forced`) over the
    greedy translations and over each sentence paired with another's translation, and over the
    search's own greedy and beam outputs, whose attention it must give back.

    Returns the figures; raises ExportError when tokens differ or a tolerance is exceeded. Beam
    search may return a different hypothesis of the same score (:func:`compare_hypotheses`,
    within the log-probability tolerance): counted as ``score_ties_beam4``, and its attention is
    not compared.
    """
    model.eval()
    translator = OnnxTranslator(folder, device="cpu")
    tok = translator.tokenizer
    sources = [translator.encode_text(s) for s in sentences]
    max_length = min(48, model.config.max_positions - 1)
    figures: dict[str, Any] = {"sentences": len(sentences), "max_length": max_length,
                               "log_prob_tolerance": LOG_PROB_TOLERANCE, "attention_tolerance": ATTENTION_TOLERANCE}
    worst_attention = worst_log_prob = worst_scorer_attention = worst_scorer_log_prob = 0.0
    for label, head_mask in (("", None), ("_masked", parity_head_mask(model))):
        torch_mask = None if head_mask is None else {kind: torch.from_numpy(m) for kind, m in head_mask.items()}
        for beam in (1, 4):
            ours = translator.decode_ids(sources, beam_size=beam, max_length=max_length, return_attention=True,
                                         head_mask=head_mask)
            theirs = []
            for src in sources:  # one at a time: PyTorch with no padding as the reference
                theirs += decode(model, torch.tensor([src]), beam_size=beam, max_length=max_length,
                                 return_attention=True, head_mask=torch_mask)
            tolerance = LOG_PROB_TOLERANCE if beam > 1 else None  # greedy search: no ties
            same, ties, differ = compare_hypotheses(ours, theirs, tie_tolerance=tolerance)
            figures[f"tokens_equal_beam{beam}{label}"] = f"{len(same)}/{len(sources)}"
            if ties:
                figures[f"score_ties_beam{beam}{label}"] = len(ties)
            if differ:
                raise ExportError(f"parity: beam {beam} tokens differ from PyTorch on {len(differ)} of "
                                  f"{len(sources)} sentences" + (" with heads masked" if label else ""))
            for a, b in (pair for i, pair in enumerate(zip(ours, theirs, strict=True)) if i in same):
                for kind in ("encoder", "decoder", "cross"):
                    worst_attention = max(worst_attention, float(np.abs(a.attention[kind] - b.attention[kind]).max()))
            # the scorer over the search's own outputs gives the attention the search returned
            emitted = [h.tokens + ([tok.eos_id] if h.finished else []) for h in ours]
            for hyp, scored in zip(ours, translator.score_ids(sources, emitted, head_mask=head_mask), strict=True):
                for kind in ("encoder", "decoder", "cross"):
                    worst_scorer_attention = max(worst_scorer_attention, float(np.abs(
                        hyp.attention[kind] - scored.attention[kind]).max()))
            if beam == 1:  # the scorer against PyTorch teacher forcing, on own and on others' translations
                targets = emitted + emitted[1:] + emitted[:1]
                pairs = list(zip(sources + sources, targets, strict=True))
                scored = translator.score_ids([s for s, _ in pairs], [t for _, t in pairs], head_mask=head_mask)
                for (src, target), ours_scored in zip(pairs, scored, strict=True):
                    reference = teacher_forced(model, src, target, head_mask=torch_mask)
                    worst_scorer_log_prob = max(worst_scorer_log_prob, float(np.abs(
                        ours_scored.log_probs - reference.log_probs).max()))
                    for kind in ("decoder", "cross"):
                        worst_scorer_attention = max(worst_scorer_attention, float(np.abs(
                            ours_scored.attention[kind] - reference.attention[kind]).max()))
        # the top-K log-probabilities along PyTorch's greedy path, step by step through the ONNX decoder
        greedy = decode(model, torch.tensor([sources[0]]), max_length=max_length, head_mask=torch_mask)[0]
        path = [tok.bos_id, *greedy.tokens]
        with torch.no_grad():
            logits = model(torch.tensor([sources[0]]), torch.tensor([path]), head_mask=torch_mask)
            reference = torch.log_softmax(logits.float(), -1)[0]
            reference[:, [tok.pad_id, tok.bos_id]] = float("-inf")
            reference = reference.topk(translator.top_k, dim=-1).values.numpy()
        src = np.array([sources[0]], dtype=np.int64)
        mask = np.zeros_like(src, dtype=bool)
        step = translator.start(src, mask, beam_size=1, head_mask=head_mask, candidates=translator.top_k)
        for t, token in enumerate(path):
            top_log_probs, _, _, _ = step(np.array([[token]], dtype=np.int64), np.zeros(1, dtype=np.int64), False)
            worst_log_prob = max(worst_log_prob, float(np.abs(top_log_probs[0] - reference[t]).max()))
    figures["max_abs_log_prob_diff"] = worst_log_prob
    figures["max_abs_attention_diff"] = worst_attention
    figures["scorer_max_abs_log_prob_diff"] = worst_scorer_log_prob
    figures["scorer_max_abs_attention_diff"] = worst_scorer_attention
    if worst_scorer_log_prob > LOG_PROB_TOLERANCE:
        raise ExportError(f"parity: the scorer's log-probabilities differ from PyTorch teacher forcing by "
                          f"{worst_scorer_log_prob:.2e} > {LOG_PROB_TOLERANCE:g}")
    if worst_scorer_attention > ATTENTION_TOLERANCE:
        raise ExportError(f"parity: the scorer's attention differs by {worst_scorer_attention:.2e} > "
                          f"{ATTENTION_TOLERANCE:g}")
    if worst_log_prob > LOG_PROB_TOLERANCE:
        raise ExportError(f"parity: log-probabilities differ by {worst_log_prob:.2e} > {LOG_PROB_TOLERANCE:g}")
    if worst_attention > ATTENTION_TOLERANCE:
        raise ExportError(f"parity: attention differs by {worst_attention:.2e} > {ATTENTION_TOLERANCE:g}")
    return figures


def export_checkpoint(
    checkpoint: Checkpoint, out_dir: str | Path, *, source: dict[str, Any] | None = None, opset: int = OPSET,
    sentences: list[str] | None = None,
) -> dict[str, Any]:
    """Export, check parity, and move the result to ``out_dir`` atomically; returns the manifest.

    Args:
        checkpoint: what to export.
        out_dir: the export directory (replaced if it exists).
        source: registry facts to record (``id``, ``name``, ``tags``, ``project``).
        opset: ONNX opset.
        sentences: parity sentences (default: :func:`parity_sentences`).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = checkpoint.build_model()
    temp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    temp.chmod(0o755)
    try:
        _export_graphs(model, temp, opset)
        checkpoint.tokenizer().save(temp / TOKENIZER_FILE)
        manifest: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "source_model": source or {}, "name": checkpoint.config.name,
            "language_pair": checkpoint.config.data.language_pair, "step": checkpoint.step,
            "config": checkpoint.config.to_dict(), "config_hash": checkpoint.config.hash(), "opset": opset,
            "files": [ENCODER_FILE, DECODER_FILE, SCORER_FILE, TOKENIZER_FILE],
            "top_k": min(TOP_K, checkpoint.config.model.vocab_size),
        }
        (temp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        manifest["parity"] = check_parity(model, temp, sentences or parity_sentences(checkpoint))
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        manifest["exported_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (temp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            temp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            temp.rename(out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    log.info("exported %s to %s in %.1fs (parity: %s)", checkpoint.config.name, out_dir, manifest["export_seconds"],
             manifest["parity"])
    return manifest


def export_from_registry(
    out_dir: str | Path, *, project: str | None = None, name: str | None = None, tag: str | None = None,
    model_id: str | None = None, checkpoint_path: str | Path | None = None, register: bool = True,
    opset: int = OPSET,
) -> dict[str, Any]:
    """``stepwise export``: resolve a version (tag, id or local file), export it, register the export.

    With no ``tag``/``model_id``/``checkpoint_path`` the ``production`` version is used, or the
    newest version when none carries that tag.
    """
    from stepwise.registry import client as registry
    from stepwise.train.checkpoint import load_checkpoint

    if checkpoint_path is not None:
        checkpoint = load_checkpoint(checkpoint_path)
        return export_checkpoint(checkpoint, out_dir, source={"checkpoint": str(checkpoint_path)}, opset=opset)
    if model_id is not None:
        version = registry.get_version(model_id)
        path = registry.download(model_id)
    else:
        try:
            resolved = registry.resolve(project, name, tag=tag or registry.PRODUCTION)
        except ModelNotFound:
            if tag is not None:
                raise
            log.info("no version is tagged production: exporting the newest version")
            resolved = registry.resolve(project, name, tag=None)
        version, path = resolved.version, resolved.path
    source = {"id": version.id, "name": version.name, "tags": version.tags, "project": version.project,
              "metadata": version.metadata}
    manifest = export_checkpoint(load_checkpoint(path), out_dir, source=source, opset=opset)
    if register:
        manifest["registered_id"] = registry.register_export(Path(out_dir), manifest)
        (Path(out_dir) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest
