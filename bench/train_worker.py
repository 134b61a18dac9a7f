"""One training-throughput measurement: ``python -m bench.train_worker '{...}'``.

Runs forward + backward + optimizer step on the same token-budget batches with either this
project's model (fused attention path) or ``torch.nn.Transformer`` carrying the same weights.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import peak_rss_mb
from stepwise.model import Transformer
from stepwise.model.reference import to_torch_reference
from stepwise.train.checkpoint import load_checkpoint
from stepwise.train.data import encode_pairs, load_split, token_batches


def main() -> None:
    args = json.loads(sys.argv[1])
    checkpoint = load_checkpoint(args["checkpoint"])
    config = checkpoint.config
    device = torch.device(args.get("device", "cpu"))
    torch.manual_seed(0)
    model = Transformer(config.model)
    model.load_state_dict(checkpoint.model_state)
    system = model if args["system"] == "stepwise" else to_torch_reference(model)
    system.to(device).train()
    optimizer = torch.optim.Adam(system.parameters(), lr=1e-4)
    tokenizer = checkpoint.tokenizer()
    pairs = load_split(config.data, "train")[: args.get("pairs", 4000)]
    examples = encode_pairs(pairs, tokenizer, config.data.max_length)
    batches = list(token_batches(examples, args.get("batch_tokens", config.train.batch_tokens), seed=0))
    steps, warmup = args.get("steps", 20), args.get("warmup", 3)
    batches = (batches * (1 + (steps + warmup) // max(len(batches), 1)))[: steps + warmup]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.get("bf16") else None
    tokens = 0
    for i, batch in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            tokens = 0
        batch = batch.to(device)
        if autocast is not None:
            with autocast:
                logits = system(batch.src, batch.tgt_in, batch.src_pad_mask, batch.tgt_pad_mask)
        else:
            logits = system(batch.src, batch.tgt_in, batch.src_pad_mask, batch.tgt_pad_mask)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(), ignore_index=0,
                               label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens += batch.target_tokens
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    print(json.dumps({"tokens_per_s": tokens / elapsed, "steps": steps, "peak_mb": peak,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
