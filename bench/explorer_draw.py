"""How long the explorer takes to draw a long sentence: a 200 × 200 attention map.

``python -m bench.explorer_draw [--tokens 200] [--repeats 5]`` times each drawing function of
``stepwise.explorer/draw.py`` on a peaked random map (each row a Dirichlet(0.1) draw, so a few keys
stand out as in trained attention) and prints the best of ``--repeats`` runs with the output's
size: the SVG heatmap (the scrolling one, every cell with its hover title), the token lines of
one query token (top 8) and of every token, the exported PNG and a grid thumbnail.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from stepwise.explorer.draw import heatmap_png, heatmap_svg, lines_svg


def best_of(draw: Callable[[], str | bytes], repeats: int) -> tuple[float, int]:
    """The fastest of ``repeats`` calls in milliseconds, and the output's size in bytes."""
    times, out = [], b""
    for _ in range(repeats):
        start = time.perf_counter()
        out = draw()
        times.append(time.perf_counter() - start)
    return 1000 * min(times), len(out.encode() if isinstance(out, str) else out)


def main() -> None:
    """Print each drawing function's best time and output size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = args.tokens
    weights = np.random.default_rng(0).dirichlet(np.full(n, 0.1), size=n)
    tokens = [f"▁tok{i}" for i in range(n)]
    cases = {
        "heatmap_svg": lambda: heatmap_svg(weights, tokens, tokens, title="encoder self-attention"),
        "lines_svg, one query token, top 8": lambda: lines_svg(weights, tokens, tokens, 0, top_k=8),
        "lines_svg, every query token, top 8": lambda: lines_svg(weights, tokens, tokens, None, top_k=8),
        "heatmap_png (export)": lambda: heatmap_png(weights, tokens, tokens, title="encoder self-attention"),
        "heatmap_png (grid thumbnail)": lambda: heatmap_png(weights, tokens, tokens, title="L1 H1", size=2.5),
    }
    print(f"{n} x {n} map, best of {args.repeats}:")
    for name, draw in cases.items():
        ms, size = best_of(draw, args.repeats)
        print(f"  {name:38s} {ms:8.0f} ms  {size / 1e6:6.2f} MB")


if __name__ == "__main__":
    main()
