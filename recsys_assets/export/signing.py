"""The bundle signing key: held only where bundles are built (the Dagster code location).

`RECSYS_BUNDLE_SIGNING_KEY_FILE` names it (default `$RECSYS_HOME/secrets/bundle_signing_key`): an
Ed25519 private key in PEM (PKCS#8), created with mode 0600 on first use when absent, so `make run`
signs out of the box. Its public half is written beside it as `<key file>.pub`: that file (not the
private key) is what serving and the promotion/rollback checks are given. The format of the
signature itself is `recsys_serving.bundle`'s.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from recsys_serving.bundle import DEFAULT_SIGNING_KEY, PUBLIC_KEY_SUFFIX, SIGNING_KEY_ENV, key_id_of, public_key_pem
from recsys_serving.contract import recsys_home_path

logger = logging.getLogger(__name__)


def signing_key_path() -> Path:
    """$RECSYS_BUNDLE_SIGNING_KEY_FILE, else $RECSYS_HOME/secrets/bundle_signing_key."""
    configured = os.environ.get(SIGNING_KEY_ENV, "").strip()
    return Path(configured).expanduser() if configured else recsys_home_path() / DEFAULT_SIGNING_KEY


def public_key_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + PUBLIC_KEY_SUFFIX)


def load_or_create_signing_key(path: Path | None = None) -> Ed25519PrivateKey:
    """The private key at `path` (default `signing_key_path()`), created (0600, its directory 0700)
    when absent; its `.pub` is (re)written when missing. ValueError when the file is not an
    unencrypted PEM Ed25519 private key."""
    path = path or signing_key_path()
    if not path.exists():
        _create(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{SIGNING_KEY_ENV}: {path} is not a readable unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{SIGNING_KEY_ENV}: {path} is a {type(key).__name__}, not an Ed25519 private key")
    public, pem = public_key_path(path), public_key_pem(key.public_key())
    if not public.exists():  # renamed into place: a reader never sees half a key
        tmp = public.with_name(f".{public.name}.{os.getpid()}.tmp")
        tmp.write_bytes(pem)
        os.replace(tmp, public)
        logger.info("wrote the public key %s (key id %s)", public, key_id_of(key.public_key()))
    elif public.read_bytes() != pem:
        logger.warning(
            "%s is not the public half of %s (key id %s): services trusting that file will refuse these bundles",
            public, path, key_id_of(key.public_key()),
        )
    return key


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Written to a private temporary file, then linked into place: the key appears whole or not at
    # all, and of two processes creating it at once one wins and the other reads the winner's key.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
    finally:
        tmp.unlink(missing_ok=True)
    logger.warning(
        "created the bundle signing key %s (key id %s): keep it where bundles are built; serving gets %s",
        path, key_id_of(key.public_key()), public_key_path(path),
    )
