"""The model bundle: the one contract between training and serving.

A bundle is a write-once directory::

    manifest.json    format version, model spec, data window, metrics, sha256 of every other file
    model.onnx       BERT4Rec with masking and top-K inside the graph (see MODEL_INPUTS/OUTPUTS)
    model.plan       TensorRT engine, only where one was built (GPU)
    vocabulary.json  token <-> item id (+ category), context value -> token
    popularity.json  fallback lists: global, per segment, per device

This module defines the format (the writer in recsys_assets.export.bundle imports it) and reads it
for serving. It never imports torch or recsys_assets, so the service image stays small.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recsys_serving.contract import CONTEXT_FIELDS, FIRST_ITEM_TOKEN

BUNDLE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
PLAN_FILE = "model.plan"
VOCABULARY_FILE = "vocabulary.json"
POPULARITY_FILE = "popularity.json"
REQUIRED_FILES: tuple[str, ...] = (MODEL_FILE, VOCABULARY_FILE, POPULARITY_FILE)

# The graph interface serving relies on. Context inputs are optional (a model trained without a
# context kind may not have the input); `tokens` and `exclude` are required.
MODEL_REQUIRED_INPUTS: tuple[str, ...] = ("tokens", "exclude")
MODEL_CONTEXT_INPUTS: tuple[str, ...] = CONTEXT_FIELDS
MODEL_INPUTS: tuple[str, ...] = ("tokens", *MODEL_CONTEXT_INPUTS, "exclude")
MODEL_OUTPUTS: tuple[str, ...] = ("top_scores", "top_tokens", "scores")


class BundleRefused(Exception):
    """The bundle cannot be served; `reason` says why in one line."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"bundle {path} refused: {reason}")
        self.path = str(path)
        self.reason = reason


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class ModelSpec(BaseModel):
    """What serving needs to know to feed the graph."""

    model_config = ConfigDict(extra="forbid")

    architecture: Literal["bert4rec"]
    max_len: int = Field(ge=2, description="longest input incl. the trailing [MASK]")
    vocab_size: int = Field(ge=FIRST_ITEM_TOKEN + 1)
    top_k: int = Field(ge=1, description="width of the top-K inside the graph (the largest k served)")
    inputs: list[str]
    outputs: list[str]
    opset: int
    config: dict[str, Any] = Field(default_factory=dict, description="the training config, for people")


class Manifest(BaseModel):
    """manifest.json. Unknown keys are refused: a newer writer must bump the format version."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    created_at: str
    model: ModelSpec
    data_window: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict, description="the evaluation report (metrics.json)")
    gate: dict[str, Any] = Field(default_factory=dict, description="the promotion decision at build time")
    export: dict[str, Any] = Field(default_factory=dict, description="parity figures, TensorRT status")
    files: dict[str, FileEntry]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> Manifest:
    """Parse and check manifest.json without touching the other files."""
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise BundleRefused(path, "not a directory (no bundle promoted yet?)")
    if not manifest_path.is_file():
        raise BundleRefused(path, f"{MANIFEST_FILE} is missing")
    try:
        raw = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleRefused(path, f"{MANIFEST_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleRefused(path, f"{MANIFEST_FILE} is not a JSON object")
    version = raw.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleRefused(
            path, f"format_version {version!r} is not understood (this server reads {BUNDLE_FORMAT_VERSION})"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleRefused(path, f"{MANIFEST_FILE} field {where!r}: {first['msg']}") from exc
    missing_inputs = [n for n in MODEL_REQUIRED_INPUTS if n not in manifest.model.inputs]
    unknown_inputs = [n for n in manifest.model.inputs if n not in MODEL_INPUTS]
    if missing_inputs or unknown_inputs:
        raise BundleRefused(path, f"model inputs {manifest.model.inputs} not understood (expected {MODEL_INPUTS})")
    if not {"top_scores", "top_tokens"} <= set(manifest.model.outputs):
        raise BundleRefused(path, f"model outputs {manifest.model.outputs} lack top_scores/top_tokens")
    return manifest


def verify_file(path: Path, name: str, entry: FileEntry) -> None:
    """Raise BundleRefused unless `name` exists with the recorded size and sha256."""
    file_path = path / name
    if not file_path.is_file():
        raise BundleRefused(path, f"{name} is listed in the manifest but missing")
    size = file_path.stat().st_size
    if size != entry.bytes:
        raise BundleRefused(path, f"{name} has {size} bytes, the manifest says {entry.bytes}")
    actual = sha256_file(file_path)
    if actual != entry.sha256:
        raise BundleRefused(path, f"{name} sha256 {actual[:12]}… does not match the manifest ({entry.sha256[:12]}…)")


def verify_bundle(path: Path) -> Manifest:
    """Full check: format, required files, no unlisted file, every checksum."""
    manifest = read_manifest(path)
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise BundleRefused(path, f"{name} is not listed in the manifest")
    on_disk = {p.name for p in path.iterdir() if p.name != MANIFEST_FILE}
    unlisted = sorted(on_disk - set(manifest.files))
    if unlisted:
        raise BundleRefused(path, f"files not in the manifest: {unlisted} (bundles are write-once)")
    for name, entry in manifest.files.items():
        if Path(name).name != name:
            raise BundleRefused(path, f"manifest file name {name!r} is not a plain file name")
        verify_file(path, name, entry)
    return manifest


@dataclass
class Vocabulary:
    """token <-> item id and context value -> token, as the model was trained."""

    items: list[str]  # items[token - FIRST_ITEM_TOKEN]
    categories: list[str | None]
    devices: dict[str, int]
    segments: dict[str, int]
    item_to_token: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_to_token = {item: i + FIRST_ITEM_TOKEN for i, item in enumerate(self.items)}

    @property
    def vocab_size(self) -> int:
        return len(self.items) + FIRST_ITEM_TOKEN

    def item_id(self, token: int) -> str:
        return self.items[token - FIRST_ITEM_TOKEN]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Vocabulary":
        items = raw["items"]
        categories = raw.get("categories") or [None] * len(items)
        context = raw.get("context", {})
        if len(categories) != len(items):
            raise ValueError("categories and items differ in length")
        return cls(
            items=[str(i) for i in items],
            categories=categories,
            devices={str(k): int(v) for k, v in context.get("device", {}).items()},
            segments={str(k): int(v) for k, v in context.get("segment", {}).items()},
        )


class PopularItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str
    score: float


class Popularity(BaseModel):
    """Fallback lists, most popular first; per-segment/device lists exist where the data had them."""

    model_config = ConfigDict(extra="forbid")

    global_: list[PopularItem] = Field(alias="global")
    by_segment: dict[str, list[PopularItem]] = Field(default_factory=dict)
    by_device: dict[str, list[PopularItem]] = Field(default_factory=dict)
    window: dict[str, Any] = Field(default_factory=dict, description="what the counts cover")

    def choose(self, device: str | None, segment: str | None) -> tuple[list[PopularItem], str]:
        """The most specific list available: device, then segment, then global."""
        if device and device in self.by_device:
            return self.by_device[device], f"device:{device}"
        if segment and segment in self.by_segment:
            return self.by_segment[segment], f"segment:{segment}"
        return self.global_, "global"


@dataclass
class LoadedBundle:
    path: Path
    manifest: Manifest
    vocabulary: Vocabulary
    popularity: Popularity

    @property
    def version(self) -> str:
        return self.manifest.version


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleRefused(path, f"{name} cannot be read: {exc}") from exc


def read_popularity(path: Path, manifest: Manifest) -> Popularity:
    entry = manifest.files.get(POPULARITY_FILE)
    if entry is None:
        raise BundleRefused(path, f"{POPULARITY_FILE} is not listed in the manifest")
    verify_file(path, POPULARITY_FILE, entry)
    try:
        return Popularity.model_validate(_read_json(path, POPULARITY_FILE))
    except ValidationError as exc:
        raise BundleRefused(path, f"{POPULARITY_FILE} is malformed: {exc.errors()[0]['msg']}") from exc


def load_bundle(path: Path) -> LoadedBundle:
    """Verify everything, then read vocabulary and popularity. The ONNX session is the caller's."""
    path = Path(path).resolve()  # pin the version: `current` may be switched while we run
    manifest = verify_bundle(path)
    try:
        vocabulary = Vocabulary.from_json(_read_json(path, VOCABULARY_FILE))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleRefused(path, f"{VOCABULARY_FILE} is malformed: {exc}") from exc
    if vocabulary.vocab_size != manifest.model.vocab_size:
        raise BundleRefused(
            path, f"vocabulary has {vocabulary.vocab_size} tokens, the model {manifest.model.vocab_size}"
        )
    popularity = read_popularity(path, manifest)
    return LoadedBundle(path=path, manifest=manifest, vocabulary=vocabulary, popularity=popularity)


def salvage_popularity(path: Path) -> Popularity | None:
    """For a refused bundle: its popularity list if that one file still verifies, else None."""
    try:
        path = Path(path).resolve()
        raw = json.loads((path / MANIFEST_FILE).read_text())
        entry = FileEntry.model_validate(raw["files"][POPULARITY_FILE])
        verify_file(path, POPULARITY_FILE, entry)
        return Popularity.model_validate(_read_json(path, POPULARITY_FILE))
    except (OSError, KeyError, TypeError, ValueError, BundleRefused):
        return None


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
