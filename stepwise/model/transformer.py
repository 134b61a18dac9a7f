"""The encoder-decoder transformer (paper section 3, figure 1).

Source tokens are embedded, scaled by √d_model (section 3.4), given positions (3.5) and
encoded by N encoder layers into the *memory*. The decoder embeds the target shifted right
(starting with BOS), attends causally to itself and to the memory, and a final linear map
gives logits over the vocabulary. Source and target embeddings may share one matrix (joint
vocabulary), and the output projection may reuse it too (weight tying, as in the paper).

Attention, when asked for, is returned in one layout everywhere (PyTorch, ONNX, HTTP)::

    {"encoder": [L x (B, H, S, S)], "decoder": [L x (B, H, T, T)], "cross": [L x (B, H, T, S)]}

Guided alignment (Garg et al. 2019) trains one cross-attention head: ``forward(...,
cross_attention_layer=n)`` returns ``(logits, weights [B, H, T, S])`` of decoder layer ``n``'s
cross-attention, computed on the explicit path in that layer only; every other attention keeps
the fused kernel, so training without the alignment loss computes no weights at all.

Head ablation takes the same keys: ``head_mask = {"encoder": [L_enc, H], "decoder": [L_dec, H],
"cross": [L_dec, H]}`` (any kind may be left out), each row scaling that layer's heads' outputs
before ``W^O`` (Michel et al. 2019; see :mod:`stepwise.model.attention`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stepwise.config import ModelConfig
from stepwise.model.attention import attention_bias
from stepwise.model.layers import DecoderLayer, EncoderLayer, KeyValue
from stepwise.model.positional_encoding import build_positional_encoding

Attention = dict[str, list[Tensor]]
HeadMask = dict[str, Tensor]  # kind -> [layers, heads] factors for each head's output (0 = head off)


def _layer_masks(head_mask: HeadMask | None, kind: str, layers: int) -> list[Tensor | None]:
    """Each layer's rows of ``head_mask[kind]`` as ``[1, H, 1, 1]`` (broadcast over the heads' outputs),
    or None per layer when that kind is not masked.

    Shaped once and split in one operation, so an exported graph has one Split per kind and one Mul
    per attention sub-layer (what ``python -m bench headmask`` measures).
    """
    if head_mask is None or head_mask.get(kind) is None:
        return [None] * layers
    return list(head_mask[kind][:, :, None, None].split(1, dim=0))


class Transformer(nn.Module):
    """Encoder-decoder transformer for translation."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.d_model
        pre_norm = config.norm_placement == "pre"
        layer_args = dict(dropout=config.dropout, attention_dropout=config.attention_dropout,
                          activation=config.activation, pre_norm=pre_norm)
        self.src_embed = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_id)
        self.tgt_embed = self.src_embed if config.share_embeddings else nn.Embedding(
            config.vocab_size, d, padding_idx=config.pad_id)
        self.positional = build_positional_encoding(config.positional_encoding, d, config.max_positions)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(d, config.n_heads, config.d_ff, **layer_args) for _ in range(config.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(d, config.n_heads, config.d_ff, **layer_args) for _ in range(config.n_decoder_layers))
        # pre-LN leaves the residual stream un-normalised: normalise once at the end of each stack
        self.encoder_norm = nn.LayerNorm(d) if pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d) if pre_norm else nn.Identity()
        self.output_projection = nn.Linear(d, config.vocab_size, bias=False)
        self._reset_parameters()
        if config.tie_output:
            self.output_projection.weight = self.tgt_embed.weight

    def _reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                nn.init.xavier_uniform_(p)
        for embedding in {self.src_embed, self.tgt_embed}:
            nn.init.normal_(embedding.weight, std=self.config.d_model**-0.5)
            with torch.no_grad():
                embedding.weight[self.config.pad_id].zero_()

    def _embed(self, embedding: nn.Embedding, ids: Tensor, offset: int | Tensor = 0) -> Tensor:
        x = embedding(ids) * math.sqrt(self.config.d_model)
        return self.dropout(self.positional(x, offset))

    def encode(
        self, src_ids: Tensor, src_pad_mask: Tensor | None = None, *, need_weights: bool = False,
        head_mask: HeadMask | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Encode ``src_ids [B, S]`` into memory ``[B, S, d]``.

        ``head_mask["encoder"]`` (``[L_enc, H]``), when given, scales the self-attention heads' outputs.

        Returns:
            ``(memory, encoder self-attention per layer)`` (the list is empty unless asked).
        """
        bias = attention_bias(key_padding_mask=src_pad_mask, dtype=self.src_embed.weight.dtype)
        x = self._embed(self.src_embed, src_ids)
        weights = []
        masks = _layer_masks(head_mask, "encoder", len(self.encoder_layers))
        for layer, mask in zip(self.encoder_layers, masks, strict=True):
            x, w = layer(x, bias=bias, need_weights=need_weights, head_mask=mask)
            if need_weights:
                weights.append(w)
        return self.encoder_norm(x), weights

    def cross_key_values(self, memory: Tensor) -> list[KeyValue]:
        """Project the memory once into every decoder layer's cross-attention keys/values."""
        return [layer.cross_attn.project_key_value(memory) for layer in self.decoder_layers]

    def decode(
        self,
        tgt_ids: Tensor,
        cross_kv: list[KeyValue],
        *,
        src_pad_mask: Tensor | None = None,
        tgt_pad_mask: Tensor | None = None,
        past: list[KeyValue] | None = None,
        need_weights: bool = False,
        head_mask: HeadMask | None = None,
        cross_weights_layer: int | None = None,
    ) -> tuple[Tensor, list[KeyValue], list[Tensor], list[Tensor]]:
        """Run the decoder on ``tgt_ids [B, T]`` (all positions, or new ones after ``past``).

        Args:
            tgt_ids: target tokens; position numbering starts at the cache length.
            cross_kv: from :meth:`cross_key_values`; in beam search one per sentence, ``[B/k, H, S, d_k]``,
                for ``k`` consecutive rows of one new position each (cross-attention regroups them).
            src_pad_mask: ``[B, S]`` True at source padding (``[B/k, S]`` with such ``cross_kv``).
            tgt_pad_mask: ``[B, t+T]`` True at target padding (keys, including cached ones).
            past: per-layer self-attention keys/values ``[B, H, t, d_k]`` of earlier positions.
            need_weights: also return attention weights.
            head_mask: ``"decoder"`` and ``"cross"`` ``[L_dec, H]`` head-output factors (ablation).
            cross_weights_layer: without ``need_weights``, compute the cross-attention weights of
                this layer alone (negative counts from the last); they are the only entry of the
                returned cross-attention list.

        Returns:
            ``(logits [B, T, V], present keys/values, self-attention, cross-attention)``.
        """
        dtype = self.tgt_embed.weight.dtype
        past_length = 0 if past is None else past[0][0].shape[2]
        length = tgt_ids.shape[1]
        cross_bias = attention_bias(key_padding_mask=src_pad_mask, dtype=dtype)
        is_causal = past is None and tgt_pad_mask is None
        if past is not None and length == 1 and tgt_pad_mask is None:
            self_bias = None  # one new query may see every cached key
        else:
            self_bias = attention_bias(key_padding_mask=tgt_pad_mask, causal=True, query_length=length,
                                       key_length=past_length + length, dtype=dtype, device=tgt_ids.device)
        x = self._embed(self.tgt_embed, tgt_ids, offset=past_length)
        present, self_weights, cross_weights = [], [], []
        self_masks = _layer_masks(head_mask, "decoder", len(self.decoder_layers))
        cross_masks = _layer_masks(head_mask, "cross", len(self.decoder_layers))
        weighed = None if cross_weights_layer is None else range(len(self.decoder_layers))[cross_weights_layer]
        for i, layer in enumerate(self.decoder_layers):
            x, kv, sw, cw = layer(x, cross_kv[i], self_bias=self_bias, cross_bias=cross_bias,
                                  past=None if past is None else past[i], is_causal=is_causal,
                                  need_weights=need_weights or i == weighed, self_head_mask=self_masks[i],
                                  cross_head_mask=cross_masks[i])
            present.append(kv)
            if need_weights:
                self_weights.append(sw)
                cross_weights.append(cw)
            elif i == weighed:
                cross_weights.append(cw)
        logits = self.output_projection(self.decoder_norm(x))
        return logits, present, self_weights, cross_weights

    def forward(
        self,
        src_ids: Tensor,
        tgt_ids: Tensor,
        src_pad_mask: Tensor | None = None,
        tgt_pad_mask: Tensor | None = None,
        return_attention: bool = False,
        head_mask: HeadMask | None = None,
        cross_attention_layer: int | None = None,
    ) -> Tensor | tuple[Tensor, Attention] | tuple[Tensor, Tensor]:
        """Teacher-forced forward pass.

        Args:
            src_ids: ``[B, S]`` source token ids.
            tgt_ids: ``[B, T]`` target ids shifted right (BOS first).
            src_pad_mask: ``[B, S]`` bool, True at padding.
            tgt_pad_mask: ``[B, T]`` bool, True at padding.
            return_attention: also return the attention weights of every layer and head.
            head_mask: per kind ``[layers, heads]`` factors for each head's output (module docstring).
            cross_attention_layer: also return this decoder layer's cross-attention weights
                ``[B, H, T, S]`` (guided alignment; ignored with ``return_attention``).

        Returns:
            logits ``[B, T, V]``; ``(logits, attention)`` when ``return_attention``; ``(logits,
            cross-attention weights of one layer)`` when ``cross_attention_layer`` is given.
        """
        memory, enc_weights = self.encode(src_ids, src_pad_mask, need_weights=return_attention,
                                          head_mask=head_mask)
        logits, _, dec_weights, cross_weights = self.decode(
            tgt_ids, self.cross_key_values(memory), src_pad_mask=src_pad_mask, tgt_pad_mask=tgt_pad_mask,
            need_weights=return_attention, head_mask=head_mask,
            cross_weights_layer=None if return_attention else cross_attention_layer)
        if not return_attention:
            return logits if cross_attention_layer is None else (logits, cross_weights[0])
        return logits, {"encoder": enc_weights, "decoder": dec_weights, "cross": cross_weights}
