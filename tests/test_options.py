"""The request options type (``stepwise.serve.options.TranslateOptions``): its defaults are the
schema's, stated once; a bad value is an ``InvalidRequest`` naming the field; it is immutable."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from stepwise.errors import InvalidRequest
from stepwise.serve.options import MAX_BEAM_SIZE, MAX_OUTPUT_TOKENS, OptionsSchema, TranslateOptions

pytestmark = pytest.mark.unit


def test_defaults_are_the_schemas_and_stated_once() -> None:
    fields = dataclasses.fields(TranslateOptions)
    assert [f.name for f in fields] == list(OptionsSchema.model_fields)
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields)
    defaults = TranslateOptions.parse({})
    assert {name: getattr(defaults, name) for name in OptionsSchema.model_fields} == {
        name: field.default for name, field in OptionsSchema.model_fields.items()}
    assert defaults.attention_format == "json" and defaults.beam_size == 1 and defaults.attention == "cross"
    # the service's request schemas take the options' fields as they are
    from stepwise.serve.service import TranslateBatchRequest, TranslateRequest

    for schema in (TranslateRequest, TranslateBatchRequest):
        assert {name: schema.model_fields[name].default for name in OptionsSchema.model_fields} == {
            name: field.default for name, field in OptionsSchema.model_fields.items()}


@pytest.mark.parametrize(("values", "field"), [
    ({"beam_size": 0}, "beam_size"),
    ({"beam_size": MAX_BEAM_SIZE + 1}, "beam_size"),
    ({"beam_size": "2"}, "beam_size"),
    ({"max_length": MAX_OUTPUT_TOKENS + 1}, "max_length"),
    ({"attention": "some"}, "attention"),
    ({"layers": []}, "layers"),
    ({"heads": [-1]}, "heads"),
    ({"mask_heads": {"cross": [[0]]}}, "mask_heads"),
    ({"mask_heads": {"everything": [[0, 1]]}}, "mask_heads"),
    ({"attention_format": "uint8"}, "attention_format"),
    ({"alignment": "fuzzy"}, "alignment"),
    ({"alignment_layer": -1}, "alignment_layer"),
    ({"split": "words"}, "split"),
    ({"colour": "red"}, "colour"),
])
def test_a_bad_value_is_an_invalid_request_naming_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        TranslateOptions.parse(values)
    assert raised.value.field == field and str(raised.value).startswith(f"{field}: ")


def test_options_are_immutable_and_the_head_mask_key_canonical() -> None:
    options = TranslateOptions.parse({"layers": [1, 0], "mask_heads": {"decoder": [[1, 0], [0, 1], [1, 0]],
                                                                        "cross": [[0, 2]], "encoder": []}})
    assert options.layers == (1, 0)  # the order asked for: it is the order of the returned layers
    assert options.mask_key == (("cross", ((0, 2),)), ("decoder", ((0, 1), (1, 0))))
    assert TranslateOptions.parse({"mask_heads": {"cross": []}}).mask_key is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.beam_size = 4  # type: ignore[misc]
    assert options.needs_attention and not TranslateOptions.parse({"attention": "none"}).needs_attention
    assert TranslateOptions.parse({"attention": "none", "alignment": "hard"}).needs_attention
