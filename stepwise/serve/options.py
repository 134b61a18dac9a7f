"""A translation request's options and the service's limits, each stated once.

:class:`OptionsSchema` is the HTTP schema of the options every translation endpoint takes (its
defaults and ranges are the only ones; the service's request schemas add ``text`` or ``texts``);
``/score`` takes :class:`AnswerOptionsSchema`, the same less the search's ``beam_size`` and
``max_length``.
:class:`TranslateOptions` is what the rest of the service works with: built once from the values
the schema validated, frozen, and handed unchanged to the search, the stream followers and the
response shaping. :func:`check_request` checks it against the model that will run it.

Every request limit is one constant here; ``/model`` reports them all (:func:`limits`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, with_config
from typing_extensions import TypedDict

from stepwise.decode.onnx_runtime import TOP_K
from stepwise.errors import InvalidRequest
from stepwise.serve import alignment, attention_codec

if TYPE_CHECKING:
    from stepwise.serve.store import LoadedModel

# -- limits (the schemas, the check against the model and /model use these) -----------------------
MAX_TEXT_CHARS = int(os.environ.get("STEPWISE_MAX_TEXT_CHARS", "2000"))  # characters per sentence
MAX_BATCH_TEXTS = int(os.environ.get("STEPWISE_MAX_BATCH_TEXTS", "64"))  # sentences per /translate_batch
MAX_OUTPUT_TOKENS = 1024  # most target tokens a request may ask for (the model's positions cut it further)
MAX_BEAM_SIZE = TOP_K  # the exporter's top-K: the widest beam a decoder graph supports
DECODE_BATCH = 64  # sentences decoded together (and most requests the service's queue merges into one batch)

ATTENTION_KINDS = {"none": (), "cross": ("cross",), "all": ("encoder", "decoder", "cross")}
ATTENTION_FORMATS = attention_codec.FORMATS  # how a response carries attention ("json": nested lists)

Kind = Literal["encoder", "decoder", "cross"]
Attention = Literal["none", "cross", "all"]  # the keys of ATTENTION_KINDS
AttentionFormat = Literal["json", "float16", "uint10"]  # ATTENTION_FORMATS
Alignment = Literal["none", "soft", "hard"]
Split = Literal["none", "sentences"]
IndexOrAverage = int | Literal["average"]
Index = Annotated[int, Field(ge=0)]  # a 0-based layer or head index (the schema publishes the bound)
HeadPair = Annotated[list[Index], Field(min_length=2, max_length=2)]  # [layer, head]


@with_config(ConfigDict(extra="forbid"))
class MaskHeads(TypedDict, total=False):
    """``mask_heads``: per attention kind, the ``[layer, head]`` pairs switched off (a plain dict)."""

    encoder: list[HeadPair]
    decoder: list[HeadPair]
    cross: list[HeadPair]


def limits() -> dict[str, int]:
    """Every request limit, as ``GET /model`` reports them under ``limits``."""
    return {"max_text_chars": MAX_TEXT_CHARS, "max_batch_texts": MAX_BATCH_TEXTS,
            "max_output_tokens": MAX_OUTPUT_TOKENS, "max_beam_size": MAX_BEAM_SIZE, "decode_batch": DECODE_BATCH}


class AnswerOptionsSchema(BaseModel):
    """The options of what an answer carries (attention, alignment, contributions, the model, the
    split), shared by every translation endpoint and ``/score``: their HTTP schema, defaults and ranges."""

    model_config = ConfigDict(extra="forbid", strict=True)

    attention: Attention = Field(default="cross", description="attention kinds to return")
    layers: Annotated[list[Index], Field(min_length=1)] | None = Field(
        default=None, description="only these layers (0-based)")
    heads: Annotated[list[Index], Field(min_length=1)] | None = Field(
        default=None, description="only these heads (0-based)")
    model: str | None = Field(default=None, description="a registry tag or version id (default: production)")
    mask_heads: MaskHeads | None = Field(
        default=None, description="heads to switch off (ablation): per kind [[layer, head], ...], 0-based")
    attention_format: AttentionFormat = Field(
        default="json", description="json: nested lists; float16 / uint10: compact base64 arrays "
                                    "(stepwise.serve.attention_codec)")
    alignment: Alignment = Field(
        default="none", description="word alignment from cross-attention: soft = word matrix, hard = Pharaoh i-j")
    alignment_layer: Index | Literal["average"] | None = Field(
        default=None, description="cross-attention layer to align with, or average (the default)")
    alignment_head: Index | Literal["average"] | None = Field(
        default=None, description="head to align with, or average (the default)")
    split: Split = Field(
        default="none", description="sentences: split a paragraph, translate the sentences as one batch, join")
    contributions: bool = Field(
        default=False, description="add contributions: per target token the share of its prediction from the "
                                   "source (source_share), per source token how much it contributed (ALTI+)")



class OptionsSchema(AnswerOptionsSchema):
    """The options of every translation endpoint: the search's, then :class:`AnswerOptionsSchema`'s."""

    beam_size: int = Field(default=1, ge=1, le=MAX_BEAM_SIZE, description="1 = greedy search")
    max_length: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS,
                                   description="most target tokens (default 2 x source + 10)")


HeadPairs = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TranslateOptions:
    """One request's options, as :class:`OptionsSchema` validated them (its fields, its defaults).

    Lists become tuples (the object is immutable); ``mask_heads`` keeps the pairs in the order
    given (the kinds in MaskHeads's order), :attr:`mask_key` is the same set of heads as a canonical key.
    """

    attention: Attention
    layers: tuple[int, ...] | None
    heads: tuple[int, ...] | None
    model: str | None
    mask_heads: tuple[tuple[Kind, HeadPairs], ...] | None
    attention_format: AttentionFormat
    alignment: Alignment
    alignment_layer: IndexOrAverage | None
    alignment_head: IndexOrAverage | None
    split: Split
    contributions: bool
    beam_size: int
    max_length: int | None

    @classmethod
    def from_schema(cls, values: Mapping[str, Any]) -> TranslateOptions:
        """The options of values :class:`OptionsSchema` (or a request schema built on it) validated.

        ``values`` may hold other fields of the request (``text``); they are not options.
        """
        fields = {field.name: values[field.name] for field in dataclasses.fields(cls)}
        for name in ("layers", "heads"):
            if fields[name] is not None:
                fields[name] = tuple(fields[name])
        if fields["mask_heads"] is not None:
            fields["mask_heads"] = tuple((kind, tuple((int(layer), int(head)) for layer, head in pairs))
                                         for kind, pairs in fields["mask_heads"].items())
        return cls(**fields)

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> TranslateOptions:
        """Options from unvalidated values (fields left out take the schema's defaults).

        Raises:
            InvalidRequest: a value the schema refuses; ``field`` names it.
        """
        try:
            schema = OptionsSchema.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0]) if error["loc"] else None
            raise InvalidRequest(error["msg"], field=field) from None
        return cls.from_schema({name: getattr(schema, name) for name in OptionsSchema.model_fields})

    @property
    def needs_attention(self) -> bool:
        """Whether the search must record attention: some is returned, or an alignment is made of it."""
        return self.attention != "none" or self.alignment != "none"

    @property
    def mask_key(self) -> tuple[tuple[Kind, HeadPairs], ...] | None:
        """The heads switched off as a canonical key (None: none off, the plain model)."""
        key = tuple(sorted((kind, tuple(sorted(set(pairs)))) for kind, pairs in self.mask_heads or () if pairs))
        return key or None

    @property
    def search_settings(self) -> tuple[Any, ...]:
        """What requests decoding in one search must share: beam, length budget, attention, head mask,
        and whether the translations are scored for their contributions."""
        return self.beam_size, self.max_length, self.needs_attention, self.mask_key, self.contributions


def check_request(options: TranslateOptions, loaded: LoadedModel) -> None:
    """The request's options against the model that will run it (the schema checked the rest).

    Raises:
        InvalidRequest: a beam wider than the export's top-K, or a layer or head the model lacks
            (``layers``, ``heads``, or a ``mask_heads`` pair).
    """
    translator = loaded.translator
    if options.beam_size > translator.top_k:
        raise InvalidRequest(f"{options.beam_size} is wider than this model's export supports "
                             f"({translator.top_k})", field="beam_size")
    counts = loaded.layer_counts()
    for index in options.layers or ():
        for kind in ATTENTION_KINDS[options.attention]:
            if index >= counts[kind]:
                raise InvalidRequest(f"index {index} out of range ({kind} attention has {counts[kind]} layers)",
                                     field="layers")
    bad_heads = [i for i in options.heads or () if i >= translator.n_heads]
    if bad_heads:
        raise InvalidRequest(f"index {bad_heads[0]} out of range (the model has {translator.n_heads} heads)",
                             field="heads")
    for kind, pairs in options.mask_heads or ():
        for layer, head in pairs:
            if layer >= counts[kind] or head >= translator.n_heads:
                raise InvalidRequest(f"{kind} [{layer}, {head}] out of range ({kind} attention has {counts[kind]} "
                                     f"layers of {translator.n_heads} heads)", field="mask_heads")
    _check_alignment(options, counts["cross"], translator.n_heads)


def _check_alignment(options: TranslateOptions, layers: int, heads: int) -> None:
    """``alignment_layer``/``alignment_head``: in range, and only with an alignment asked for."""
    for field, value, count, what in (("alignment_layer", options.alignment_layer, layers, "cross-attention layers"),
                                      ("alignment_head", options.alignment_head, heads, "heads")):
        if value is None:
            continue
        if options.alignment == "none":
            raise InvalidRequest('only with alignment "soft" or "hard"', field=field)
        if value != alignment.AVERAGE and value >= count:
            raise InvalidRequest(f"index {value} out of range (the model has {count} {what})", field=field)
