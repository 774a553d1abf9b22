"""Shared fixtures: composing configs with hydra.compose and running the CLI."""

from __future__ import annotations

import functools
import http.server
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from calibrun.commands.calibrun import main
from calibrun.compose import config_dir
from calibrun.samples import sample_root

# Under pytest-xdist (make test: one worker per core) each worker's torch, and the
# processes its tests start, get their share of the cores: with every worker on all of
# them the threads oversubscribe the machine and the suite slows down.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1:
    import torch

    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)

# Tests never touch the network: MLflow (trainer.mlflow=true) would send usage telemetry.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
# Nor does Ray (hydra/launcher=ray): no usage report.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

REPO = Path(__file__).resolve().parent.parent
# The real image sets bundled with the package: tests never need data from outside it.
CIFAR_SAMPLE = Path(sample_root("cifar10"))
PACS_SAMPLE = Path(sample_root("pacs"))

# Small, fast settings for end-to-end runs on the synthetic data.
FAST = ["data=synthetic", "model=resnet110", "model.depth=8", "trainer=quick", "trainer.epochs=2",
        "trainer.batch_size=64", "trainer.progress=false", "metrics.resamples=100"]


@pytest.fixture(scope="session", autouse=True)
def sample_cache(tmp_path_factory):
    """Decode caches of the bundled samples go to one temporary folder per test session
    (shared by the tests and the CLI processes they start), never to ~/.cache."""
    cache = tmp_path_factory.mktemp("sample-cache")
    old = os.environ.get("CALIBRUN_CACHE")
    os.environ["CALIBRUN_CACHE"] = str(cache)
    yield cache
    if old is None:
        del os.environ["CALIBRUN_CACHE"]
    else:
        os.environ["CALIBRUN_CACHE"] = old


@pytest.fixture
def compose_cfg():
    """Compose the real config tree with overrides, as the CLI would."""

    def _compose(overrides: list[str]):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)

    return _compose


@pytest.fixture
def run_cli(tmp_path, monkeypatch, capfd):
    """Run the ``calibrun`` console script with ARGS in ``tmp_path`` (or ``cwd``), in this
    process: the same Hydra app, exit status and output as ``python -m calibrun``,
    without a new interpreter importing torch for every run. Returns a CompletedProcess.
    Tests that need a separate process (a signal, an installed copy) start one."""

    def _run(args: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        with monkeypatch.context() as patch:
            patch.chdir(cwd or tmp_path)
            patch.setattr(sys, "argv", ["calibrun", *args])
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            capfd.readouterr()
            root = logging.getLogger()
            handlers, level = list(root.handlers), root.level
            try:
                main()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            finally:
                # Hydra's job logging points the root logger at this test's captured
                # streams, which close with the test; later in-process commands of the
                # same worker would log into closed files.
                for handler in root.handlers:
                    if handler not in handlers:
                        handler.close()
                root.handlers[:] = handlers
                root.setLevel(level)
            out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return _run


@pytest.fixture
def run_cli_process(tmp_path):
    """Run ``python -m calibrun ARGS`` in a new process in ``tmp_path`` (or ``cwd``)."""

    def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        return subprocess.run([sys.executable, "-m", "calibrun", *args], cwd=cwd or tmp_path,
                              capture_output=True, text=True, env=env, timeout=900)

    return _run


def only_run_dir(root: Path) -> Path:
    """The single run folder under ``root/outputs/runs``."""
    dirs = [p.parent for p in (root / "outputs" / "runs").glob("*/*/*/.hydra")]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on the loopback interface serving ``tmp_path/served``: the
    download code runs unchanged and nothing leaves the machine."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
