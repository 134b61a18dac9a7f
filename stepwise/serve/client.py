"""A small HTTP client for the translation service, with errors a person can read.

Attention is requested in the compact ``uint10`` format (about a tenth of the JSON bytes, within
5e-4 of it) and decoded here, so callers get float32 arrays ``[layer][head][query][key]``.
:meth:`TranslationClient.translate_stream` reads ``POST /translate_stream`` (server-sent events)
and yields a :class:`Decoding` after each event, then the same result ``translate`` returns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests

from stepwise.serve.attention_codec import decode, decode_all


class ServiceError(Exception):
    """The service is unreachable or refused the request; the message is for the UI."""


@dataclass
class Decoding:
    """A translation while it streams: the source sentences and the target tokens decoded so far.

    Attributes:
        sources: each sentence's source tokens (one sentence unless a paragraph was split).
        tokens: the target tokens so far, in the final answer's order.
        sentence: the sentence each target token belongs to.
        cross: each token's cross-attention row ``[layer][head][source]`` (float32), when asked.
    """

    sources: list[list[str]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    sentence: list[int] = field(default_factory=list)
    cross: list[np.ndarray] = field(default_factory=list)

    def apply(self, event: str, data: dict[str, Any]) -> None:
        """Take in one ``start``, ``token`` or ``replace`` event."""
        if event == "start":
            self.sources = [s["source_tokens"] for s in data["sentences"]]
        elif event == "replace":  # the beam's best hypothesis changed from position "from" on
            for column in (self.tokens, self.sentence, self.cross):
                del column[data["from"]:]
        elif event == "token":
            if data["index"] != len(self.tokens):
                raise ServiceError(f"The stream skipped to token {data['index']} after {len(self.tokens)}.")
            self.tokens.append(data["token"])
            self.sentence.append(data["sentence"])
            if "cross_attention" in data:
                self.cross.append(decode(data["cross_attention"]))


def server_sent_events(lines: Iterator[bytes]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(event, data)`` pairs of a ``text/event-stream`` body, given its lines (each event's data is one JSON line)."""
    event, data = "message", b""
    for line in lines:
        if not line:  # a blank line ends an event
            if data:
                yield event, json.loads(data)
            event, data = "message", b""
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data += line[5:].strip()


class TranslationClient:
    """Calls ``POST /translate`` (and ``/translate_stream``) on a running ``bentoml serve``."""

    def __init__(self, api: str, timeout: float = 120.0, attention_format: str = "uint10") -> None:
        self.api = api.rstrip("/")
        self.timeout = timeout
        self.attention_format = attention_format

    def _send(self, path: str, body: dict[str, Any], *, stream: bool = False) -> requests.Response:
        """POST ``body``; a refusal or an unreachable service is a :class:`ServiceError`."""
        try:
            answer = requests.post(f"{self.api}{path}", json=body, timeout=self.timeout, stream=stream)
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
        return answer

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        answer = self._send(path, body)
        try:
            return answer.json()
        except ValueError:
            raise ServiceError("The service answered with something that is not JSON.") from None

    def translate(self, text: str, *, beam_size: int = 1, model: str | None = None, attention: str = "all",
                  split: str = "none", alignment: str = "none", alignment_layer: int | str | None = None,
                  alignment_head: int | str | None = None,
                  mask_heads: dict[str, list[list[int]]] | None = None, contributions: bool = False) -> dict[str, Any]:
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
            contributions: add ``contributions`` (``source_share`` per target token, ``source`` per
                source token).
        """
        return self._decoded(self._post("/translate", self._body(text, beam_size=beam_size, model=model,
                                                              attention=attention, split=split, alignment=alignment,
                                                              alignment_layer=alignment_layer,
                                                              alignment_head=alignment_head, mask_heads=mask_heads,
                                                              contributions=contributions)))

    def score(self, text: str, translation: str, **options: Any) -> dict[str, Any]:
        """``POST /score``: a given translation of ``text`` teacher-forced, attention decoded to arrays.

        Takes :meth:`translate`'s options except ``beam_size``. The answer is shaped as
        :meth:`translate`'s, plus ``log_probs`` per target token (``score`` is their sum).
        """
        if "beam_size" in options:
            raise TypeError("score() takes no beam_size: the translation is given, not searched for")
        body = self._body(text, **options)
        del body["beam_size"]
        body["translation"] = translation
        return self._decoded(self._post("/score", body))

    def translate_stream(self, text: str, **options: Any) -> Iterator[Decoding | dict[str, Any]]:
        """:meth:`translate` as it is decoded: a :class:`Decoding` after each event, then the result.

        Takes :meth:`translate`'s options. The last item is the dict :meth:`translate` would return.

        Raises:
            ServiceError: the request is refused, the stream reports an error, or it ends early.
        """
        answer = self._send("/translate_stream", self._body(text, **options), stream=True)
        decoding = Decoding()
        try:
            for event, data in server_sent_events(answer.iter_lines()):
                if event == "done":
                    yield self._decoded(data)
                    return
                if event == "error":
                    raise ServiceError(f"The translation failed: {data.get('error')}")
                decoding.apply(event, data)
                yield decoding
        except requests.RequestException as exc:
            raise ServiceError(f"The translation stream broke: {type(exc).__name__}.") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceError(f"The service's stream could not be read: {exc}.") from None
        finally:
            answer.close()
        raise ServiceError("The translation stream ended before the translation was complete.")

    def _body(self, text: str, *, beam_size: int = 1, model: str | None = None, attention: str = "all",
              split: str = "none", alignment: str = "none", alignment_layer: int | str | None = None,
              alignment_head: int | str | None = None,
              mask_heads: dict[str, list[list[int]]] | None = None, contributions: bool = False) -> dict[str, Any]:
        """The request body of :meth:`translate`'s arguments."""
        body: dict[str, Any] = {"text": text, "beam_size": int(beam_size), "attention": attention,
                                "attention_format": self.attention_format}
        if model:
            body["model"] = model
        if mask_heads:
            body["mask_heads"] = mask_heads
        if split != "none":
            body["split"] = split
        if contributions:
            body["contributions"] = True
        if alignment != "none":
            body["alignment"] = alignment
            for field_name, value in (("alignment_layer", alignment_layer), ("alignment_head", alignment_head)):
                if value is not None:
                    body[field_name] = value
        return body

    @staticmethod
    def _decoded(result: dict[str, Any]) -> dict[str, Any]:
        """A result with its attention decoded to float32 arrays (each sentence's too)."""
        try:
            for part in (result, *result.get("sentences", ())):  # a split paragraph: attention per sentence
                part["attention"] = decode_all(part.get("attention") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceError(f"The service's attention could not be decoded: {exc}.") from None
        return result

    def describe(self) -> dict[str, Any]:
        """``POST /model``: the version that answers by default, on which provider, and the limits."""
        return self._post("/model", {})

    def max_beam_size(self) -> int:
        """The widest beam the service's default model takes (``/model``'s ``max_beam_size``).

        Raises:
            ServiceError: the service cannot be reached or does not say.
        """
        try:
            return int(self.describe()["max_beam_size"])
        except (KeyError, TypeError, ValueError):
            raise ServiceError("The service's /model does not report max_beam_size.") from None

    def reload(self) -> dict[str, Any]:
        """``POST /reload``: re-resolve ``production`` and swap it in if it changed."""
        return self._post("/reload", {})
