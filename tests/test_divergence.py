"""The version diff's divergence: Jensen–Shannon per head, over the query rows two translations share."""

from __future__ import annotations

import numpy as np
import pytest

from stepwise.explorer.divergence import compared_rows, head_divergence, js_divergence

pytestmark = pytest.mark.unit


def test_js_divergence_known_values() -> None:
    p = np.array([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]])
    q = np.array([[0.0, 1.0], [0.5, 0.5], [0.75, 0.25]])
    # disjoint = 1 bit, identical = 0; (0.25, 0.75) vs (0.75, 0.25): m = (0.5, 0.5), KL = 1 - H(0.25) bits
    h = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
    assert np.allclose(js_divergence(p, q), [1.0, 0.0, 1.0 - h])
    assert np.allclose(js_divergence(q, p), js_divergence(p, q))


def _result(source: list[str], target: list[str], seed: int, layers: int = 2, heads: int = 3) -> dict:
    rng = np.random.default_rng(seed)

    def rows(q: int, k: int) -> list:
        w = rng.random((layers, heads, q, k))
        return (w / w.sum(-1, keepdims=True)).tolist()

    return {"source_tokens": source, "target_tokens": target,
            "attention": {"encoder": rows(len(source), len(source)), "cross": rows(len(target), len(source)),
                          "decoder": rows(len(target), len(target))}}


def test_head_divergence_compares_only_shared_rows() -> None:
    src = ["▁a", "▁b", "▁c"]
    a, b = _result(src, ["▁x", "▁y", "▁z", "</s>"], 1), _result(src, ["▁x", "▁w", "</s>"], 2)
    assert compared_rows(a, b, "encoder") == 3
    assert compared_rows(a, b, "cross") == 2  # the common prefix "▁x" and the row that produced y / w
    grid = head_divergence(a, b, "cross")
    assert grid.shape == (2, 3)
    wa, wb = np.asarray(a["attention"]["cross"]), np.asarray(b["attention"]["cross"])
    assert np.isclose(grid[1, 2], js_divergence(wa[1, 2, :2], wb[1, 2, :2]).mean())
    assert not np.isclose(grid[1, 2], js_divergence(wa[1, 2, :3], wb[1, 2, :3]).mean())  # not every row
    assert head_divergence(a, a, "decoder").max() < 1e-9
    assert head_divergence(a, _result(["▁other"], ["</s>"], 3), "encoder") is None  # another tokenizer's split
