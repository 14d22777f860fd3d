"""Signed bundles: Ed25519 over manifest.json's bytes. With a public key configured, a bundle whose
weights were changed together with its manifest checksums (same version) is refused, so are unsigned
bundles and forged signatures, by the reader, the server (at start and at a switch) and rollback;
without a key such a bundle is accepted and /healthz says it is not signed. The signing key is
created on first use, 0600; several public keys can be trusted at once (rotation)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import stat
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from recsys_assets.export.bundle import _switch, current_version, promote, rollback
from recsys_assets.export.signing import load_or_create_signing_key, public_key_path, signing_key_path
from recsys_serving.bundle import (
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    BundleRefused,
    PublicKey,
    key_id_of,
    load_bundle,
    public_key_pem,
    sha256_file,
    verify_bundle,
)
from recsys_serving.metrics import ServiceMetrics
from recsys_serving.recommender import Recommender
from recsys_serving.schemas import RecommendRequest
from recsys_serving.settings import ServingSettings

from test_bundle import _writable_copy, _write, exported  # noqa: F401  (exported: the tiny ONNX export fixture)
from _service_harness import wait_until
from test_bundle_reload import INTERVAL_S


def _public(key: Ed25519PrivateKey) -> PublicKey:
    return PublicKey(key_id=key_id_of(key.public_key()), key=key.public_key())


def _signed(root: Path, exported: Any, version: str, key: Ed25519PrivateKey) -> Path:
    from recsys_assets.export.bundle import model_spec_for, write_bundle
    from test_bundle import POPULARITY, VOCABULARY, _metrics

    config, report = exported
    info = write_bundle(root, Path(report.path), VOCABULARY, POPULARITY, model_spec_for(config, report),
                        metrics=_metrics(0.1), version=version, signing_key=key)
    assert info.signed_by == key_id_of(key.public_key())
    return Path(info.path)


def _forge(src: Path, dst: Path) -> Path:
    """Another model under the same version: model.onnx changed and the manifest's checksum of it
    recomputed, as someone who can write the bundle directory (but has no private key) would."""
    bundle = _writable_copy(src, dst)
    weights = bundle / MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["files"][MODEL_FILE] = {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return bundle


def test_the_reader_refuses_forged_unsigned_and_badly_signed_bundles(tmp_path: Path, exported: Any) -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    good = _signed(tmp_path / "bundles", exported, "v1", key)
    assert (good / SIGNATURE_FILE).is_file() and (good / SIGNATURE_FILE).stat().st_mode & 0o222 == 0
    assert load_bundle(good, public_keys=[_public(key)]).signed_by == key_id_of(key.public_key())
    # rotation: any configured key may verify, whichever order
    assert load_bundle(good, public_keys=[_public(other), _public(key)]).signed_by == key_id_of(key.public_key())
    with pytest.raises(BundleRefused, match="does not verify with any of the 1 configured"):
        verify_bundle(good, [_public(other)])

    forged = _forge(good, tmp_path / "forged")
    assert verify_bundle(forged).version == "v1", "without a key, checksums alone cannot tell"
    with pytest.raises(BundleRefused, match="signature of manifest.json does not verify") as refused:
        verify_bundle(forged, [_public(key)])
    assert str(tmp_path) not in refused.value.reason

    unsigned = _writable_copy(good, tmp_path / "unsigned")
    (unsigned / SIGNATURE_FILE).unlink()
    with pytest.raises(BundleRefused, match="not signed"):
        verify_bundle(unsigned, [_public(key)])
    assert verify_bundle(unsigned).version == "v1"

    tampered = _writable_copy(good, tmp_path / "tampered")
    doc = json.loads((tampered / SIGNATURE_FILE).read_text())
    raw = bytearray(base64.b64decode(doc["signature"]))
    raw[0] ^= 1
    (tampered / SIGNATURE_FILE).write_text(json.dumps({**doc, "signature": base64.b64encode(bytes(raw)).decode()}))
    with pytest.raises(BundleRefused, match="does not verify"):
        verify_bundle(tampered, [_public(key)])
    (tampered / SIGNATURE_FILE).write_text("not json")
    with pytest.raises(BundleRefused, match="manifest.sig is malformed") as malformed:
        verify_bundle(tampered, [_public(key)])
    assert malformed.value.detail  # the parser's text goes to the log, not the reason


def test_the_signing_key_is_created_once_private_and_its_public_half_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    path = signing_key_path()
    assert path == tmp_path / "secrets" / "bundle_signing_key" and not path.exists()
    key = load_or_create_signing_key()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert public_key_path(path).read_bytes() == public_key_pem(key.public_key())
    assert key_id_of(load_or_create_signing_key().public_key()) == key_id_of(key.public_key()), "the same key again"
    elsewhere = tmp_path / "keys" / "signer.pem"
    monkeypatch.setenv("RECSYS_BUNDLE_SIGNING_KEY_FILE", str(elsewhere))
    assert signing_key_path() == elsewhere
    assert key_id_of(load_or_create_signing_key().public_key()) != key_id_of(key.public_key())
    elsewhere.write_text("garbage")
    with pytest.raises(ValueError, match="RECSYS_BUNDLE_SIGNING_KEY_FILE"):
        load_or_create_signing_key()


def _recommender(**overrides: Any) -> tuple[Recommender, prometheus_client.CollectorRegistry]:
    registry = prometheus_client.CollectorRegistry()
    settings = ServingSettings.from_env(**{"feature_repo": str(Path(__file__).parents[1] / "feature_repo"),
                                           "reload_interval_s": INTERVAL_S, **overrides})
    return Recommender(settings, ServiceMetrics(registry=registry)), registry


def test_the_server_refuses_a_forged_bundle_where_a_key_is_configured_and_rollback_too(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    root = tmp_path / "bundles"
    key = load_or_create_signing_key()  # what model_bundle does: $RECSYS_HOME/secrets/bundle_signing_key(.pub)
    _signed(root, exported, "v1", key)
    _forge(root / "v1", root / "v1-forged")
    _write(root, exported, "v0-unsigned")
    promote(root, "v1")
    with caplog.at_level(logging.WARNING, logger="recsys_serving"):
        recommender, registry = _recommender()
    assert "not checked" not in caplog.text, "a key is configured (the default .pub): no warning"
    try:
        health = recommender.health()
        assert health.model_version == "v1" and health.signed and health.signing_key == key_id_of(key.public_key())

        _switch(root, "v1-forged")  # the pointer names it (promote() would refuse it, see below)
        wait_until(lambda: registry.get_sample_value("recsys_model_switches_total", {"outcome": "refused"}) == 1,
              "the forged bundle refused")
        health = recommender.health()
        assert health.model_version == "v1" and health.signed, "v1 keeps serving"
        assert health.last_refused is not None and health.last_refused.version == "v1-forged"
        assert "signature of manifest.json does not verify" in health.last_refused.reason
        answer = asyncio.run(recommender.recommend(RecommendRequest(user_id="x", k=3, recent_items=["item-5"])))
        assert answer.model_version == "v1" and answer.reason == "model"

        _switch(root, "v0-unsigned")
        wait_until(lambda: registry.get_sample_value("recsys_model_switches_total", {"outcome": "refused"}) == 2,
              "the unsigned bundle refused")
        assert "not signed" in recommender.health().last_refused.reason  # type: ignore[union-attr]
    finally:
        recommender.close()

    _switch(root, "v1")
    for target in ("v1-forged", "v0-unsigned"):
        with pytest.raises(BundleRefused):
            rollback(root, to=target)
        assert current_version(root) == "v1"
        with pytest.raises(BundleRefused):
            promote(root, target)

    # started on the forged bundle: refused, and its popularity list is not salvaged (its manifest
    # cannot be trusted), so nothing useful can be answered
    forged, _ = _recommender(bundle_path=str(root / "v1-forged"))
    try:
        health = forged.health()
        assert health.status == "unavailable" and health.model_version is None and not health.signed
        assert "does not verify" in (health.reason or "")
    finally:
        forged.close()


def test_without_a_key_bundles_are_accepted_unsigned_and_a_warning_says_so(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    root = tmp_path / "bundles"
    _forge(_signed(root, exported, "v1", Ed25519PrivateKey.generate()), root / "v1-forged")
    promote(root, "v1-forged")  # no key configured: promotion checks the checksums only
    with caplog.at_level(logging.WARNING, logger="recsys_serving"):
        recommender, _ = _recommender()
    try:
        warnings = [r for r in caplog.records if "signatures are not checked" in r.getMessage()]
        assert len(warnings) == 1
        health = recommender.health()
        assert health.model_version == "v1" and health.signed is False and health.signing_key is None
    finally:
        recommender.close()


def test_public_keys_from_a_directory_or_a_list_and_bad_configurations_stop_the_service(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    root = tmp_path / "bundles"
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = tmp_path / "trusted"
    keys.mkdir()
    (keys / "old.pub").write_bytes(public_key_pem(old.public_key()))
    (keys / "new.pub").write_bytes(public_key_pem(new.public_key()))
    _signed(root, exported, "by-old", old)
    _signed(root, exported, "by-new", new)
    promote(root, "by-old", public_keys=[_public(old)])
    # a directory: both keys trusted, so bundles signed with the new key are served before the old retires
    recommender, _ = _recommender(bundle_public_key_file=str(keys))
    try:
        assert recommender.health().signing_key == key_id_of(old.public_key())
        promote(root, "by-new", public_keys=[_public(new)])
        wait_until(lambda: recommender.model_version == "by-new", "the bundle signed with the new key is served")
        assert recommender.health().signing_key == key_id_of(new.public_key())
    finally:
        recommender.close()
    listed, _ = _recommender(bundle_public_key_file=f"{keys / 'new.pub'}, {keys / 'old.pub'}")
    try:
        assert listed.health().signed
    finally:
        listed.close()

    (tmp_path / "empty").mkdir()
    (tmp_path / "not-a-key.pub").write_text("hello")
    for spec, message in ((str(tmp_path / "missing.pub"), "does not exist"), (str(tmp_path / "empty"), "holds no"),
                          (str(tmp_path / "not-a-key.pub"), "not a readable PEM public key")):
        with pytest.raises(ValueError, match=message):
            _recommender(bundle_public_key_file=spec)
