"""A small HTTP client for the translation service, with errors a person can read.

Attention is requested in the compact ``uint10`` format (about a tenth of the JSON bytes, within
5e-4 of it) and decoded here, so callers get float32 arrays ``[layer][head][query][key]``.
"""

from __future__ import annotations

from typing import Any

import requests

from stepwise.attention_codec import decode_all


class ServiceError(Exception):
    """The service is unreachable or refused the request; the message is for the UI."""


class TranslationClient:
    """Calls ``POST /translate`` on a running ``bentoml serve``."""

    def __init__(self, api: str, timeout: float = 120.0, attention_format: str = "uint10") -> None:
        self.api = api.rstrip("/")
        self.timeout = timeout
        self.attention_format = attention_format

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            answer = requests.post(f"{self.api}{path}", json=body, timeout=self.timeout)
        except requests.ConnectionError:
            raise ServiceError(f"The translation service at {self.api} is not reachable. Is `bentoml serve` "
                               "running? Start it from the repository root and try again.") from None
        except requests.Timeout:
            raise ServiceError(f"The translation service at {self.api} did not answer within "
                               f"{self.timeout:.0f} seconds.") from None
        except requests.RequestException as exc:
            raise ServiceError(f"Could not talk to the translation service at {self.api}: "
                               f"{type(exc).__name__}.") from None
        if answer.status_code >= 400:
            try:
                message = answer.json().get("error") or answer.text
                detail = answer.json().get("detail") or []
                fields = ", ".join(".".join(map(str, d.get("loc", []))) + f": {d.get('msg')}" for d in detail)
                message = fields or message
            except ValueError:
                message = answer.text[:300]
            raise ServiceError(f"The service refused the request ({answer.status_code}): {message}")
        try:
            return answer.json()
        except ValueError:
            raise ServiceError("The service answered with something that is not JSON.") from None

    def translate(self, text: str, *, beam_size: int = 1, model: str | None = None, attention: str = "all",
                  split: str = "none", alignment: str = "none", alignment_layer: int | str | None = None,
                  alignment_head: int | str | None = None,
                  mask_heads: dict[str, list[list[int]]] | None = None) -> dict[str, Any]:
        """One translation with the attention kinds asked for, decoded to float32 arrays.

        Args:
            text: the sentence (or, with ``split="sentences"``, a paragraph).
            beam_size: the beam width.
            model: a tag or version id; None = the service's default.
            attention: ``none``, ``cross`` or ``all``.
            split: ``sentences`` to have a paragraph split and each sentence's attention in
                ``sentences`` (decoded too); ``none`` translates the text as one input.
            alignment: ``none``, ``soft`` or ``hard`` word alignments.
            alignment_layer: the cross-attention layer to align with (0-based) or ``average``.
            alignment_head: the head to align with (0-based) or ``average``.
            mask_heads: heads to switch off, per kind ``[[layer, head], ...]`` (0-based).
        """
        body: dict[str, Any] = {"text": text, "beam_size": int(beam_size), "attention": attention,
                                "attention_format": self.attention_format}
        if model:
            body["model"] = model
        if mask_heads:
            body["mask_heads"] = mask_heads
        if split != "none":
            body["split"] = split
        if alignment != "none":
            body["alignment"] = alignment
            for field, value in (("alignment_layer", alignment_layer), ("alignment_head", alignment_head)):
                if value is not None:
                    body[field] = value
        result = self._post("/translate", body)
        try:
            for part in (result, *result.get("sentences", ())):  # a split paragraph: attention per sentence
                part["attention"] = decode_all(part.get("attention") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceError(f"The service's attention could not be decoded: {exc}.") from None
        return result

    def describe(self) -> dict[str, Any]:
        """``POST /model``: the version that answers by default, and on which provider."""
        return self._post("/model", {})

    def reload(self) -> dict[str, Any]:
        """``POST /reload``: re-resolve ``production`` and swap it in if it changed."""
        return self._post("/reload", {})
