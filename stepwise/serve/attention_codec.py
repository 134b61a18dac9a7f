"""Compact encodings of attention weights for the service's responses, and their decoder.

Attention weights are probabilities (each row sums to 1, every value lies in ``[0, 1]``). As
nested JSON lists a value costs ~7 bytes; the compact formats below put one array per attention
kind into a small JSON object instead::

    {"format": "uint10", "shape": [L, H, Q, K], "dtype": "<u2", "scale": 1/1023,
     "compression": "zlib", "data": "<base64>"}

* ``float16``: the values as little-endian IEEE half floats, base64 (no compression). Absolute
  error at most 2^-12 ≈ 2.4e-4 on ``[0, 1]``; about 0.4x the JSON bytes.
* ``uint10``: ``q = round(w * 1023)`` stored as little-endian ``uint16``, zlib-deflated, then
  base64; ``w = q * scale``. Absolute error at most 1/2046 ≈ 4.9e-4; about 0.1x the JSON bytes
  (the deflate step removes the six unused high bits and the runs of near-zero weights).

``decode`` reads either (and a plain nested list, for the default ``json`` format), so a client
needs this module and numpy only.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np

FORMATS = ("json", "float16", "uint10")  # "json": nested lists, the service's default
UINT10_LEVELS = 1023  # 2^10 - 1 quantisation steps over [0, 1]
MAX_ERROR = {"float16": 2.0**-12, "uint10": 0.5 / UINT10_LEVELS}  # worst absolute error on [0, 1]


def encode(weights: np.ndarray, fmt: str) -> dict[str, Any]:
    """One attention array as a compact, JSON-ready object (see the module docstring).

    Args:
        weights: attention probabilities of any shape, values in ``[0, 1]``.
        fmt: ``float16`` or ``uint10``.

    Raises:
        ValueError: an unknown format (``json`` needs no encoding).
    """
    weights = np.asarray(weights, dtype=np.float32)
    shape = list(weights.shape)
    if fmt == "float16":
        raw = weights.astype("<f2").tobytes()
        return {"format": fmt, "shape": shape, "dtype": "<f2", "data": base64.b64encode(raw).decode("ascii")}
    if fmt == "uint10":
        quantised = np.rint(np.clip(weights, 0.0, 1.0) * UINT10_LEVELS).astype("<u2")
        raw = zlib.compress(quantised.tobytes(), 6)
        return {"format": fmt, "shape": shape, "dtype": "<u2", "scale": 1.0 / UINT10_LEVELS, "compression": "zlib",
                "data": base64.b64encode(raw).decode("ascii")}
    raise ValueError(f"unknown attention format {fmt!r} (one of {', '.join(FORMATS)})")


def decode(payload: Any) -> np.ndarray:
    """An attention array back from :func:`encode`'s object, or from nested JSON lists, as float32.

    Raises:
        ValueError: an unknown format, or data that does not fill the stated shape.
    """
    if not isinstance(payload, dict):
        return np.asarray(payload, dtype=np.float32)
    raw = base64.b64decode(payload["data"])
    if payload.get("compression") == "zlib":
        try:
            raw = zlib.decompress(raw)
        except zlib.error as exc:
            raise ValueError(f"attention data is not zlib-deflated: {exc}") from None
    elif payload.get("compression") not in (None, "none"):
        raise ValueError(f"unknown attention compression {payload['compression']!r}")
    if payload.get("format") not in MAX_ERROR:
        raise ValueError(f"unknown attention format {payload.get('format')!r}")
    values = np.frombuffer(raw, dtype=np.dtype(payload["dtype"]))
    shape = tuple(payload["shape"])
    if values.size != int(np.prod(shape)):
        raise ValueError(f"attention data holds {values.size} values, shape {list(shape)} needs {int(np.prod(shape))}")
    values = values.reshape(shape).astype(np.float32)
    return values * np.float32(payload["scale"]) if "scale" in payload else values


def encode_all(attention: dict[str, np.ndarray], fmt: str) -> dict[str, Any]:
    """Every kind of a response's ``attention`` in ``fmt``; ``json`` leaves the arrays as they are."""
    if fmt == "json":
        return attention
    return {kind: encode(weights, fmt) for kind, weights in attention.items()}


def decode_all(attention: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every kind of a response's ``attention`` as float32 arrays ``[layer][head][query][key]``."""
    return {kind: decode(payload) for kind, payload in attention.items()}
