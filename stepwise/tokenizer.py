"""One tokenizer for everything: a joint SentencePiece model over source and target text.

Ids 0-3 are reserved as pad, unk, bos and eos (matching ``ModelConfig``). Source sentences
are encoded as ``pieces + [eos]``; the decoder input is ``[bos] + pieces`` and its target
``pieces + [eos]``. The model's bytes travel inside checkpoints and exports, so a tokenizer is
always rebuilt from the same file it was trained as.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def truncate(ids: list[int], max_positions: int) -> list[int]:
    """The one input-length rule: a source (ending with EOS) cut to at most ``max_positions - 1``
    tokens, EOS kept last. Training, PyTorch translation and ONNX translation all cut with it.

    Args:
        ids: encoded source, ending with EOS.
        max_positions: the model's positional table size.

    Returns:
        ``ids`` itself when it fits, else its first ``max_positions - 2`` tokens and EOS.
    """
    limit = max_positions - 1
    return ids if len(ids) <= limit else [*ids[: limit - 1], EOS_ID]


class Tokenizer:
    """A thin wrapper around ``sentencepiece.SentencePieceProcessor``."""

    def __init__(self, model_proto: bytes) -> None:
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError("tokenizer must reserve ids pad=0, unk=1, bos=2, eos=3")

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        *,
        vocab_size: int,
        model_type: str = "bpe",
        character_coverage: float = 1.0,
        seed_sentences: int = 2_000_000,
    ) -> Tokenizer:
        """Train a SentencePiece model on ``sentences`` (source and target text together).

        ``vocab_size`` is an upper bound: on a small corpus the vocabulary stops where the
        text runs out of merges (``hard_vocab_limit=False``).
        """
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            hard_vocab_limit=False,
            input_sentence_size=seed_sentences,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
        tokenizer = cls(buffer.getvalue())
        log.info("trained %s tokenizer with %d pieces", model_type, tokenizer.vocab_size)
        return tokenizer

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a ``.model`` file written by :meth:`save`."""
        return cls(Path(path).read_bytes())

    def save(self, path: str | Path) -> None:
        """Write the SentencePiece model file."""
        Path(path).write_bytes(self.model_proto)

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special ids included."""
        return self.sp.get_piece_size()

    def encode(self, text: str, *, add_eos: bool = True) -> list[int]:
        """Text to ids, with a trailing EOS by default."""
        ids = self.sp.encode(text, out_type=int)
        return ids + [EOS_ID] if add_eos else ids

    def encode_batch(self, texts: list[str], *, add_eos: bool = True) -> list[list[int]]:
        """Encode many texts at once."""
        encoded = self.sp.encode(texts, out_type=int)
        return [ids + [EOS_ID] for ids in encoded] if add_eos else encoded

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; special ids are dropped."""
        return self.sp.decode([i for i in ids if i > EOS_ID])

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """Ids to their piece strings (``</s>`` for EOS), e.g. for attention-map labels."""
        return [self.sp.id_to_piece(i) for i in ids]
