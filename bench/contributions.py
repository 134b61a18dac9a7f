"""The source-share sanity check of the contributions (issue 22): ``python -m bench contributions``.

Each of the 94 gold verses' English reference (:mod:`bench.gold`) is scored through the export's
scorer graph twice: against its own German source and against another verse's source (the verse
``shift`` places further on, for several shifts). A contribution rule that measures what it says
gives a reference less from a source that is not its own: the mismatched pair should have the
lower mean source share (the mean over the reference's tokens of ``contributions.source_share``)
in at least 95% of the pairs. The table reports that share per shift and over all shifts, with the
mean source shares of both kinds of pair.

``--checkpoint`` exports the checkpoint first (into a temporary folder); ``--export`` takes an
export directory as it is. Results go to ``bench/results/contributions-DEVICE.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import table, write_results
from bench.gold import read_gold

TARGET = 0.95
SHIFTS = (1, 2, 3, 5, 8)


def mean_source_shares(translator: object, sources: list[str], references: list[str]) -> np.ndarray:
    """Each pair's mean source share over the reference's tokens (the scorer graph, in batches)."""
    scored = translator.score(sources, references)  # type: ignore[attr-defined]
    return np.array([np.mean(out.contributions["source_share"]) for out in scored])


def check(translator: object) -> tuple[list[str], float]:
    """The sections of the results page and the share of pairs over all shifts where the mismatched
    pair has the lower mean source share."""
    verses = read_gold()
    sources, references = [v.source for v in verses], [v.reference for v in verses]
    own = mean_source_shares(translator, sources, references)
    rows, wins, pairs = [], 0, 0
    for shift in SHIFTS:
        others = sources[shift:] + sources[:shift]
        mismatched = mean_source_shares(translator, others, references)
        lower = int((mismatched < own).sum())
        wins, pairs = wins + lower, pairs + len(verses)
        rows.append([f"verse + {shift}", f"{lower}/{len(verses)}", lower / len(verses), float(own.mean()),
                     float(mismatched.mean())])
    rows.append(["all shifts", f"{wins}/{pairs}", wins / pairs, float(own.mean()), "—"])
    share = wins / pairs
    verdict = "met" if share >= TARGET else "not met"
    section = table(
        f"Mismatched source has the lower mean source share ({len(verses)} gold verses; target ≥ {TARGET:.0%}: "
        f"{verdict})", ["mismatched source", "pairs where lower", "share", "mean source share, own source",
                        "mean source share, other source"], rows)
    return [section], share


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench contributions", description=__doc__.splitlines()[0])
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--checkpoint", help="a checkpoint to export and check")
    given.add_argument("--export", help="an export directory (format 5)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    from stepwise.decode.onnx_runtime import OnnxTranslator

    model = preset = None
    if args.checkpoint:
        from bench.__main__ import describe
        from stepwise.export import export_checkpoint
        from stepwise.train.checkpoint import load_checkpoint

        export = Path(tempfile.mkdtemp(prefix="stepwise-bench-")) / "export"
        export_checkpoint(load_checkpoint(args.checkpoint), export)
        model, preset = describe(Path(args.checkpoint))
    else:
        export = Path(args.export)
    sections, share = check(OnnxTranslator(export, device="cpu"))
    write_results("contributions", sections, "cpu", Path(args.out) if args.out else None, model, preset)
    return 0 if share >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
