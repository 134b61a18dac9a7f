"""How far apart two versions' attention is, head by head: Jensen–Shannon divergence.

For one attention kind, layer and head, each query position has a distribution over keys in
either version. Their Jensen–Shannon divergence (base 2, so between 0 = the same and 1 =
disjoint) is averaged over the query positions both versions share:

* ``encoder``: every source position (the same tokenizer gives the same source tokens).
* ``cross`` and ``decoder``: a query position's attention depends on the target tokens before
  it, so only the rows whose decoder inputs are the same compare like with like: the first
  ``p + 1`` rows, where ``p`` is the length of the common prefix of the two target sequences
  (the row that produced the first differing token is still compared: it saw the same inputs).
  When the targets are the same, that is every row.
* Different source tokens (versions with different tokenizers): nothing is compared.

Pure numpy, no Gradio: ``stepwise.explorer.views`` draws what this computes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence (base 2) between distributions along the last axis.

    Args:
        p: ``[..., K]`` rows summing to 1.
        q: the same shape.

    Returns:
        ``[...]``: one value in [0, 1] per row.
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> np.ndarray:
        return np.where(a > 0, a * (np.log2(np.maximum(a, EPS)) - np.log2(np.maximum(m, EPS))), 0.0).sum(-1)

    return np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, 1.0)


def common_prefix(a: list[str], b: list[str]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compared_rows(a: dict[str, Any], b: dict[str, Any], kind: str) -> int:
    """How many query rows of ``kind`` the two translations share (see the module docstring); 0 = none."""
    if a["source_tokens"] != b["source_tokens"]:
        return 0
    if kind == "encoder":
        return len(a["source_tokens"])
    ta, tb = a["target_tokens"], b["target_tokens"]
    return min(common_prefix(ta, tb) + 1, len(ta), len(tb))


def head_divergence(a: dict[str, Any], b: dict[str, Any], kind: str) -> np.ndarray | None:
    """Per layer × head, the JS divergence of two translations' attention averaged over shared queries.

    Args:
        a: one translation as the service returns it (``source_tokens``, ``target_tokens``,
            ``attention[kind][layer][head][query][key]``).
        b: the same sentence translated by another version with the same layer and head counts.
        kind: ``encoder``, ``decoder`` or ``cross``.

    Returns:
        ``[layers, heads]``, or None when no query position can be compared (different source
        tokens, or an empty translation).
    """
    rows = compared_rows(a, b, kind)
    if rows == 0:
        return None
    wa = np.asarray(a["attention"][kind], dtype=np.float64)[:, :, :rows]  # [L, H, Q, K]
    wb = np.asarray(b["attention"][kind], dtype=np.float64)[:, :, :rows]
    if wa.shape != wb.shape:  # a decoder row's keys are the same prefix: trim to the shorter key axis
        keys = min(wa.shape[-1], wb.shape[-1])
        if wa.shape[:2] != wb.shape[:2]:
            return None
        wa, wb = wa[..., :keys], wb[..., :keys]
    return js_divergence(wa, wb).mean(axis=-1)
