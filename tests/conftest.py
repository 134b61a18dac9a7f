"""Fixtures: the tier guard, a real local ClearML server, the session's shared tiny export, its
`bentoml serve` and explorer, and a headless Chromium per module. Helpers live in ``tests/support``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

# One compute thread per process: `make test` runs a worker per core, and each worker starts
# trainers, exporters and services of its own. Two workers with two spinning threads each (PyTorch's
# OpenMP pool, ONNX Runtime's) on two cores spend much of their time waiting for each other. Set
# before torch is imported; the processes the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("STEPWISE_ORT_THREADS", "1")

import pytest

from support.models import export_tiny_model
from support.processes import BentoProcess, ClearMLServerProcess, Explorer, serve_export

TIERS = ("unit", "integration", "browser")


# The modules that take longest, longest first. `make test` hands whole modules to its workers in
# collection order (``--dist loadfile --no-loadscope-reorder``): starting these first keeps one
# long module from running alone at the end. Order only; every module runs either way.
LONGEST_FIRST = ("test_training", "test_explorer", "test_explorer_versions", "test_up_explorer", "test_averaging",
                 "test_cli_errors", "test_pipeline", "test_clearml_server", "test_clearml_workflow", "test_export",
                 "test_guided_alignment", "test_clearml_agent", "test_bento", "test_service_registry",
                 "test_results_page", "test_clearml_data", "test_service")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test has exactly one tier marker (``tests/README.md``); collection fails otherwise.
    The longest modules go first (:data:`LONGEST_FIRST`)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module's own order is kept
    wrong = []
    for item in items:
        tiers = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(sorted(tiers)) or 'no tier'}")
    if wrong:
        raise pytest.UsageError("each test needs exactly one of the markers " + ", ".join(TIERS) + ":\n  "
                                + "\n  ".join(wrong))


# -- a real local ClearML server in a subprocess ----------------------------------------------
@pytest.fixture
def clearml_server(tmp_path: Path) -> Iterator[ClearMLServerProcess]:
    """A fresh `stepwise clearml-server` with its own data, for one test."""
    server = ClearMLServerProcess(data=tmp_path / "clearml-data")
    server.start()
    yield server
    server.stop()


# -- one tiny export, served once, for the modules that only read from the service ---------------
@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny untrained checkpoint (seed 5) and its ONNX export: ``(checkpoint, export directory)``.

    Its positional table is long (1024): a long text decodes for seconds (the output budget is
    2 x source + 10 tokens). Tests read it; none may change the files.
    """
    return export_tiny_model(tmp_path_factory.mktemp("tiny"), seed=5, max_positions=1024)


@pytest.fixture(scope="session")
def tiny_service(tiny_export: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoProcess]:
    """One `bentoml serve` of :func:`tiny_export` for the whole session.

    For tests that only send requests: none reloads, restarts or reconfigures it. A test that reads
    the log reads its own part (``log_mark``/``log_since``); one that counts batches counts its own
    answers' ``requests_in_batch``.
    """
    server = serve_export(tiny_export[1], tmp_path_factory.mktemp("tiny-service") / "bentoml.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_explorer(tiny_service: BentoProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Explorer]:
    """One explorer in front of :func:`tiny_service`; every test opens sessions (pages) of its own."""
    app = Explorer(tiny_service.url, tmp_path_factory.mktemp("tiny-explorer") / "explorer.log")
    yield app
    app.stop()
    assert not list(app.temp.glob("stepwise-explorer-*")), "the explorer left its export folders behind"


# -- Debian's Chromium through Playwright (Playwright's own browser download fails here) ----------
CHROMIUM = os.environ.get("STEPWISE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """A headless Chromium for one module's browser tests; `make test` installs Debian's package.

    One per module, not per session: Playwright's sync API runs an event loop in this thread while
    it is open, and later modules call ``asyncio.run``.
    """
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium", pytrace=False)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()
