"""Head ablation through the service (``mask_heads``) and the explorer's ablation tab, against PyTorch.

The session's shared `bentoml serve` of the tiny export serves every test here; the session's
explorer runs in front of it for the Chromium test.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from stepwise.decode.pytorch import decode
from stepwise.explorer.draw import token_diff
from stepwise.train.checkpoint import load_checkpoint

from support.pages import ARTIFACTS, open_page
from support.processes import BentoProcess, Explorer

SENTENCE = "Und Gott sprach: Es werde Licht!"
KINDS = ("encoder", "decoder", "cross")


@pytest.fixture(scope="module")
def exported(tiny_export: tuple[Path, Path]) -> tuple[Path, Path]:
    """The session's tiny checkpoint and export (the shared service's model)."""
    return tiny_export


@pytest.fixture(scope="module")
def service(tiny_service: BentoProcess) -> BentoProcess:
    """The session's shared service: these tests only read from it."""
    return tiny_service


def _pytorch(checkpoint_path: Path, text: str, beam: int, mask_heads: dict[str, list[list[int]]]) -> object:
    """The PyTorch model's translation with the same heads switched off (``decode(..., head_mask=)``)."""
    checkpoint = load_checkpoint(checkpoint_path)
    model, tokenizer = checkpoint.build_model(), checkpoint.tokenizer()
    cfg = model.config
    layers = {"encoder": cfg.n_encoder_layers, "decoder": cfg.n_decoder_layers, "cross": cfg.n_decoder_layers}
    head_mask = {kind: torch.ones(layers[kind], cfg.n_heads) for kind in KINDS}
    for kind, pairs in mask_heads.items():
        for layer, head in pairs:
            head_mask[kind][layer, head] = 0.0
    src = tokenizer.encode(text)
    (hyp,) = decode(model, torch.tensor([src]), beam_size=beam, return_attention=True, head_mask=head_mask)
    emitted = hyp.tokens + ([tokenizer.eos_id] if hyp.finished else [])
    return tokenizer.pieces(emitted), hyp


def _translate(service: BentoProcess, **body: object) -> dict:
    answer = service.post("/translate", {"text": SENTENCE, **body})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _changing_mask(service: BentoProcess) -> dict[str, list[list[int]]]:
    """A set of heads whose removal changes this sentence's translation (the model is untrained)."""
    plain = _translate(service, attention="none")["target_tokens"]
    candidates = [{"cross": [[1, 0], [1, 1]]}, {"cross": [[1, 0], [1, 1], [1, 2]], "decoder": [[1, 3]]},
                  {"encoder": [[1, 0], [1, 1]], "cross": [[0, 0], [1, 1], [1, 2]]},
                  {"encoder": [[0, h] for h in range(4)] + [[1, 2]], "decoder": [[0, 1]], "cross": [[1, 3]]}]
    for mask in candidates:
        if _translate(service, attention="none", mask_heads=mask)["target_tokens"] != plain:
            return mask
    pytest.fail("no candidate mask changes the translation: pick another seed")


@pytest.mark.integration
@pytest.mark.parametrize("beam", [1, 4])
def test_masked_translation_is_the_masked_pytorch_model(service: BentoProcess, exported: tuple[Path, Path],
                                                        beam: int) -> None:
    mask = {"encoder": [[0, 1]], "decoder": [[1, 2]], "cross": [[1, 0], [0, 3]]}
    result = _translate(service, beam_size=beam, attention="all", mask_heads=mask)
    pieces, hyp = _pytorch(exported[0], SENTENCE, beam, mask)
    assert result["target_tokens"] == pieces
    assert result["score"] == pytest.approx(hyp.score, abs=1e-3)
    for kind in KINDS:  # the weights stay the softmax weights of the masked model's own run
        np.testing.assert_allclose(np.array(result["attention"][kind]), hyp.attention[kind], atol=1e-4)
    plain = _translate(service, beam_size=beam, attention="all")
    unmasked_pieces, _ = _pytorch(exported[0], SENTENCE, beam, {})
    assert plain["target_tokens"] == unmasked_pieces


@pytest.mark.integration
def test_no_mask_answers_as_before_and_empty_mask_is_no_mask(service: BentoProcess) -> None:
    plain = _translate(service, attention="all")
    assert set(plain) == {"translation", "source_tokens", "target_tokens", "attention", "model", "score", "timings"}
    del plain["timings"]
    for empty in ({}, {"cross": []}):
        same = _translate(service, attention="all", mask_heads=empty)
        del same["timings"]
        assert same == plain


@pytest.mark.integration
def test_requests_with_different_masks_are_not_mixed(service: BentoProcess) -> None:
    """Concurrent requests merged by adaptive batching each get their own mask's translation."""
    mask = _changing_mask(service)
    expected = {False: _translate(service, attention="cross"), True: _translate(service, attention="cross",
                                                                                mask_heads=mask)}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: (i % 2 == 1, _translate(service, attention="cross",
                                                                  **({"mask_heads": mask} if i % 2 else {}))),
                                range(32)))
    assert any(a["timings"]["requests_in_batch"] > 1 for _, a in answers)  # some were merged into one batch
    for masked, answer in answers:
        assert answer["target_tokens"] == expected[masked]["target_tokens"]
        assert answer["attention"] == expected[masked]["attention"]


@pytest.mark.integration
@pytest.mark.parametrize("mask_heads", [
    {"encoder": [[2, 0]]},  # the encoder has 2 layers
    {"cross": [[0, 4]]},  # 4 heads
    {"decoder": [[0, 0], [5, 1]]},
    {"embedding": [[0, 0]]},  # not a kind
    {"cross": [[0]]},  # not a pair
    {"cross": [[0, -1]]},
    {"cross": [[0, 1, 2]]},
])
def test_bad_mask_heads_is_400_naming_the_field(service: BentoProcess, mask_heads: dict) -> None:
    answer = service.post("/translate", {"text": SENTENCE, "mask_heads": mask_heads})
    assert answer.status_code == 400, answer.text
    assert "mask_heads" in answer.text
    assert any("mask_heads" in d["loc"] for d in answer.json()["detail"])


@pytest.mark.browser
def test_ablation_view_shows_the_masked_translation(service: BentoProcess, exported: tuple[Path, Path],
                                                    browser: object, tiny_explorer: Explorer) -> None:
    mask = _changing_mask(service)
    page = open_page(browser, tiny_explorer.url)  # the session's explorer, in front of the shared service
    page.locator("#sentence textarea").fill(SENTENCE)
    page.get_by_role("tab", name="Head ablation").click()
    for kind, pairs in mask.items():
        for layer, head in pairs:
            page.locator(f"#ablation-{kind} label").filter(has_text=f"L{layer + 1} H{head + 1}").click()
    page.locator("#ablation-button").click()
    page.wait_for_selector("#ablation-ok")
    shown = page.locator("#ablation-translation textarea").input_value()
    expected = _translate(service, attention="none", mask_heads=mask)
    plain = _translate(service, attention="none")
    assert shown == expected["translation"] != plain["translation"]
    assert float(page.locator("#ablation-score").text_content()) == pytest.approx(expected["score"], abs=1e-4)
    diff = token_diff(plain["target_tokens"], expected["target_tokens"])
    added = page.locator("#ablation-diff mark").all_text_contents()
    removed = page.locator("#ablation-diff del").all_text_contents()
    assert added == [t for op, t in diff if op == "added"] and added
    assert removed == [t for op, t in diff if op == "removed"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer-ablation.png"), full_page=True)
    # the translation is the masked PyTorch model's
    pieces, _ = _pytorch(exported[0], SENTENCE, 1, mask)
    assert expected["target_tokens"] == pieces
