"""The explorer's "Score a translation" view: its HTML pieces, and the view in Chromium against the
session's real ``bentoml serve``."""

from __future__ import annotations

import math

import pytest

from stepwise.explorer.draw import token_diff
from stepwise.explorer.scoring import (
    LOW_SOURCE_SHARE,
    UNLIKELY,
    contributions_strip_html,
    departures_html,
    scored_tokens_html,
)

from support.models import SAMPLE_PAIRS
from support.pages import ARTIFACTS, open_page
from support.processes import BentoProcess, Explorer

SOURCE, GIVEN = SAMPLE_PAIRS[1]


@pytest.mark.unit
def test_unlikely_tokens_and_low_source_shares_are_marked() -> None:
    tokens = ["▁The", "▁Lord", "</s>"]
    page = scored_tokens_html(tokens, [math.log(0.9), math.log(UNLIKELY / 2), math.log(0.5)])
    assert page.count("<mark") == 1 and "1 of 3 tokens are unlikely" in page
    strip = contributions_strip_html(tokens, [0.8, LOW_SOURCE_SHARE / 2, 0.4])
    assert strip.count("low-source") == 1 and "1 token(s) below" in strip
    departures = departures_html(["▁a", "▁b"], ["▁a", "▁c", "▁b"])
    assert "<mark class='token-added'>▁c</mark>" in departures and "1 of the model's 3 tokens" in departures


@pytest.mark.browser
def test_score_view_marks_unlikely_tokens_and_shows_departures(tiny_service: BentoProcess, browser: object,
                                                               tiny_explorer: Explorer) -> None:
    page = open_page(browser, tiny_explorer.url)
    page.get_by_role("tab", name="Score a translation").click()
    page.locator("#score-source textarea").fill(SOURCE)
    page.locator("#score-given textarea").fill(GIVEN)
    page.locator("#score-button").click()
    page.wait_for_selector("#score-ok")
    scored = tiny_service.post("/score", {"text": SOURCE, "translation": GIVEN, "attention": "none",
                                          "contributions": True}).json()
    own = tiny_service.post("/translate", {"text": SOURCE, "attention": "none"}).json()
    shown = page.locator("#score-tokens .scored-token")
    assert shown.all_text_contents() == scored["target_tokens"]
    marked = page.locator("#score-tokens mark").all_text_contents()
    assert marked == [t for t, p in zip(scored["target_tokens"], scored["log_probs"], strict=True)
                      if math.exp(p) < UNLIKELY]
    assert float(page.locator("#score-value").text_content()) == pytest.approx(scored["score"], abs=1e-4)
    shares = [float(v) for v in page.locator("#score-contributions .share").evaluate_all(
        "cells => cells.map(c => c.dataset.share)")]
    assert shares == pytest.approx(scored["contributions"]["source_share"], abs=1e-4)
    assert page.locator("#score-contributions .low-source").count() == sum(
        share < LOW_SOURCE_SHARE for share in scored["contributions"]["source_share"])
    assert page.locator("#score-own textarea").input_value() == own["translation"]
    added = page.locator("#score-departures mark").all_text_contents()
    assert added == [t for op, t in token_diff(scored["target_tokens"], own["target_tokens"]) if op == "added"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer-score.png"), full_page=True)
