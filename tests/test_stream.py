"""Streaming: the search loop's per-step hook, streamed requests in ``serving.translate``, and
``POST /translate_stream`` of a real `bentoml serve` (final event = ``/translate``'s answer, tokens as
decoded, 4xx before any event, a client that leaves mid-stream, streams batched with others)."""

from __future__ import annotations

import json
import socket
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from stepwise.decode.search import Progress, search
from stepwise.serve.attention_codec import MAX_ERROR, decode
from stepwise.serve.client import Decoding, TranslationClient, server_sent_events
from stepwise.serve.store import LoadedModel, ModelStore
from stepwise.serve.streams import Emit, StreamClosed
from stepwise.serve.translation import Job, translate

from support.models import SAMPLE_PAIRS
from support.processes import BentoProcess
from support.search_tables import BOS, EOS, PAD, TableSteps

PARAGRAPH = " ".join(source for source, _ in SAMPLE_PAIRS)  # six sentences


# -- the search loop's hook ------------------------------------------------------------------------
def prefix_weight(prefix: tuple[int, ...]) -> float:
    """A made-up attention weight that names the prefix a step was fed."""
    return (zlib.crc32(repr(prefix).encode()) % 1000) / 1000.0


class AttentionTableSteps(TableSteps):
    """:class:`TableSteps` whose cross-attention row is :func:`prefix_weight` of the row's prefix, so a
    hypothesis's recorded attention says whether it was followed back through the right rows."""

    def __init__(self, sentences: int, beam_size: int, can_drop_rows: bool) -> None:
        super().__init__(sentences, beam_size, can_drop_rows)
        self.encoder_attention = np.zeros((1, sentences, 1, 4, 4), dtype=np.float32)

    def __call__(self, tokens: np.ndarray, past_order: np.ndarray, need_attention: bool) -> tuple:
        top_log_probs, top_ids, _, _ = super().__call__(tokens, past_order, need_attention)
        n = len(self.prefixes)
        cross = np.zeros((1, n, 1, 1, 4), dtype=np.float32)
        cross[0, :, 0, 0, :] = np.array([prefix_weight(p) for p in self.prefixes])[:, None]
        return top_log_probs, top_ids, np.zeros((1, n, 1, 1, 1), dtype=np.float32), cross


def expected_rows(emitted: list[int]) -> list[float]:
    return [prefix_weight(tuple(emitted[:t])) for t in range(len(emitted))]


@pytest.mark.unit
@pytest.mark.parametrize("can_drop_rows", [True, False])
@pytest.mark.parametrize("beam_size", [1, 2, 4])
def test_each_steps_best_hypothesis_and_its_attention(beam_size: int, can_drop_rows: bool) -> None:
    """The hook's best hypothesis ends as the one returned, and its attention rows (and the returned
    ones) are those of its own prefixes, also for a finished hypothesis that moved to another row
    after it ended (the returned beam attention followed the wrong rows then)."""
    lengths = [4] * 6
    seen: dict[int, list[tuple[list[int], list[float], bool]]] = {b: [] for b in range(len(lengths))}

    def follow(progress: Progress) -> None:
        for b in seen:
            seen[b].append((progress.best(b), progress.cross_attention(b)[0, 0, :, 0].tolist(), progress.done(b)))

    hyps = search(AttentionTableSteps(len(lengths), beam_size, can_drop_rows), lengths, beam_size=beam_size,
                  length_penalty=0.6, max_length=None, max_positions=64, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                  return_attention=True, on_step=follow)
    for b, hyp in enumerate(hyps):
        emitted = hyp.tokens + ([EOS] if hyp.finished else [])
        np.testing.assert_allclose(hyp.attention["cross"][0, 0, :, 0], expected_rows(emitted), atol=1e-6)
        assert seen[b][-1][0] == emitted and seen[b][-1][2]
        for best, rows, _ in seen[b]:
            np.testing.assert_allclose(rows, expected_rows(best), atol=1e-6)
        done_at = next(i for i, (_, _, done) in enumerate(seen[b]) if done)
        assert all(best == emitted for best, _, _ in seen[b][done_at:])  # a finished sentence's best is final
        if beam_size == 1:  # greedy search only appends
            assert all(seen[b][i + 1][0][: len(seen[b][i][0])] == seen[b][i][0] for i in range(len(seen[b]) - 1))
    if beam_size > 1:  # the check is meaningful: some beam changed its mind along the way
        assert any(seen[b][i + 1][0][: len(seen[b][i][0])] != seen[b][i][0]
                   for b in seen for i in range(len(seen[b]) - 1))


# -- streamed requests in serving.translate, in process -------------------------------------------
def translate_stream(loaded: LoadedModel, request: dict[str, Any], emit: Emit) -> dict[str, Any] | None:
    """One streamed request decoded alone: its answer (None when its reader left)."""
    (answer,) = translate(loaded, [Job.parse(request, emit)])
    return answer

@pytest.fixture(scope="module")
def exported(tiny_export: tuple[Path, Path]) -> tuple[Path, Path]:
    """The session's tiny checkpoint and export (the shared service's model)."""
    return tiny_export


def request_of(text: str, **options: Any) -> dict[str, Any]:
    """A request as the schema hands it to the service (defaults filled in)."""
    return {"text": text, "beam_size": 1, "max_length": None, "attention": "cross", "layers": None, "heads": None,
            "model": None, "mask_heads": None, "attention_format": "json", "alignment": "none",
            "alignment_layer": None, "alignment_head": None, "split": "none", **options}


def replay(events: list[tuple[str, dict[str, Any]]]) -> Decoding:
    """What a reader holds after the events (the explorer's client applies them)."""
    decoding = Decoding()
    for event, data in events:
        decoding.apply(event, data)
    return decoding


@pytest.mark.integration
@pytest.mark.parametrize("beam", [1, 4])
def test_translate_stream_ends_as_translate_for_a_split_paragraph(exported: tuple[Path, Path], beam: int) -> None:
    loaded = ModelStore(model_dir=str(exported[1])).default
    request = request_of(PARAGRAPH, beam_size=beam, split="sentences", layers=[1], heads=[0, 2])
    events: list[tuple[str, dict[str, Any]]] = []
    streamed = translate_stream(loaded, request, lambda event, data: events.append((event, data)))
    (answer,) = translate(loaded, [Job.parse(request)])
    want_rows = np.concatenate([np.asarray(s["attention"]["cross"]).reshape(1, 2, -1) for s in answer["sentences"]],
                               axis=-1)
    assert set(streamed.pop("timings")) == set(answer.pop("timings"))
    for got, want in zip(streamed.pop("sentences"), answer.pop("sentences"), strict=True):
        np.testing.assert_array_equal(got.pop("attention")["cross"], want.pop("attention")["cross"])
        assert got == want
    assert streamed == answer
    decoding = replay(events)
    assert decoding.sources == [s["source_tokens"] for s in events[0][1]["sentences"]] and len(decoding.sources) == 6
    assert decoding.tokens == answer["target_tokens"]
    # each token's row is its sentence's cross-attention row, the layers and heads asked for
    rows = np.concatenate([np.stack([decoding.cross[i] for i, s in enumerate(decoding.sentence) if s == j], axis=2)
                           .reshape(1, 2, -1) for j in range(6)], axis=-1)
    np.testing.assert_array_equal(rows, want_rows)
    replaced = [data for event, data in events if event == "replace"]
    assert bool(replaced) == (beam > 1)  # this paragraph's beams change their minds; greedy never does


@pytest.mark.integration
def test_compact_rows_and_no_rows(exported: tuple[Path, Path]) -> None:
    loaded = ModelStore(model_dir=str(exported[1])).default
    text = SAMPLE_PAIRS[1][0]
    events: list[tuple[str, dict[str, Any]]] = []
    result = translate_stream(loaded, request_of(text, attention_format="uint10"), lambda e, d: events.append((e, d)))
    rows = np.stack([decode(d["cross_attention"]) for e, d in events if e == "token"], axis=2)
    np.testing.assert_allclose(rows, result["attention"]["cross"], atol=MAX_ERROR["uint10"])
    events.clear()
    translate_stream(loaded, request_of(text, attention="none"), lambda e, d: events.append((e, d)))
    assert [e for e, _ in events].count("token") > 1 and all("cross_attention" not in d for _, d in events)


@pytest.mark.integration
def test_a_closed_stream_stops_the_search(exported: tuple[Path, Path]) -> None:
    loaded = ModelStore(model_dir=str(exported[1])).default
    tokens = []

    def emit(event: str, data: dict[str, Any]) -> None:
        if event == "token":
            tokens.append(data)
            if len(tokens) == 2:
                raise StreamClosed

    assert translate_stream(loaded, request_of(PARAGRAPH, beam_size=4, split="sentences"), emit) is None
    assert len(tokens) == 2  # the search stopped at the step that found nobody reading


@pytest.mark.integration
def test_a_stream_leaving_a_shared_search_leaves_the_others_decoding(exported: tuple[Path, Path]) -> None:
    """A stream decodes in one search with a plain request and another stream; its reader leaves
    after two tokens. The others still get every event and the answers they get alone."""
    loaded = ModelStore(model_dir=str(exported[1])).default
    requests_ = [request_of(PARAGRAPH, beam_size=2, split="sentences") for _ in range(3)]
    requests_[1]["text"] = SAMPLE_PAIRS[3][0]
    leaving: list[dict[str, Any]] = []
    staying: list[tuple[str, dict[str, Any]]] = []

    def leave_after_two(event: str, data: dict[str, Any]) -> None:
        if event == "token":
            if len(leaving) == 2:
                raise StreamClosed
            leaving.append(data)

    emits = [leave_after_two, None, lambda event, data: staying.append((event, data))]
    answers = translate(loaded, [Job.parse(request, emit) for request, emit in zip(requests_, emits, strict=True)])
    assert answers[0] is None and len(leaving) == 2
    for request, answer in zip(requests_[1:], answers[1:], strict=True):
        (alone,) = translate(loaded, [Job.parse(request)])
        assert answer is not None and answer["target_tokens"] == alone["target_tokens"]
    assert replay(staying).tokens == answers[2]["target_tokens"]


# -- POST /translate_stream of a real service -----------------------------------------------------
@pytest.fixture(scope="module")
def service(tiny_service: BentoProcess) -> BentoProcess:
    """The session's shared service: these tests only read from it."""
    return tiny_service


def stream(service: BentoProcess, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    answer = requests.post(f"{service.url}/translate_stream", json=body, stream=True, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/event-stream")
    return list(server_sent_events(answer.iter_lines()))


@pytest.mark.integration
@pytest.mark.parametrize(("text", "options"), [
    (SAMPLE_PAIRS[1][0], {"beam_size": 1}),
    (SAMPLE_PAIRS[1][0], {"beam_size": 4}),
    (PARAGRAPH, {"beam_size": 4, "split": "sentences", "attention": "all", "attention_format": "uint10"}),
])
def test_final_event_is_translates_answer(service: BentoProcess, text: str, options: dict[str, Any]) -> None:
    body = {"text": text, "attention": "cross", **options}
    events = stream(service, body)
    expected = service.post("/translate", body).json()
    assert [event for event, _ in events][-1] == "done" and [e for e, _ in events].count("done") == 1
    assert events[0][0] == "start" and {e for e, _ in events} <= {"start", "token", "replace", "done"}
    done = events[-1][1]
    assert set(done.pop("timings")) == set(expected.pop("timings"))  # measurements: the one part that differs
    assert done == expected
    decoding = replay(events[:-1])
    assert decoding.tokens == expected["target_tokens"]
    if "sentences" not in expected:  # each token came with its cross-attention row (float32 read back)
        np.testing.assert_allclose(np.stack(decoding.cross, axis=2), np.asarray(expected["attention"]["cross"]),
                                   atol=1e-6)


@pytest.mark.integration
def test_bad_requests_are_4xx_before_any_event(service: BentoProcess) -> None:
    text = SAMPLE_PAIRS[0][0]
    for body, field, status in (({"text": text, "attention_format": "png"}, "attention_format", 400),
                                ({"text": text, "heads": [9]}, "heads", 400),  # checked against the model
                                ({"text": text, "beam_size": 0}, "beam_size", 400),
                                ({"text": text, "model": "no-such-tag"}, "model", 404)):
        answer = service.post("/translate_stream", body)
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("application/json")
        assert field in [d["loc"][-1] for d in answer.json()["detail"]], answer.text


@pytest.mark.integration
def test_a_client_leaving_mid_stream_leaves_the_service_answering(service: BentoProcess) -> None:
    """Read until the first token of a translation that takes seconds, drop the connection; the
    service stops that search (its log says so) and answers the next requests."""
    body = json.dumps({"text": PARAGRAPH * 11, "beam_size": 16, "attention": "all"}).encode()  # seconds to decode
    mark = service.log_mark()  # the shared service's log: this test's part comes after it
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", service.port), timeout=120) as sock:
            sock.sendall(b"POST /translate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            received = b""
            while b"event: token" not in received:
                chunk = sock.recv(65536)
                assert chunk, "the service closed the stream before its first token"
                received += chunk
            assert received.startswith(b"HTTP/1.1 200")
    stopped = "every reader of this search left: decoding stopped"
    deadline = time.monotonic() + 60
    while service.log_since(mark).count(stopped) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert service.log_since(mark).count(stopped) == 2
    answer = service.post("/translate", {"text": SAMPLE_PAIRS[0][0]})
    assert answer.status_code == 200, answer.text
    assert stream(service, {"text": SAMPLE_PAIRS[2][0], "beam_size": 4})[-1][0] == "done"


@pytest.mark.integration
def test_the_explorers_client_reads_the_stream(service: BentoProcess) -> None:
    client = TranslationClient(service.url)
    updates = list(client.translate_stream(PARAGRAPH, beam_size=2, split="sentences"))
    final = client.translate(PARAGRAPH, beam_size=2, split="sentences")
    assert isinstance(updates[-1], dict) and all(isinstance(u, Decoding) for u in updates[:-1])
    assert updates[-1]["target_tokens"] == final["target_tokens"] == updates[-2].tokens
    for got, want in zip(updates[-1]["sentences"], final["sentences"], strict=True):
        for kind in ("encoder", "decoder", "cross"):
            np.testing.assert_array_equal(got["attention"][kind], want["attention"][kind])


@pytest.mark.integration
def test_streams_decode_in_the_same_batches_as_other_requests(service: BentoProcess) -> None:
    """Streams and plain requests sent together are decoded together (``requests_in_batch``), and
    each stream still ends with its own answer."""
    bodies = [{"text": source, "beam_size": 2} for source, _ in SAMPLE_PAIRS[:4]]
    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream, service, body) for body in bodies]
        plain = [pool.submit(service.post, "/translate", body) for body in bodies]
        streamed, answered = [f.result() for f in streams], [f.result().json() for f in plain]
    for events, answer in zip(streamed, answered, strict=True):
        done = events[-1][1]
        assert done["target_tokens"] == answer["target_tokens"] == replay(events[:-1]).tokens
    assert max(events[-1][1]["timings"]["requests_in_batch"] for events in streamed) > 1
