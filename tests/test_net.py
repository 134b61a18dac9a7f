"""`wait_until_ready`: the one function that waits for a server another process starts."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stepwise.errors import StepwiseError
from stepwise.net import ServerNotReady, wait_until_ready

from support.processes import free_port


class Answers:
    """A real HTTP server on a free port answering the given statuses in turn (the last one forever)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.seen = 0
        answers = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server convention
                status = answers.statuses[min(answers.seen, len(answers.statuses) - 1)]
                answers.seen += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/readyz"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def answers(request: pytest.FixtureRequest) -> Iterator[Answers]:
    server = Answers(request.param)
    yield server
    server.close()


@pytest.mark.unit
@pytest.mark.parametrize("answers", [[503, 503, 200]], indirect=True)
def test_waits_through_server_errors_until_the_server_is_ready(answers: Answers) -> None:
    wait_until_ready(answers.url, timeout=60, interval=0.01)
    assert answers.seen == 3


@pytest.mark.unit
@pytest.mark.parametrize("answers", [[404]], indirect=True)
def test_any_answer_below_500_counts_as_ready(answers: Answers) -> None:
    wait_until_ready(answers.url, timeout=60)
    assert answers.seen == 1


@pytest.mark.unit
@pytest.mark.parametrize("answers", [[503]], indirect=True)
def test_a_server_that_never_gets_ready_is_a_clear_error(answers: Answers) -> None:
    with pytest.raises(ServerNotReady, match=r"the service did not answer on http://127\.0\.0\.1:\d+/readyz within 1s"):
        wait_until_ready(answers.url, timeout=1, name="the service", interval=0.05)
    assert answers.seen >= 2


@pytest.mark.unit
def test_nothing_listening_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/debug.ping"
    with pytest.raises(StepwiseError, match=rf"did not answer on {url} within 0\.5s"):
        wait_until_ready(url, timeout=0.5)


@pytest.mark.integration
def test_a_process_that_exits_ends_the_wait_with_its_status_and_log(tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    with log_file.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-c", "import sys; print('port already in use'); sys.exit(3)"],
                                   stdout=out, stderr=subprocess.STDOUT)
        process.wait()
    with pytest.raises(ServerNotReady) as raised:
        wait_until_ready(f"http://127.0.0.1:{free_port()}/", timeout=600, process=process, log_file=log_file,
                         name="the explorer")
    message = str(raised.value)
    assert message.startswith("the explorer exited with status 3 before http://127.0.0.1:")
    assert str(log_file) in message and message.rstrip().endswith("port already in use")
