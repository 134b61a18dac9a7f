"""Promotion by tag, with a BLEU gate on the ONNX exports.

``promote(candidate)`` re-scores the candidate and the version that currently carries the tag
on the same held-out sentences, and refuses when the candidate is worse by more than
``margin`` BLEU (unless forced). The figures are recorded on the candidate's metadata either
way, so the registry shows why a version was (or was not) promoted.

Each version is scored through its registered ONNX export (:func:`registry.find_export`) with
ONNX Runtime: the search loop and runtime the service answers with, and no torch, so the CLI's
``stepwise promote`` and the explorer's admin promotion run it anywhere the service could. A
version without an export is an error that says how to make one (``stepwise export --model-id``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from stepwise.config import Config
from stepwise.decode.onnx_runtime import EXPORT_FORMAT, OnnxTranslator, export_format
from stepwise.errors import ExportFormatError, ModelNotFound, StepwiseError
from stepwise.registry import client as registry
from stepwise.train.corpus import corpus_bleu, load_split

log = logging.getLogger(__name__)


class PromotionRefused(StepwiseError):
    """The gate found the candidate worse than the current version by more than the margin."""


@dataclass
class GateResult:
    """What the gate compared."""

    candidate_id: str
    candidate_bleu: float
    current_id: str | None
    current_bleu: float | None
    sentences: int
    split: str

    @property
    def delta(self) -> float | None:
        return None if self.current_bleu is None else self.candidate_bleu - self.current_bleu


def export_dir(model_id: str) -> Path:
    """The downloaded ONNX export of a registered version.

    Raises:
        ModelNotFound: the version has no registered export (the message says how to make one).
        ExportFormatError: its export was written by another version of the exporter.
    """
    export = registry.find_export(model_id)
    if export is None:
        raise ModelNotFound(f"version {model_id} has no registered ONNX export to score: "
                            f"run `stepwise export --model-id {model_id}` first")
    path = registry.download_export(export.id)
    found = export_format(path)
    if found != EXPORT_FORMAT:
        raise ExportFormatError(f"version {model_id}: its export {export.id} has format {found}, this stepwise "
                                f"reads {EXPORT_FORMAT}: run `stepwise export --model-id {model_id}` again")
    return path


def score_export(path: Path, *, split: str = "valid", sentences: int = 100, beam_size: int = 1) -> float:
    """BLEU of an export directory on the first ``sentences`` pairs of ``split`` of its own corpus."""
    translator = OnnxTranslator(path)
    config = Config.from_dict(translator.manifest["config"])
    pairs = load_split(config.data, split)
    pairs = pairs[:sentences] if sentences else pairs
    outputs = translator.translate([source for source, _ in pairs], beam_size=beam_size)
    return corpus_bleu([out.translation for out in outputs], [target for _, target in pairs])


def score_version(model_id: str, *, split: str = "valid", sentences: int = 100, beam_size: int = 1) -> float:
    """BLEU of a registered version's ONNX export on the first ``sentences`` pairs of ``split``.

    Raises:
        ModelNotFound: the version has no registered export.
    """
    return score_export(export_dir(model_id), split=split, sentences=sentences, beam_size=beam_size)


def promote(
    model_id: str, *, tag: str = registry.PRODUCTION, margin: float = 1.0, force: bool = False,
    publish: bool = False, split: str = "valid", sentences: int = 100,
) -> GateResult:
    """Move ``tag`` to ``model_id`` after the BLEU gate; see the module docstring.

    Both exports are fetched before either is scored, so a missing one fails at once.

    Raises:
        PromotionRefused: the candidate is worse than the current holder by more than ``margin``.
        ModelNotFound: no such version, or the candidate or the current holder has no ONNX export.
    """
    candidate = registry.get_version(model_id)
    holders = [v for v in registry.list_versions(name=candidate.name, tag=tag)
               if v.project == candidate.project and v.id != model_id]
    current = holders[0] if holders else None
    candidate_export = export_dir(model_id)
    current_export = export_dir(current.id) if current else None
    candidate_bleu = score_export(candidate_export, split=split, sentences=sentences)
    current_bleu = None if current_export is None else score_export(current_export, split=split,
                                                                     sentences=sentences)
    result = GateResult(model_id, candidate_bleu, current.id if current else None, current_bleu, sentences, split)
    refused = current_bleu is not None and candidate_bleu < current_bleu - margin
    registry.set_metadata(model_id, {
        "gate_candidate_bleu": round(candidate_bleu, 2),
        "gate_current_bleu": "" if current_bleu is None else round(current_bleu, 2),
        "gate_current_id": current.id if current else "",
        "gate_split": f"{split}[:{sentences}]",
        "gate_result": "refused" if refused and not force else ("forced" if refused else "passed"),
    })
    if refused and not force:
        raise PromotionRefused(
            f"candidate {model_id} BLEU {candidate_bleu:.2f} is worse than current {tag} {current.id} "
            f"BLEU {current_bleu:.2f} by more than {margin:g}; use --force to promote anyway")
    registry.set_tag(model_id, tag, exclusive=True)
    if publish:
        registry.publish(model_id)
    log.info("promoted %s to %s (BLEU %.2f vs %s)", model_id, tag, candidate_bleu,
             "none" if current_bleu is None else f"{current_bleu:.2f}")
    return result
