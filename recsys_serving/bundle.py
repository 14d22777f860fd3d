"""The model bundle: the one contract between training and serving.

A bundle is a write-once directory::

    manifest.json    format version, model spec, data window, metrics, sha256 of every other file
    manifest.sig     Ed25519 signature of manifest.json's exact bytes (signed bundles; see below)
    model.onnx       BERT4Rec with masking and top-K inside the graph (see MODEL_INPUTS/OUTPUTS)
    model.plan       TensorRT engine, only where one was built (GPU)
    vocabulary.json  token <-> item id (+ category), context value -> token
    popularity.json  fallback lists: global, and per device / segment / time of day and their combinations
    ann_index.faiss  only with an ANN ranking (ModelSpec.ranking): FAISS index over the items
    ann_items.npy    ... and its exact fp32 rescoring table

This module defines the format (the writer in recsys_assets.export.bundle imports it) and reads it
for serving. It never imports torch or recsys_assets, so the service image stays small.

Signing: the manifest lists every other file's sha256, so a signature over its bytes covers the
whole bundle; someone who can rewrite the files and the manifest's checksums cannot forge it
without the private key, which only the build side (the Dagster code location) holds. A reader
given public keys refuses a bundle that is unsigned or whose signature verifies with none of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from recsys_serving.contract import (
    CONTEXT_FIELDS,
    FIRST_ITEM_TOKEN,
    TIME_OF_DAY_BUCKETS,
    PredictionTarget,
    recsys_home_path,
)

BUNDLE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
PLAN_FILE = "model.plan"
VOCABULARY_FILE = "vocabulary.json"
POPULARITY_FILE = "popularity.json"
SIGNATURE_FILE = "manifest.sig"
ANN_INDEX_FILE = "ann_index.faiss"  # bundles exported with item_table="ann" (AnnRanking)
ANN_TABLE_FILE = "ann_items.npy"
ANN_QUERY_OUTPUT = "query"  # the one output of an ANN bundle's graph: the [MASK] query [B, hidden]
REQUIRED_FILES: tuple[str, ...] = (MODEL_FILE, VOCABULARY_FILE, POPULARITY_FILE)

# The graph interface serving relies on. Context inputs are optional (a model trained without a
# context kind may not have the input); `tokens` and `exclude` are required.
MODEL_REQUIRED_INPUTS: tuple[str, ...] = ("tokens", "exclude")
MODEL_CONTEXT_INPUTS: tuple[str, ...] = CONTEXT_FIELDS
MODEL_INPUTS: tuple[str, ...] = ("tokens", *MODEL_CONTEXT_INPUTS, "exclude")
MODEL_OUTPUTS: tuple[str, ...] = ("top_scores", "top_tokens", "scores")

# Keys. The private key lives only where bundles are built; serving gets public keys.
SIGNING_KEY_ENV = "RECSYS_BUNDLE_SIGNING_KEY_FILE"
PUBLIC_KEYS_ENV = "RECSYS_BUNDLE_PUBLIC_KEY_FILE"
DEFAULT_SIGNING_KEY = Path("secrets") / "bundle_signing_key"  # under $RECSYS_HOME
PUBLIC_KEY_SUFFIX = ".pub"  # the public key is written beside the private one, <key file>.pub


class BundleRefused(Exception):
    """The bundle cannot be served. `reason`: one plain line without paths or exception texts (what
    responses show); `detail`: the underlying error, for the log only."""

    def __init__(self, path: Path | str, reason: str, detail: str | None = None) -> None:
        super().__init__(f"bundle {path} refused: {reason}" + (f" ({detail})" if detail else ""))
        self.path = str(path)
        self.reason = reason
        self.detail = detail


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class AnnRanking(BaseModel):
    """The approximate nearest-neighbour ranking stage of a bundle exported with item_table="ann"
    (recsys_serving.ann runs it). model.onnx then takes the inputs but `exclude` and outputs the
    [MASK] query [B, hidden]; the FAISS inner-product index over the item tokens' rows [item vector,
    output bias], zero-padded to `index_dim`, searched with [query, 1, 0...], proposes `candidates`
    tokens; they are rescored exactly in fp32 against `table_file` ([vocab_size, hidden + 1]: the
    same rows, one per token), history and PAD/MASK left out, to the model's top_k. `inputs` and
    `outputs` of the ModelSpec stay the served interface (graph + this stage)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["faiss"] = "faiss"
    index_file: str = ANN_INDEX_FILE
    table_file: str = ANN_TABLE_FILE
    factory: str = Field(description="the FAISS index_factory string the index was built with, for people")
    index_dim: int = Field(ge=2, description="width of the index's vectors (hidden + 1, zero-padded)")
    candidates: int = Field(ge=1, description="neighbours asked from the index, then rescored exactly")
    nprobe: int | None = Field(None, ge=1, description="IVF cells searched (IVF indexes only)")

    @property
    def files(self) -> tuple[str, str]:
        return self.index_file, self.table_file


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
    target: dict[str, Any] = Field(
        default_factory=lambda: PredictionTarget().to_dict(),
        description="what the model predicts (contract.PredictionTarget); next_item when absent",
    )
    config: dict[str, Any] = Field(default_factory=dict, description="the training config, for people")
    ranking: AnnRanking | None = Field(None, description="an ANN ranking stage after the graph; None: top-K in the graph")

    @field_validator("target")
    @classmethod
    def _known_target(cls, value: dict[str, Any]) -> dict[str, Any]:
        return PredictionTarget.from_dict(value).to_dict()  # raises ValueError on an unknown target

    @cached_property
    def prediction_target(self) -> PredictionTarget:
        # read on every request (serving's state): parsed once per loaded manifest
        return PredictionTarget.from_dict(self.target)


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


class ManifestSignature(BaseModel):
    """manifest.sig: an Ed25519 signature of manifest.json's exact bytes."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["ed25519"]
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="key_id_of the signing key's public half")
    signature: str = Field(description="base64 of the 64-byte signature")


@dataclass(frozen=True)
class PublicKey:
    key_id: str
    key: Ed25519PublicKey


def key_id_of(key: Ed25519PublicKey) -> str:
    """A short, stable name of a public key (sha256 of its raw bytes): which key signed a bundle."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign_manifest(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The content of manifest.sig for these manifest bytes."""
    doc = ManifestSignature(
        algorithm="ed25519",
        key_id=key_id_of(private_key.public_key()),
        signature=base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii"),
    )
    return (doc.model_dump_json(indent=1) + "\n").encode()


def public_key_paths(spec: str | None, home: Path) -> list[Path]:
    """The public key files to trust. `spec` (RECSYS_BUNDLE_PUBLIC_KEY_FILE): comma-separated files or
    directories (every *.pub inside), so a new key can be trusted before bundles are signed with it;
    unset: $RECSYS_HOME/secrets/bundle_signing_key.pub if it exists, else none. A named path that is
    missing, or a directory without keys, is a ValueError (never a silent "no key")."""
    if spec is None or not spec.strip():
        default = home / DEFAULT_SIGNING_KEY.with_name(DEFAULT_SIGNING_KEY.name + PUBLIC_KEY_SUFFIX)
        return [default] if default.is_file() else []
    paths: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.glob(f"*{PUBLIC_KEY_SUFFIX}") if p.is_file())
            if not found:
                raise ValueError(f"{PUBLIC_KEYS_ENV}: the directory {path} holds no *{PUBLIC_KEY_SUFFIX} key")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise ValueError(f"{PUBLIC_KEYS_ENV}: {path} does not exist")
    if not paths:
        raise ValueError(f"{PUBLIC_KEYS_ENV}={spec!r} names no key file")
    return paths


def load_public_keys(paths: Sequence[Path]) -> list[PublicKey]:
    """PEM (SubjectPublicKeyInfo) Ed25519 public keys; ValueError naming the file that is not one."""
    keys: list[PublicKey] = []
    for path in paths:
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{PUBLIC_KEYS_ENV}: {path} is not a readable PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{PUBLIC_KEYS_ENV}: {path} is a {type(key).__name__}, not an Ed25519 public key")
        keys.append(PublicKey(key_id=key_id_of(key), key=key))
    return keys


def configured_public_keys(environ: Mapping[str, str] | None = None) -> list[PublicKey]:
    """The keys RECSYS_BUNDLE_PUBLIC_KEY_FILE names (default: $RECSYS_HOME's, if any), for the build
    side's checks (promotion, rollback, the bento); serving reads the same variable through its settings."""
    env = os.environ if environ is None else environ
    return load_public_keys(public_key_paths(env.get(PUBLIC_KEYS_ENV), recsys_home_path()))


def verify_signature(path: Path, manifest_bytes: bytes, keys: Sequence[PublicKey]) -> str:
    """The key_id of the configured key that verifies manifest.sig over `manifest_bytes`; else BundleRefused."""
    sig_path = path / SIGNATURE_FILE
    if not sig_path.is_file():
        raise BundleRefused(path, f"the bundle is not signed ({SIGNATURE_FILE} is missing) and public keys are configured")
    try:
        doc = ManifestSignature.model_validate_json(sig_path.read_bytes())
        signature = base64.b64decode(doc.signature, validate=True)
    except (OSError, ValidationError, ValueError) as exc:
        raise BundleRefused(path, f"{SIGNATURE_FILE} is malformed", detail=str(exc)) from exc
    for key in sorted(keys, key=lambda k: k.key_id != doc.key_id):  # the named key first
        try:
            key.key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return key.key_id
    raise BundleRefused(
        path,
        f"the signature of {MANIFEST_FILE} does not verify with any of the {len(keys)} configured public "
        f"key(s) (it names key {doc.key_id})",
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path, public_keys: Sequence[PublicKey] | None = None) -> Manifest:
    """Parse and check manifest.json without touching the other files (and its signature, given keys)."""
    return _read_manifest(path, public_keys)[0]


def _read_manifest(path: Path, public_keys: Sequence[PublicKey] | None) -> tuple[Manifest, str | None]:
    """-> (manifest, key_id of the key that verified its signature, None when no keys are given).
    The bytes are read once: the signature covers exactly what is parsed."""
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise BundleRefused(path, "not a directory (no bundle promoted yet?)")
    if not manifest_path.is_file():
        raise BundleRefused(path, f"{MANIFEST_FILE} is missing")
    try:
        manifest_bytes = manifest_path.read_bytes()
    except OSError as exc:
        raise BundleRefused(path, f"{MANIFEST_FILE} cannot be read", detail=str(exc)) from exc
    signed_by = verify_signature(path, manifest_bytes, public_keys) if public_keys else None
    try:
        raw = json.loads(manifest_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleRefused(path, f"{MANIFEST_FILE} is not valid JSON", detail=str(exc)) from exc
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
    ranking = manifest.model.ranking
    if ranking is not None:
        unlisted = [name for name in ranking.files if name not in manifest.files]
        if unlisted:
            raise BundleRefused(path, f"the ANN ranking's {unlisted} are not listed in the manifest")
    return manifest, signed_by


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


def verify_bundle(path: Path, public_keys: Sequence[PublicKey] | None = None) -> Manifest:
    """Full check: the signature (when `public_keys` are given), format, required files, no unlisted
    file, every checksum."""
    return _verify_bundle(path, public_keys)[0]


def _verify_bundle(path: Path, public_keys: Sequence[PublicKey] | None) -> tuple[Manifest, str | None]:
    manifest, signed_by = _read_manifest(path, public_keys)
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise BundleRefused(path, f"{name} is not listed in the manifest")
    on_disk = {p.name for p in path.iterdir() if p.name not in (MANIFEST_FILE, SIGNATURE_FILE)}
    unlisted = sorted(on_disk - set(manifest.files))
    if unlisted:
        raise BundleRefused(path, f"files not in the manifest: {unlisted} (bundles are write-once)")
    for name, entry in manifest.files.items():
        if Path(name).name != name:
            raise BundleRefused(path, f"manifest file name {name!r} is not a plain file name")
        verify_file(path, name, entry)
    return manifest, signed_by


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


# The request context a popularity list can be specific to; in the document every value is a string
# (time_of_day: the contract's token, "1".."TIME_OF_DAY_BUCKETS").
ContextDimension = Literal["device", "segment", "time_of_day"]
CONTEXT_DIMENSIONS: tuple[ContextDimension, ...] = ("device", "segment", "time_of_day")
TIME_OF_DAY_VALUES: frozenset[str] = frozenset(str(t) for t in range(1, TIME_OF_DAY_BUCKETS + 1))
# The lists a fallback looks for, most specific first: all three dimensions, then pairs, then single
# dimensions, then global; the first the bundle has for the request's values answers (and the next
# ones top it up). The writer builds exactly these. Among pairs and among singles: time of day, then
# device, then segment, as benchmarks/cold_start_users.py ranked them (README: new users); device
# before segment keeps the order bundles had before context lists.
POPULARITY_CHOICE_ORDER: tuple[tuple[ContextDimension, ...], ...] = (
    ("device", "segment", "time_of_day"),
    ("device", "time_of_day"),
    ("segment", "time_of_day"),
    ("device", "segment"),
    ("time_of_day",),
    ("device",),
    ("segment",),
)

GroupKey = tuple[tuple[str, str], ...]  # ((dimension, value), ...) in CONTEXT_DIMENSIONS order


def _group_key(context: Mapping[ContextDimension, str]) -> GroupKey:
    return tuple((d, context[d]) for d in CONTEXT_DIMENSIONS if d in context)


class PopularGroup(BaseModel):
    """The most popular items among the events of one context, e.g. {"device": "mobile", "time_of_day": "4"}."""

    model_config = ConfigDict(extra="forbid")

    context: dict[ContextDimension, str] = Field(min_length=1)
    items: list[PopularItem]

    @field_validator("context")
    @classmethod
    def _values(cls, value: dict[ContextDimension, str]) -> dict[ContextDimension, str]:
        if any(not v.strip() for v in value.values()):
            raise ValueError("a context value must not be empty")
        tod = value.get("time_of_day")
        if tod is not None and tod not in TIME_OF_DAY_VALUES:
            raise ValueError(f"time_of_day {tod!r} is not a time-of-day token (1..{TIME_OF_DAY_BUCKETS})")
        return value


class Popularity(BaseModel):
    """Fallback lists, most popular first: global, and per context (`groups`) where the data had
    enough events. `choose` picks the most specific one for a request (POPULARITY_CHOICE_ORDER)."""

    model_config = ConfigDict(extra="forbid")

    global_: list[PopularItem] = Field(alias="global")
    groups: list[PopularGroup] = Field(default_factory=list, description="lists per context value combination")
    window: dict[str, Any] = Field(default_factory=dict, description="what the counts cover")
    _index: dict[GroupKey, list[PopularItem]] = PrivateAttr(default_factory=dict)
    _values: dict[str, frozenset[str]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _per_device_and_segment_maps(cls, raw: Any) -> Any:
        """Bundles written before context groups hold `by_device` / `by_segment` maps: read them as
        the single-dimension groups they are."""
        if not isinstance(raw, dict) or not ({"by_device", "by_segment"} & set(raw)):
            return raw
        doc = dict(raw)
        groups = list(doc.get("groups", []))
        for dimension, field_name in (("device", "by_device"), ("segment", "by_segment")):
            lists = doc.pop(field_name, None) or {}
            if not isinstance(lists, dict):
                raise ValueError(f"{field_name} must map values to lists")
            groups += [{"context": {dimension: value}, "items": items} for value, items in lists.items()]
        doc["groups"] = groups
        return doc

    @model_validator(mode="after")
    def _build_index(self) -> Popularity:
        index: dict[GroupKey, list[PopularItem]] = {}
        for group in self.groups:
            key = _group_key(group.context)
            if key in index:
                raise ValueError(f"two popularity lists for the context {dict(key)}")
            index[key] = group.items
        self._index = index
        self._values = {d: frozenset(g.context[d] for g in self.groups if d in g.context) for d in CONTEXT_DIMENSIONS}
        return self

    def knows(self, dimension: ContextDimension, value: str) -> bool:
        """Whether some list is specific to this value (a value no list knows is chosen as if absent)."""
        return value in self._values.get(dimension, frozenset())

    def matching(
        self, device: str | None, segment: str | None, time_of_day: int | None
    ) -> Iterator[tuple[list[PopularItem], str]]:
        """The lists for this request context, most specific first (then global), with their names."""
        given: dict[ContextDimension, str] = {}
        if device:
            given["device"] = device
        if segment:
            given["segment"] = segment
        if time_of_day:  # None or 0, the contract's unknown token: no time-of-day list applies
            given["time_of_day"] = str(time_of_day)
        for dimensions in POPULARITY_CHOICE_ORDER:
            if all(d in given for d in dimensions):
                key = _group_key({d: given[d] for d in dimensions})
                found = self._index.get(key)
                if found is not None:
                    yield found, ",".join(f"{d}={v}" for d, v in key)
        yield self.global_, "global"

    def choose(
        self, device: str | None, segment: str | None, time_of_day: int | None = None
    ) -> tuple[list[PopularItem], str]:
        """The most specific list for the request context (POPULARITY_CHOICE_ORDER), else global.
        `time_of_day`: the contract's token (time_of_day_token_of); None or 0 when unknown."""
        return next(self.matching(device, segment, time_of_day))

    def ranked(
        self,
        device: str | None,
        segment: str | None,
        time_of_day: int | None,
        k: int,
        exclude: Collection[str] = (),
    ) -> list[tuple[str, float]]:
        """The fallback answer: up to `k` items of the chosen list without `exclude`, topped up from
        the less specific lists and global where it runs short."""
        items: list[tuple[str, float]] = []
        seen = set(exclude)
        for source, _ in self.matching(device, segment, time_of_day):
            for entry in source:
                if entry.item_id not in seen:
                    seen.add(entry.item_id)
                    items.append((entry.item_id, entry.score))
                    if len(items) == k:
                        return items
        return items


@dataclass
class LoadedBundle:
    path: Path
    manifest: Manifest
    vocabulary: Vocabulary
    popularity: Popularity
    signed_by: str | None = None  # key_id of the public key that verified it; None: not checked

    @property
    def version(self) -> str:
        return self.manifest.version


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleRefused(path, f"{name} cannot be read", detail=str(exc)) from exc


def read_popularity(path: Path, manifest: Manifest) -> Popularity:
    entry = manifest.files.get(POPULARITY_FILE)
    if entry is None:
        raise BundleRefused(path, f"{POPULARITY_FILE} is not listed in the manifest")
    verify_file(path, POPULARITY_FILE, entry)
    try:
        return Popularity.model_validate(_read_json(path, POPULARITY_FILE))
    except ValidationError as exc:
        raise BundleRefused(path, f"{POPULARITY_FILE} is malformed: {exc.errors()[0]['msg']}") from exc


def load_bundle(path: Path, public_keys: Sequence[PublicKey] | None = None) -> LoadedBundle:
    """Verify everything (the signature too, given `public_keys`), then read vocabulary and
    popularity. The ONNX session is the caller's."""
    path = Path(path).resolve()  # pin the version: `current` may be switched while we run
    manifest, signed_by = _verify_bundle(path, public_keys)
    try:
        vocabulary = Vocabulary.from_json(_read_json(path, VOCABULARY_FILE))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleRefused(path, f"{VOCABULARY_FILE} is malformed", detail=f"{type(exc).__name__}: {exc}") from exc
    if vocabulary.vocab_size != manifest.model.vocab_size:
        raise BundleRefused(
            path, f"vocabulary has {vocabulary.vocab_size} tokens, the model {manifest.model.vocab_size}"
        )
    popularity = read_popularity(path, manifest)
    return LoadedBundle(
        path=path, manifest=manifest, vocabulary=vocabulary, popularity=popularity, signed_by=signed_by
    )


def salvage_popularity(path: Path, public_keys: Sequence[PublicKey] | None = None) -> Popularity | None:
    """For a refused bundle: its popularity list if that one file still verifies, else None. Given
    `public_keys`, only under a manifest whose signature verifies (an unsigned or forged manifest's
    checksum proves nothing)."""
    try:
        path = Path(path).resolve()
        manifest_bytes = (path / MANIFEST_FILE).read_bytes()
        if public_keys:
            verify_signature(path, manifest_bytes, public_keys)
        raw = json.loads(manifest_bytes)
        entry = FileEntry.model_validate(raw["files"][POPULARITY_FILE])
        verify_file(path, POPULARITY_FILE, entry)
        return Popularity.model_validate(_read_json(path, POPULARITY_FILE))
    except (OSError, KeyError, TypeError, ValueError, BundleRefused):
        return None


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
