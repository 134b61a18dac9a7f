"""Translating a batch of requests: what the service's decoding thread runs.

:func:`serve_batch` runs for each batch of :class:`Job` s (:mod:`stepwise.serve.batching` forms
the batches): each job's options are checked against the model that will run it
(:func:`stepwise.serve.options.check_request`), then :func:`translate` decodes the jobs of each
model, those that share search settings in one search. On request it splits a paragraph into
sentences (:mod:`stepwise.serve.sentences`); the answers are shaped by
:mod:`stepwise.serve.responses`. A streamed job decodes in the same search as the others and is
told each target token as the search finds it (:mod:`stepwise.serve.streams`). A ``/score`` job
(one with a ``translation``) is not searched for: :func:`score` teacher-forces its translation
through the export's scorer graph, the jobs of one head mask in one call.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepwise.decode.onnx_runtime import Translation, head_mask_from_pairs
from stepwise.errors import InvalidRequest, StepwiseError
from stepwise.serve.options import DECODE_BATCH, TranslateOptions, check_request
from stepwise.serve.responses import answer
from stepwise.serve.sentences import split_sentences
from stepwise.serve.store import LoadedModel, ModelStore
from stepwise.serve.streams import Emit, StreamClosed, StreamFollowers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One request for the decoding thread: its text, its options, and ``emit`` for a stream;
    with a ``translation`` (``/score``) that translation is teacher-forced instead of searched for."""

    text: str
    options: TranslateOptions
    emit: Emit | None = None
    translation: str | None = None

    @classmethod
    def parse(cls, body: Mapping[str, Any], emit: Emit | None = None) -> Job:
        """A job of a flat ``/translate`` body, in process (its options through :meth:`TranslateOptions.parse`).

        Raises:
            InvalidRequest: an option the schema refuses; ``field`` names it.
        """
        return cls(body["text"], TranslateOptions.parse({k: v for k, v in body.items() if k != "text"}), emit)


def serve_batch(store: ModelStore, jobs: Sequence[Job]) -> list[dict[str, Any] | StepwiseError | None]:
    """What the service's decoding thread runs for each batch (:class:`stepwise.serve.batching.BatchQueue`).

    Each job is checked against the model that will run it (:func:`check_request`), then the jobs
    are translated per model (:func:`translate`). One result per job, in order: its answer, the
    ``stepwise.errors`` exception it failed with (the others still decode), or None for a stream
    whose reader left. ``timings.requests_in_batch`` counts the jobs of the batch.
    """
    log.info("translating a batch of %d request(s)", len(jobs))
    results: list[dict[str, Any] | StepwiseError | None] = [None] * len(jobs)
    by_model: dict[str, tuple[LoadedModel, list[int]]] = {}
    for i, job in enumerate(jobs):
        try:
            loaded = store.get(job.options.model)
            check_request(job.options, loaded)
        except StepwiseError as exc:
            results[i] = exc
            continue
        by_model.setdefault(loaded.id, (loaded, []))[1].append(i)
    for loaded, members in by_model.values():
        answers = translate(loaded, [jobs[i] for i in members])
        for i, result in zip(members, answers, strict=True):
            if isinstance(result, dict):
                result["timings"]["requests_in_batch"] = len(jobs)
            results[i] = result
    return results


def translate(loaded: LoadedModel, jobs: Sequence[Job]) -> list[dict[str, Any] | StepwiseError | None]:
    """Translate checked jobs with one model; those that share search settings decode together.

    With ``split: "sentences"`` a job's text is cut into sentences first; all the sentences of a
    group go to the translator in one call (one batch up to ``DECODE_BATCH``). A text that is one
    sentence is translated as it came, so its answer is the unsplit one. The head mask is part of
    the settings (:attr:`TranslateOptions.search_settings`): jobs switching off different heads
    run as separate batches, each graph run with its own ``[L, H]`` masks.

    A job with an ``emit`` (a stream) decodes in the same batch as the others and is told its
    tokens as the search finds them (the events of :mod:`stepwise.serve.streams`); its answer
    (what the caller sends as the stream's last event) is the one it gets without ``emit``. When
    its ``emit`` raises :class:`StreamClosed` (its reader left), it gets no more events and its
    answer is None; when every job of a search has left, the search stops at that step.
    """
    results: list[dict[str, Any] | StepwiseError | None] = [None] * len(jobs)
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    scoring: dict[tuple[Any, ...] | None, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        if job.translation is None:
            groups[job.options.search_settings].append(i)
        else:
            scoring[job.options.mask_key].append(i)
    for members in scoring.values():
        for i, result in zip(members, score(loaded, [jobs[i] for i in members]), strict=True):
            results[i] = result
    translator = loaded.translator
    for members in groups.values():
        options = jobs[members[0]].options
        texts = [_sentences(loaded, jobs[i]) for i in members]
        flat = [(member, text) for member, own in enumerate(texts) for text in own]
        follow = StreamFollowers(loaded, [(jobs[i].options, own, jobs[i].emit) for i, own in zip(members, texts,
                                                                                               strict=True)])
        try:
            outputs = translator.translate([text for _, text in flat], beam_size=options.beam_size,
                                           max_length=options.max_length, return_attention=options.needs_attention,
                                           batch_size=DECODE_BATCH, head_mask=_head_mask(loaded, options),
                                           on_step=follow if follow.followers else None,
                                           contributions=options.contributions)
        except StreamClosed:  # every job of this search was a stream whose reader left
            continue
        by_member: dict[int, list[Translation]] = defaultdict(list)
        for (member, _), out in zip(flat, outputs, strict=True):
            by_member[member].append(out)
        for member, i in enumerate(members):
            if member not in follow.left:
                results[i] = answer(loaded, jobs[i].options, texts[member], by_member[member])
    return results


def score(loaded: LoadedModel, jobs: Sequence[Job]) -> list[dict[str, Any] | StepwiseError]:
    """Teacher-force checked ``/score`` jobs with one model, all in one call (one head mask).

    With ``split: "sentences"`` both texts are split and paired sentence by sentence; a job whose
    two texts split into different numbers of sentences fails with an InvalidRequest on
    ``translation``. Each answer is shaped as ``/translate`` shapes its own (:func:`answer`).
    """
    results: list[dict[str, Any] | StepwiseError] = []
    pairs: list[tuple[list[str], list[str]]] = []
    for job in jobs:
        assert job.translation is not None
        texts, translations = _sentences(loaded, job), _sentences(loaded, job, target=True)
        if len(texts) != len(translations):
            results.append(InvalidRequest(f"splits into {len(translations)} sentence(s), text into {len(texts)}: "
                                          "split \"sentences\" pairs them one to one", field="translation"))
            pairs.append(([], []))
            continue
        results.append({})
        pairs.append((texts, translations))
    flat = [(member, text, given) for member, (texts, translations) in enumerate(pairs)
            for text, given in zip(texts, translations, strict=True)]
    if flat:
        outputs = loaded.translator.score([text for _, text, _ in flat], [given for _, _, given in flat],
                                          batch_size=DECODE_BATCH, head_mask=_head_mask(loaded, jobs[0].options))
        by_member: dict[int, list[Translation]] = defaultdict(list)
        for (member, _, _), out in zip(flat, outputs, strict=True):
            by_member[member].append(out)
        for member, job in enumerate(jobs):
            if not isinstance(results[member], StepwiseError):
                results[member] = answer(loaded, job.options, pairs[member][0], by_member[member])
    return results


def _head_mask(loaded: LoadedModel, options: TranslateOptions) -> dict[str, np.ndarray] | None:
    """The heads ``options`` switch off as the translator's ``[L, H]`` masks (None: none off)."""
    if options.mask_key is None:
        return None
    translator = loaded.translator
    return head_mask_from_pairs({kind: [list(pair) for pair in pairs] for kind, pairs in options.mask_key},
                                translator.layers, translator.n_heads)


def _sentences(loaded: LoadedModel, job: Job, *, target: bool = False) -> list[str]:
    """The texts to translate for one job: its sentences, or the text itself (``target``: those of
    the translation ``/score`` was given, split by the rules of the model's target language)."""
    text = job.translation if target else job.text
    assert text is not None
    if job.options.split == "none":
        return [text]
    sentences = split_sentences(text, _target_language(loaded) if target else loaded.source_language())
    return sentences if len(sentences) > 1 else [text]


def _target_language(loaded: LoadedModel) -> str:
    """The target side of the export's language pair (``en`` of ``de-en``; ``en`` when unknown)."""
    pair = loaded.translator.manifest.get("config", {}).get("data", {}).get("language_pair") or ""
    side = pair.split("-")[1] if "-" in pair else ""
    return side or "en"
