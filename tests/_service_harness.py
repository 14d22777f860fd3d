"""A real `bentoml serve` process for tests: a tiny trained model, a free port, a client.

Shared by the tests that start the service for real (HTTP behaviour, bundle switching, Prometheus).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from _local import free_port  # noqa: F401 - the harness's users import it from here
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


VOCABULARY = {"items": ITEMS, "categories": [f"c{k % 4}" for k in range(N_ITEMS)],
              "context": {"device": {"mobile": 1, "desktop": 2}, "segment": {"vip": 1}}}
POPULARITY = {
    "global": [{"item_id": i, "score": float(N_ITEMS - r)} for r, i in enumerate(reversed(ITEMS))],
    "groups": [{"context": {"device": "mobile"}, "items": [{"item_id": f"i{k}", "score": 1.0} for k in range(10)]}],
}


def build_serving_home(home: Path, histories: dict[str, list[int]], version: str = "good") -> Any:
    """$RECSYS_HOME for a served tiny model: the successor model exported and promoted as `version`,
    Feast applied (SQLite online store) with each user's history pushed (views, device mobile).
    Returns the exported bundle. Reads RECSYS_HOME from the environment: set it to `home` first."""
    from datetime import datetime, timedelta, timezone

    from recsys_assets.data.user_features import apply_feature_repo
    from recsys_assets.export.bundle import export_bundle, promote
    from recsys_serving.feature_client import FeatureStoreClient, load_feature_store

    assert os.environ.get("RECSYS_HOME") == str(home), "set RECSYS_HOME to the home being built"
    model, config = successor_model()
    root = home / "bundles"
    bundle = export_bundle(root, model, config, VOCABULARY, POPULARITY, home / "work", contexts=[],
                           metrics={"models": {}}, version=version)
    promote(root, version)
    store = load_feature_store(REPO / "feature_repo")
    apply_feature_repo(store, REPO / "feature_repo", max_len=20)
    client = FeatureStoreClient(REPO / "feature_repo")
    start = datetime.now(timezone.utc) - timedelta(hours=1)
    for user, history in histories.items():
        for n, item in enumerate(history):
            client.push_event(user, f"i{item}", "view", start + timedelta(minutes=n), device="mobile")
    return bundle


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15.0, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(poll)


class RedisServer:
    """A real redis-server on 127.0.0.1 (no persistence), on a free port or a given one (to start the
    same store again after stop())."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed"
        self.port = port or free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    output = self.process.stdout.read().decode() if self.process.stdout else ""
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}: {output}")
                time.sleep(0.05)

    @property
    def connection(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


class SilentServer:
    """Accepts TCP connections and never answers: a store whose network path stalls."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.socket.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        self.socket.close()
        for conn in self.connections:
            conn.close()


# The write token of every Server whose env does not set RECSYS_WRITE_TOKENS itself.
WRITE_TOKEN = secrets.token_urlsafe(32)


class Server:
    def __init__(self, name: str, home: Path, env: dict[str, str], token: str | None = WRITE_TOKEN,
                 expect_ok: bool = True) -> None:
        """`token`: the bearer token `client` sends (None: no Authorization header). `expect_ok`:
        `wait_ready` waits for /readyz 200; False for a server degraded by design (a stalled store)."""
        self.name, self.port = name, free_port()
        self.expect_ok = expect_ok
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"server-{name}.log"
        full_env = {
            **os.environ,
            "RECSYS_HOME": str(home),
            # one BENTOML_HOME per server: BentoML keeps its Prometheus multiprocess files there, and
            # servers sharing it would report each other's metrics
            "BENTOML_HOME": str(home / f"bentoml-{name}"),
            "BENTOML_DO_NOT_TRACK": "True",
            "RECSYS_WRITE_TOKENS": WRITE_TOKEN,
            **env,
        }
        cmd = [sys.executable, "-m", "bentoml", "serve", "recsys_serving.service:RecommenderService",
               "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "w") as log:
            # own process group: stopping it stops the worker processes bentoml forks, and only them
            self.proc = subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, timeout=30, headers=headers)

    SETTLE_S = 20.0

    def wait_ready(self, deadline: float) -> None:
        """Until /readyz is 200 (status ok: e.g. the online store's first read after start is slow).
        A server that answers but is not ok is ready at once when made with expect_ok=False or when
        it has no usable bundle (model down: that stays so), else after SETTLE_S of answering."""
        answering_since: float | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                resp = self.client.get("/readyz")
                if resp.status_code == 200:
                    return
                if resp.status_code == 503 and resp.headers.get("content-type", "").startswith("application/json"):
                    dependencies = resp.json().get("dependencies")  # none yet: still starting
                    if dependencies:
                        answering_since = answering_since or time.monotonic()
                        model_down = dependencies.get("model", {}).get("status") == "down"
                        if not self.expect_ok or model_down or time.monotonic() - answering_since > self.SETTLE_S:
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
