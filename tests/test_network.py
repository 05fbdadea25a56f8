"""Network failures fail fast and leave nothing behind: with a W&B API key and a server that does not answer, a run
logs offline within seconds, saying so in one line, instead of waiting ~100 s and failing with a half-made run folder.
Real wandb, its server an unreachable local port (refused at once, so the tests are fast and deterministic)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.loggers import WandbLogger

from attnprune.lit.wandb_setup import PROBE_SECONDS, prepare_wandb
from tests.conftest import ROOT, make_image_folder, script_env
from tests.test_entry_points import config
from tests.wandb_run import read_run

KEY = "0123456789" * 4  # a dummy 40-character API key


@pytest.fixture
def closed_port_url() -> str:
    """A local URL nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def wandb_trainer(save_dir: Path) -> L.Trainer:
    logger = WandbLogger(project="attnprune-test", save_dir=str(save_dir))
    return L.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False)


def test_an_unreachable_wandb_server_means_offline_within_seconds(closed_port_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", closed_port_url)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    trainer = wandb_trainer(tmp_path / "runs")
    start = time.perf_counter()
    prepare_wandb(trainer)
    assert time.perf_counter() - start < PROBE_SECONDS + 2
    assert trainer.logger._wandb_init["mode"] == "offline"
    runs = tmp_path / "runs" / "wandb"
    assert capsys.readouterr().err == (
        f"W&B server {closed_port_url} cannot be reached ([Errno 111] Connection refused): logging offline to "
        f"{runs}/offline-run-*; upload it later with `wandb sync {runs}`\n"
    )
    assert list((tmp_path / "runs").iterdir()) == []  # no run started yet


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)  # any answer: the server is there
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_wandb_server_that_answers_stays_online(tmp_path, monkeypatch, capsys):
    server = HTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    trainer = wandb_trainer(tmp_path / "runs")
    try:
        prepare_wandb(trainer)
    finally:
        server.shutdown()
    assert "mode" not in trainer.logger._wandb_init and capsys.readouterr().err == ""


def test_evaluate_with_a_key_and_no_network_logs_offline_at_once(closed_port_url, tmp_path):
    """evaluate.py ends in seconds (it waited ~100 s for wandb, then failed), with one whole offline run."""
    make_image_folder(tmp_path / "data", train_per_class=4, test_per_class=2)
    (tmp_path / "evaluate.yaml").write_text(yaml.safe_dump(config(tmp_path)))
    args = ["--config", "evaluate.yaml", "--routings", "[unpruned]", "--output_dir", "out", "--throughput_repeats", "0"]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *args],
        cwd=tmp_path,
        env=script_env(WANDB_API_KEY=KEY, WANDB_BASE_URL=closed_port_url),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.perf_counter() - start < 60  # imports and the evaluation included
    assert result.stderr.count(f"W&B server {closed_port_url} cannot be reached") == 1
    wandb_dir = tmp_path / "runs" / "wandb"
    (run,) = [path for path in wandb_dir.iterdir() if path.is_dir() and not path.is_symlink()]
    assert run.name.startswith("offline-run-")
    assert "test/unpruned/top1" in read_run(run).keys  # a whole run, ready for `wandb sync`
