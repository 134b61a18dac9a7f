"""Small models built from the real config type: modules, checkpoints with a real tokenizer, ONNX exports."""

from __future__ import annotations

from pathlib import Path

import torch

from stepwise.config import ModelConfig
from stepwise.model import Transformer

SAMPLE_PAIRS = [
    ("Im Anfang war das Wort.", "In the beginning was the Word."),
    ("Und Gott sprach: Es werde Licht!", "God said, Let there be light."),
    ("Der Herr ist mein Hirte.", "The Lord is my shepherd."),
    ("Selig sind die Friedfertigen.", "Blessed are the peacemakers."),
    ("Und es ward Abend und es ward Morgen.", "There was evening and there was morning."),
    ("Liebet eure Feinde.", "Love your enemies."),
]
# three sentences, one with a colon inside
PARAGRAPH = " ".join(source for source, _ in SAMPLE_PAIRS[:3])


def make_model(seed: int = 0, **overrides: object) -> Transformer:
    """A small, dropout-free transformer in eval mode."""
    settings = dict(vocab_size=64, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64,
                    dropout=0.0)
    settings.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**settings)).eval()


def padded_batch(vocab: int, lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``[B, max(lengths)]`` (no special ids) with a padding mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return ids.masked_fill(mask, 0), mask


def make_checkpoint(path: Path, seed: int = 0, name: str = "transformer-test", **overrides: object) -> Path:
    """Write a checkpoint of a small untrained model with a real (tiny) SentencePiece tokenizer.

    ``overrides`` replace fields of the model config, e.g. ``n_encoder_layers=4``.
    """
    from stepwise.config import Config
    from stepwise.tokenizer import Tokenizer
    from stepwise.train.checkpoint import Checkpoint, save_checkpoint

    tokenizer = Tokenizer.train([s for pair in SAMPLE_PAIRS for s in pair] * 4, vocab_size=120)
    config = Config.from_dict({"name": name, "model": {
        "vocab_size": tokenizer.vocab_size, "d_model": 32, "n_heads": 4, "n_encoder_layers": 2,
        "n_decoder_layers": 2, "d_ff": 64, "dropout": 0.0, "max_positions": 64, **overrides}})
    torch.manual_seed(seed)
    model = Transformer(config.model).eval()
    with torch.no_grad():  # a sharper output distribution: no near-ties between tokens
        model.output_projection.weight.mul_(3.0)
    return save_checkpoint(path, Checkpoint(config=config, model_state=model.state_dict(),
                                            tokenizer_model=tokenizer.model_proto, step=0))


def export_tiny_model(folder: Path, *, seed: int = 5, **overrides: object) -> tuple[Path, Path]:
    """A tiny untrained checkpoint (:func:`make_checkpoint`) and its ONNX export, both in ``folder``."""
    from stepwise.export import export_checkpoint
    from stepwise.train.checkpoint import load_checkpoint

    checkpoint = make_checkpoint(folder / "model.pt", seed=seed, **overrides)
    export_checkpoint(load_checkpoint(checkpoint), folder / "export")
    return checkpoint, folder / "export"
