"""Promotion by tag, with a BLEU gate.

``promote(candidate)`` re-scores the candidate and the version that currently carries the tag
on the same held-out sentences, and refuses when the candidate is worse by more than
``margin`` BLEU (unless forced). The figures are recorded on the candidate's metadata either
way, so the registry shows why a version was (or was not) promoted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from stepwise.errors import StepwiseError
from stepwise.registry import client as registry
from stepwise.train.checkpoint import load_checkpoint
from stepwise.train.data import load_split
from stepwise.train.evaluate import evaluate_bleu

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


def score_version(model_id: str, *, split: str = "valid", sentences: int = 100, beam_size: int = 1) -> float:
    """BLEU of a registered version on the first ``sentences`` pairs of ``split`` of its own corpus."""
    checkpoint = load_checkpoint(registry.download(model_id))
    pairs = load_split(checkpoint.config.data, split)
    bleu, _ = evaluate_bleu(checkpoint.build_model(), checkpoint.tokenizer(), pairs, beam_size=beam_size,
                            limit=sentences)
    return bleu


def promote(
    model_id: str, *, tag: str = registry.PRODUCTION, margin: float = 1.0, force: bool = False,
    publish: bool = False, split: str = "valid", sentences: int = 100,
) -> GateResult:
    """Move ``tag`` to ``model_id`` after the BLEU gate; see the module docstring.

    Raises:
        PromotionRefused: the candidate is worse than the current holder by more than ``margin``.
    """
    candidate = registry.get_version(model_id)
    holders = [v for v in registry.list_versions(name=candidate.name, tag=tag)
               if v.project == candidate.project and v.id != model_id]
    current = holders[0] if holders else None
    candidate_bleu = score_version(model_id, split=split, sentences=sentences)
    current_bleu = score_version(current.id, split=split, sentences=sentences) if current else None
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
