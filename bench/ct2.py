"""Convert a stepwise checkpoint to CTranslate2 with its Python spec API (no OpenNMT in between).

CTranslate2's Transformer layout, filled from our weights: self-attention ``linear[0]`` is the
fused Q/K/V projection and ``linear[1]`` the output; cross-attention ``linear[0]`` is Q,
``linear[1]`` the fused K/V, ``linear[2]`` the output; each sub-layer's ``layer_norm`` is our
pre-LN norm; the sinusoid table is passed explicitly so both engines add the same positions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stepwise.train.checkpoint import Checkpoint


def _np(tensor: object) -> np.ndarray:
    return tensor.detach().float().numpy()  # type: ignore[attr-defined]


def _linear(spec: object, weight: np.ndarray, bias: np.ndarray | None) -> None:
    spec.weight = weight
    if bias is not None:
        spec.bias = bias


def _norm(spec: object, state: dict, prefix: str) -> None:
    spec.gamma = _np(state[f"{prefix}.weight"])
    spec.beta = _np(state[f"{prefix}.bias"])


def convert(checkpoint: Checkpoint, out_dir: str | Path, *, quantization: str | None = None) -> Path:
    """Write a CTranslate2 model directory for ``checkpoint`` (pre-LN models)."""
    import ctranslate2
    from ctranslate2.specs import common_spec, transformer_spec

    cfg = checkpoint.config.model
    if cfg.norm_placement != "pre":
        raise ValueError("the CTranslate2 conversion here covers pre-LN models (config/default.json, tiny.json)")
    state = {k: v for k, v in checkpoint.model_state.items()}
    activation = common_spec.Activation.RELU if cfg.activation == "relu" else common_spec.Activation.GELU
    spec = transformer_spec.TransformerSpec.from_config((cfg.n_encoder_layers, cfg.n_decoder_layers), cfg.n_heads,
                                                        pre_norm=True, activation=activation)
    spec.config.layer_norm_epsilon = 1e-5
    model = checkpoint.build_model()
    table = _np(model.positional.table) if hasattr(model.positional, "table") else _np(
        model.positional.embedding.weight)
    embed = _np(state["src_embed.weight"])
    spec.encoder.embeddings[0].weight = embed
    spec.decoder.embeddings.weight = _np(state["tgt_embed.weight"]) if "tgt_embed.weight" in state else embed
    spec.encoder.position_encodings.encodings = table
    spec.decoder.position_encodings.encodings = table
    _norm(spec.encoder.layer_norm, state, "encoder_norm")
    _norm(spec.decoder.layer_norm, state, "decoder_norm")
    spec.decoder.projection.weight = _np(state["output_projection.weight"])

    def qkv(prefix: str, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([_np(state[f"{prefix}.{n}_proj.weight"]) for n in names]),
                np.concatenate([_np(state[f"{prefix}.{n}_proj.bias"]) for n in names]))

    def linear(target: object, name: str) -> None:
        _linear(target, _np(state[f"{name}.weight"]), _np(state[f"{name}.bias"]))

    def self_attention(target: object, norm: str, prefix: str) -> None:
        _norm(target.layer_norm, state, norm)
        _linear(target.linear[0], *qkv(prefix, ("q", "k", "v")))
        linear(target.linear[1], f"{prefix}.out_proj")

    def ffn(layer_spec: object, prefix: str) -> None:
        _norm(layer_spec.ffn.layer_norm, state, f"{prefix}.ff_block.norm")
        linear(layer_spec.ffn.linear_0, f"{prefix}.feed_forward.linear1")
        linear(layer_spec.ffn.linear_1, f"{prefix}.feed_forward.linear2")

    for i, layer in enumerate(spec.encoder.layer):
        p = f"encoder_layers.{i}"
        self_attention(layer.self_attention, f"{p}.attn_block.norm", f"{p}.self_attn")
        ffn(layer, p)
    for i, layer in enumerate(spec.decoder.layer):
        p = f"decoder_layers.{i}"
        self_attention(layer.self_attention, f"{p}.self_block.norm", f"{p}.self_attn")
        _norm(layer.attention.layer_norm, state, f"{p}.cross_block.norm")
        linear(layer.attention.linear[0], f"{p}.cross_attn.q_proj")
        _linear(layer.attention.linear[1], *qkv(f"{p}.cross_attn", ("k", "v")))
        linear(layer.attention.linear[2], f"{p}.cross_attn.out_proj")
        ffn(layer, p)

    tokenizer = checkpoint.tokenizer()
    vocabulary = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    spec.register_source_vocabulary(vocabulary)
    spec.register_target_vocabulary(vocabulary)
    spec.validate()
    if quantization:
        spec.optimize(quantization=quantization)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec.save(str(out))
    del ctranslate2
    return out
