"""``python -m bench headmask``: what the head-mask inputs cost when they are all ones.

The same model is exported twice, with the head-mask inputs (export format 3, what
``stepwise export`` writes) and without them (the format-2 graphs), both through the same
projection fusion. In one process, with one ONNX Runtime thread pool, the decoder step of each
graph runs ``steps`` steps from an empty KV cache (the cache grows by one position each step, as
in decoding). The two graphs run in lockstep, one step each in turn (alternating which goes
first), so a slow spell of a shared machine falls on both; ``rounds`` such runs. Reported: each
graph's median step time over all steps, and the per-round ratio of medians (with masks ÷
without), its mean, spread and range, beside an A/A control (the graph without masks run twice
in the same lockstep), so the noise floor is in the table beside the ratio.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, table


def _model(checkpoint: Path | None) -> object:
    """The checkpoint's model, or an untrained model of ``config/default.json``'s size (timing only)."""
    import torch

    from stepwise.config import load_config
    from stepwise.model import Transformer
    from stepwise.train.checkpoint import load_checkpoint

    if checkpoint is not None:
        return load_checkpoint(checkpoint).build_model().eval()
    torch.manual_seed(0)
    return Transformer(load_config(ROOT / "config" / "default.json").model).eval()


class _Decoding:
    """One graph's decoder steps over its own growing KV cache (greedy: each step feeds its best token)."""

    def __init__(self, encoder: object, decoder: object, model: object, batch: int, masks: bool) -> None:
        from stepwise.decode.onnx_runtime import cache_names

        cfg = model.config
        src = np.random.default_rng(0).integers(4, cfg.vocab_size, (batch, 24), dtype=np.int64)
        src_mask = np.zeros_like(src, dtype=bool)
        self.names = cache_names(cfg.n_decoder_layers)
        feed = {"src_ids": src, "src_pad_mask": src_mask}
        if masks:
            feed["encoder_head_mask"] = np.ones((cfg.n_encoder_layers, cfg.n_heads), dtype=np.float32)
        cross_names = self.names["cross_keys"] + self.names["cross_values"]
        cross = encoder.run(cross_names, feed)
        empty = np.zeros((batch, cfg.n_heads, 0, cfg.d_model // cfg.n_heads), dtype=np.float32)
        self.inputs = {"src_pad_mask": src_mask, "past_order": np.arange(batch, dtype=np.int64),
                       "tokens": np.full((batch, 1), cfg.bos_id, dtype=np.int64),
                       **dict(zip(cross_names, cross, strict=True)),
                       **{n: empty for n in self.names["past_keys"] + self.names["past_values"]}}
        if masks:
            ones = np.ones((cfg.n_decoder_layers, cfg.n_heads), dtype=np.float32)
            self.inputs.update(decoder_head_mask=ones, cross_head_mask=ones)
        self.decoder = decoder
        self.outputs = ["top_ids", *self.names["present_keys"], *self.names["present_values"]]

    def step(self) -> float:
        """Run one step; its seconds."""
        began = time.perf_counter()
        top_ids, *present = self.decoder.run(self.outputs, self.inputs)
        elapsed = time.perf_counter() - began
        self.inputs["tokens"] = top_ids[:, :1]
        self.inputs.update(zip(self.names["past_keys"] + self.names["past_values"], present, strict=True))
        return elapsed


def bench_headmask(checkpoint: Path | None, *, steps: int = 200, rounds: int = 6,
                   batches: tuple[int, ...] = (1, 32)) -> str:
    """The A/B table: decoder step time with all-ones head masks vs the graph without mask inputs."""
    import onnxruntime as ort

    from stepwise.decode.onnx_runtime import DECODER_FILE, ENCODER_FILE, session_options
    from stepwise.export import OPSET, _export_graphs

    model = _model(checkpoint)
    steps = min(steps, model.config.max_positions - 1)
    work = Path(tempfile.mkdtemp(prefix="stepwise-bench-headmask-"))
    sessions = {}
    for masks in (True, False):
        folder = work / ("with" if masks else "without")
        folder.mkdir()
        _export_graphs(model, folder, OPSET, head_mask_inputs=masks)
        options = session_options()
        sessions[masks] = [ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
                           for name in (ENCODER_FILE, DECODER_FILE)]
    # A/A: the graph without masks in sessions of its own, against itself: the noise floor
    sessions["control"] = [ort.InferenceSession(str(work / "without" / name), session_options(),
                                                providers=["CPUExecutionProvider"])
                           for name in (ENCODER_FILE, DECODER_FILE)]
    kinds = (True, False, "control")
    rows = []
    for batch in batches:
        Decoding = _Decoding  # noqa: N806 - a class
        for kind in kinds:  # warm-up
            warm = Decoding(*sessions[kind], model, batch, kind is True)
            for _ in range(10):
                warm.step()
        times: dict[object, list[float]] = {kind: [] for kind in kinds}
        ratios, controls = [], []
        for r in range(rounds):
            runs = {kind: Decoding(*sessions[kind], model, batch, kind is True) for kind in kinds}
            round_times: dict[object, list[float]] = {kind: [] for kind in kinds}
            for t in range(steps):  # lockstep: every graph at the same cache length, rotating which goes first
                shift = (r + t) % len(kinds)
                for kind in kinds[shift:] + kinds[:shift]:
                    round_times[kind].append(runs[kind].step())
            for kind in kinds:
                times[kind] += round_times[kind]
            medians = {kind: statistics.median(round_times[kind]) for kind in kinds}
            ratios.append(medians[True] / medians[False])
            controls.append(medians["control"] / medians[False])
        rows.append([batch, steps, rounds, 1000 * statistics.median(times[False]),
                     1000 * statistics.median(times[True]), _summary(ratios), f"{min(ratios):.3f} – {max(ratios):.3f}",
                     _summary(controls)])
    return table("Head-mask inputs at all ones: decoder step, ONNX Runtime CPU (same process, interleaved rounds)",
                 ["batch", "steps", "rounds", "ms/step without masks", "ms/step with masks (all ones)",
                  "ratio (mean ± sd of rounds)", "ratio range", "A/A control: without ÷ without"], rows)


def _summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"
