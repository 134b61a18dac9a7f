"""PyTorch's own ``nn.Transformer`` carrying this model's weights, for parity checks.

``to_torch_reference(model)`` copies every weight of a :class:`~stepwise.model.Transformer`
into ``torch.nn.Transformer`` plus the same embeddings, positional encoding and output
projection. With dropout off, both must give the same logits: anyone can re-run that check.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from stepwise.model.attention import MultiHeadAttention
from stepwise.model.transformer import Transformer


class TorchReference(nn.Module):
    """Embeddings + ``nn.Transformer`` + output projection, wired like the paper."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        cfg = model.config
        pre_norm = cfg.norm_placement == "pre"
        common = dict(d_model=cfg.d_model, nhead=cfg.n_heads, dim_feedforward=cfg.d_ff, dropout=cfg.dropout,
                      activation=cfg.activation, batch_first=True, norm_first=pre_norm)
        encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**common), cfg.n_encoder_layers,
                                        norm=nn.LayerNorm(cfg.d_model) if pre_norm else None,
                                        enable_nested_tensor=False)
        decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**common), cfg.n_decoder_layers,
                                        norm=nn.LayerNorm(cfg.d_model) if pre_norm else None)
        self.transformer = nn.Transformer(d_model=cfg.d_model, nhead=cfg.n_heads, custom_encoder=encoder,
                                          custom_decoder=decoder, batch_first=True)
        self.d_model = cfg.d_model
        self.src_embed = copy.deepcopy(model.src_embed)
        self.tgt_embed = self.src_embed if model.tgt_embed is model.src_embed else copy.deepcopy(model.tgt_embed)
        self.positional = copy.deepcopy(model.positional)
        self.output_projection = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._copy_weights(model)

    @torch.no_grad()
    def _copy_weights(self, model: Transformer) -> None:
        self.output_projection.weight.copy_(model.output_projection.weight)
        for ours, theirs in zip(model.encoder_layers, self.transformer.encoder.layers, strict=True):
            _copy_attention(ours.self_attn, theirs.self_attn)
            _copy_block(ours, theirs, blocks=[("attn_block", "norm1"), ("ff_block", "norm2")])
        for ours, theirs in zip(model.decoder_layers, self.transformer.decoder.layers, strict=True):
            _copy_attention(ours.self_attn, theirs.self_attn)
            _copy_attention(ours.cross_attn, theirs.multihead_attn)
            _copy_block(ours, theirs, blocks=[("self_block", "norm1"), ("cross_block", "norm2"),
                                              ("ff_block", "norm3")])
        if self.transformer.encoder.norm is not None:
            self.transformer.encoder.norm.load_state_dict(model.encoder_norm.state_dict())
            self.transformer.decoder.norm.load_state_dict(model.decoder_norm.state_dict())

    def forward(
        self, src_ids: Tensor, tgt_ids: Tensor, src_pad_mask: Tensor | None = None,
        tgt_pad_mask: Tensor | None = None,
    ) -> Tensor:
        """Same signature and logits ``[B, T, V]`` as ``Transformer.forward`` without attention."""
        scale = math.sqrt(self.d_model)
        src = self.positional(self.src_embed(src_ids) * scale)
        tgt = self.positional(self.tgt_embed(tgt_ids) * scale)
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_ids.shape[1], dtype=torch.bool)
        causal = causal if causal.dtype == torch.bool else torch.isinf(causal)
        out = self.transformer(src, tgt, tgt_mask=causal, src_key_padding_mask=src_pad_mask,
                               tgt_key_padding_mask=tgt_pad_mask, memory_key_padding_mask=src_pad_mask)
        return self.output_projection(out)


def _copy_attention(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    # nn.MultiheadAttention packs W^Q, W^K, W^V into one [3d, d] matrix
    theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
    theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
    theirs.out_proj.weight.copy_(ours.out_proj.weight)
    theirs.out_proj.bias.copy_(ours.out_proj.bias)


def _copy_block(ours: nn.Module, theirs: nn.Module, blocks: list[tuple[str, str]]) -> None:
    for our_block, their_norm in blocks:
        getattr(theirs, their_norm).load_state_dict(getattr(ours, our_block).norm.state_dict())
    theirs.linear1.load_state_dict(ours.feed_forward.linear1.state_dict())
    theirs.linear2.load_state_dict(ours.feed_forward.linear2.state_dict())


def to_torch_reference(model: Transformer) -> TorchReference:
    """Build ``torch.nn.Transformer`` (plus embeddings and projection) with ``model``'s weights.

    Args:
        model: a stepwise transformer.

    Returns:
        A module whose ``forward(src_ids, tgt_ids, src_pad_mask, tgt_pad_mask)`` gives the same
        logits as ``model`` (in eval mode, or with dropout 0).
    """
    reference = TorchReference(model)
    reference.train(model.training)
    return reference
