"""Helpers several tests share: a free localhost port, a small SASRec-format sequence file."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_sasrec_sequences(path: Path, n_users: int, n_items: int = 39, seed: int = 0) -> None:
    """`user item item ...` lines, 3 to 9 random items per user (item ids from 1)."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(map(str, [u + 1, *rng.integers(1, n_items + 1, size=int(rng.integers(3, 10)))]))
             for u in range(n_users)]
    path.write_text("\n".join(lines) + "\n")
