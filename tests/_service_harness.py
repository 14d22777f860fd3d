"""A real `bentoml serve` process for tests: a tiny trained model, a free port, a client.

Shared by the tests that start the service for real (HTTP behaviour, bundle switching, Prometheus).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig

REPO = Path(__file__).resolve().parents[1]
N_ITEMS = 40
MAX_LEN = 8
ITEMS = [f"i{k}" for k in range(N_ITEMS)]


def successor_model() -> tuple[BERT4Rec, BERT4RecConfig]:
    """100 steps of real training on random histories whose next item is the last item + 1: the
    model has to read the latest event, so a new event visibly moves its answer."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = BERT4RecConfig(vocab_size=N_ITEMS + 2, hidden=32, layers=1, heads=2, max_len=MAX_LEN, dropout=0.0)
    model = BERT4Rec(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        tokens = torch.randint(2, N_ITEMS + 2, (128, MAX_LEN), generator=gen)
        target = (tokens[:, -2] - 2 + 1) % N_ITEMS + 2
        tokens[:, -1] = 1
        pad = torch.randint(0, MAX_LEN - 1, (128,), generator=gen)
        tokens[torch.arange(MAX_LEN)[None, :] < pad[:, None]] = 0
        loss = torch.nn.functional.cross_entropy(model.score_next(tokens), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5, f"the tiny model did not learn its rule (loss {loss.item():.3f})"
    return model.eval(), config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, home: Path, env: dict[str, str]) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"server-{name}.log"
        full_env = {
            **os.environ,
            "RECSYS_HOME": str(home),
            # one BENTOML_HOME per server: BentoML keeps its Prometheus multiprocess files there, and
            # servers sharing it would report each other's metrics
            "BENTOML_HOME": str(home / f"bentoml-{name}"),
            "BENTOML_DO_NOT_TRACK": "True",
            **env,
        }
        cmd = [sys.executable, "-m", "bentoml", "serve", "recsys_serving.service:RecommenderService",
               "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "w") as log:
            # own process group: stopping it stops the worker processes bentoml forks, and only them
            self.proc = subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server {self.name} not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def recommend(self, **body: Any) -> dict[str, Any]:
        resp = self.client.post("/recommend", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def event(self, **body: Any) -> dict[str, Any]:
        resp = self.client.post("/events", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = self.client.get("/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
