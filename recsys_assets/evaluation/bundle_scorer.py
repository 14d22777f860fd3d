"""A model bundle as a `Scorer`: the served model judged by the same evaluation code, on the same
eval set, as a freshly trained challenger.

The bundle is loaded and verified with the serving reader (`recsys_serving.bundle.load_bundle`) and
run by serving's `OnnxRanker` session; every user's request is built by serving's own
`recsys_serving.model.encode` (items the bundle does not know are dropped from the history, the
context of the [MASK] position comes from the request: time of day, device, segment; segments take
the request's value at every position, as the online store keeps only the latest one). Batches of
those requests are left-padded with PAD (the graph's input convention, as training's eval batches).

Scores: a graph with the ``scores`` output (the fp32 ranking head) gives BERT4Rec's exact scores
over the whole bundle vocabulary, mapped into the caller's token space; items the bundle does not
know score -inf. The quantized two-stage head and the ANN ranking only emit their constant top-K
(exact full scores are impossible there): the top-K scores are used and every other item is -inf
(`exact` is False).
Nothing is excluded in the graph (only PAD), so the ranking stays the protocol's (history removed
afterwards, target rankable even if seen); HR/NDCG@k of a user are then exact while k + their
history items inside the top-K <= top_k, and MRR and sampled metrics are lower bounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from recsys_assets.data.split import EvalSet
from recsys_assets.evaluation.metrics import full_ranks, ranking_metrics
from recsys_assets.evaluation.protocol import Scorer
from recsys_serving.bundle import LoadedBundle, load_bundle
from recsys_serving.contract import (
    CONTEXT_FIELDS,
    EVENT_TYPE_TOKENS,
    FIRST_ITEM_TOKEN,
    PAD_TOKEN,
    PredictionTarget,
    recsys_home_path,
)
from recsys_serving.model import Encoded, History, MaskContext, OnnxRanker, encode

# Context inputs whose tokens are numbered by a context vocabulary (kind in context_vocabulary).
VOCABULARY_CONTEXTS: dict[str, str] = {"devices": "device", "segments": "segment"}
_EVENT_TYPE_NAMES: dict[int, str] = {token: name for name, token in EVENT_TYPE_TOKENS.items()}
_ROWS_PER_RUN = 256  # requests per ONNX Runtime run, fewer on large catalogues:
_SCORE_BUFFER = 1 << 26  # at most this many scores (256 MB of float32) per run


class BundleScorer:
    """One bundle's ONNX model on the CPU, scoring batches of an EvalSet (module docstring).

    Raises `recsys_serving.bundle.BundleRefused` (with its one-line `reason`) when the bundle does
    not verify or its graph does not load, exactly as the server would refuse it."""

    def __init__(self, bundle_dir: Path, intra_threads: int = 2) -> None:
        self.bundle: LoadedBundle = load_bundle(Path(bundle_dir))
        # use_gpu=False: ranks must not depend on a provider's precision; the cache is unused on CPU.
        self.ranker = OnnxRanker(
            self.bundle, intra_threads=intra_threads, use_gpu=False,
            cache_dir=recsys_home_path() / "cache" / "tensorrt",
        )
        self.outputs = [o.name for o in self.ranker.session.get_outputs()]
        self.exact = "scores" in self.outputs
        self.cold_start_users = 0  # users scored so far with no history item the bundle knows

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def target(self) -> PredictionTarget:
        """What the bundle's model predicts (its manifest; next_item for bundles written before)."""
        return self.bundle.manifest.model.prediction_target

    @property
    def top_k(self) -> int:
        return self.ranker.top_k

    def describe(self) -> dict[str, Any]:
        """What the report records about how the bundle was scored."""
        return {
            "version": self.version,
            "path": str(self.bundle.path),
            "scores": "exact (graph output 'scores')" if self.exact
            else f"graph top-{self.top_k} only, -inf elsewhere (no 'scores' output)",
            "inputs": list(self.ranker.input_names),
            "target": self.target.to_dict(),
            "n_items": len(self.bundle.vocabulary.items),
        }

    def scorer(
        self, item_ids: Sequence[str], context_values: Mapping[str, Mapping[int, str]] | None = None
    ) -> Scorer:
        """A Scorer over another token space: token t >= FIRST_ITEM_TOKEN is ``item_ids[t -
        FIRST_ITEM_TOKEN]`` (as item_vocabulary). `context_values` maps the EvalSet's device and
        segment tokens back to their values ({"device": {token: value}, "segment": {...}}, from
        context_vocabulary); needed only where the bundle's model reads that context."""
        items = np.asarray([str(i) for i in item_ids], dtype=object)
        lookup = self.bundle.vocabulary.item_to_token
        bundle_tokens = np.fromiter((lookup.get(i, -1) for i in items), dtype=np.int64, count=len(items))
        known = np.flatnonzero(bundle_tokens >= 0)
        columns, sources = known + FIRST_ITEM_TOKEN, bundle_tokens[known]
        vocab_size = len(items) + FIRST_ITEM_TOKEN
        values = {kind: {int(t): str(v) for t, v in m.items()} for kind, m in (context_values or {}).items()}

        def score(batch: EvalSet) -> np.ndarray:
            self._check_context(batch, values)
            encoded = [self._encode(batch, i, items, vocab_size, values) for i in range(len(batch))]
            out = np.full((len(batch), vocab_size), -np.inf, dtype=np.float32)
            rows = [i for i, e in enumerate(encoded) if e is not None]
            self.cold_start_users += len(batch) - len(rows)
            rows.sort(key=lambda i: encoded[i].feeds["tokens"].shape[1])  # type: ignore[union-attr]
            per_run = max(1, min(_ROWS_PER_RUN, _SCORE_BUFFER // self.bundle.vocabulary.vocab_size))
            for start in range(0, len(rows), per_run):
                chunk = rows[start : start + per_run]
                scores = self._run([encoded[i] for i in chunk])  # type: ignore[misc]
                out[np.ix_(np.asarray(chunk, dtype=np.int64), columns)] = scores[:, sources]
            return out

        return score

    def _check_context(self, batch: EvalSet, values: Mapping[str, Mapping[int, str]]) -> None:
        for name, kind in VOCABULARY_CONTEXTS.items():
            if name in self.ranker.input_names and name in batch.context and kind not in values:
                raise ValueError(
                    f"bundle {self.version} reads {name!r} but no {kind!r} token -> value map was given "
                    "(context_values, from context_vocabulary): its tokens cannot be matched to the bundle's"
                )

    def _encode(
        self, batch: EvalSet, i: int, items: np.ndarray, vocab_size: int, values: Mapping[str, Mapping[int, str]]
    ) -> Encoded | None:
        """Row i of the batch as the request serving would build (`recsys_serving.model.encode`)."""
        tokens = np.asarray(batch.histories[i], dtype=np.int64)
        if tokens.size and (tokens.min() < FIRST_ITEM_TOKEN or tokens.max() >= vocab_size):
            bad = tokens[(tokens < FIRST_ITEM_TOKEN) | (tokens >= vocab_size)][:5].tolist()
            raise ValueError(
                f"user {batch.user_ids[i]!r}: history tokens {bad} are not items of the {vocab_size - FIRST_ITEM_TOKEN} item ids given"
            )
        ctx = {name: np.asarray(v[i]).tolist() for name, v in batch.context.items() if name in CONTEXT_FIELDS}

        def named(name: str, kind: str) -> list[str | None] | None:
            if name not in ctx:
                return None
            mapping = values.get(kind, {})
            return [mapping.get(int(t)) for t in ctx[name]]

        devices, segments = named("devices", "device"), named("segments", "segment")
        event_types = [_EVENT_TYPE_NAMES.get(int(t), "") for t in ctx["event_types"]] if "event_types" in ctx else None
        history = History(
            item_ids=items[tokens - FIRST_ITEM_TOKEN].tolist(),
            event_types=event_types[:-1] if event_types is not None else None,
            tod=[int(t) for t in ctx["tod"][:-1]] if "tod" in ctx else None,
            devices=devices[:-1] if devices is not None else None,  # type: ignore[arg-type]
        )
        request = MaskContext(
            tod=int(ctx["tod"][-1]) if "tod" in ctx else 0,
            device=devices[-1] if devices is not None else None,
            segment=segments[-1] if segments is not None else None,
        )
        ranker = self.ranker
        return encode(history, request, ranker.vocabulary, ranker.max_len, ranker.input_names)

    def _run(self, encoded: Sequence[Encoded]) -> np.ndarray:
        """[rows, bundle vocab] scores of a run over stacked, left-padded requests."""
        width = max(e.feeds["tokens"].shape[1] for e in encoded)
        feeds: dict[str, np.ndarray] = {}
        for name in self.ranker.input_names:
            if name == "exclude":
                # Only PAD (already -inf): the protocol, not the graph, removes the history, and the
                # target must stay rankable when the user has seen it before.
                feeds[name] = np.full((len(encoded), 1), PAD_TOKEN, dtype=np.int64)
                continue
            stacked = np.zeros((len(encoded), width), dtype=np.int64)
            for row, e in enumerate(encoded):
                values = e.feeds[name][0]
                stacked[row, width - values.shape[0] :] = values
            feeds[name] = stacked
        if self.exact:
            (scores,) = self.ranker.session.run(["scores"], feeds)
            return np.asarray(scores, dtype=np.float32)
        top_scores, top_tokens = self.ranker.rank_batch(feeds)  # the graph's top-K, or the ANN stage's
        scores = np.full((len(encoded), self.bundle.vocabulary.vocab_size), -np.inf, dtype=np.float32)
        np.put_along_axis(scores, np.asarray(top_tokens, dtype=np.int64), np.asarray(top_scores, dtype=np.float32), axis=1)
        return scores


def evaluate_bundle_on_histories(
    bundle_dir: Path,
    histories: list[list[str]],
    targets: list[str],
    ks: Sequence[int] = (10,),
    contexts: dict[str, list[list]] | None = None,
    intra_threads: int = 2,
) -> dict[str, float]:
    """HR@k, NDCG@k (each k), MRR over full ranking (history removed where the bundle's target
    removes it, pessimistic ties), "n" and
    "unknown_target_share", in item-id space: histories of item ids, one target item id each.

    A target the bundle does not know counts as a miss (0 for every metric). `contexts` (optional,
    len(history) + 1 entries per user: the history positions, then the request's): "tod" (time-of-day
    tokens, `recsys_serving.contract.time_of_day_token`), "devices" and "segments" (values), and
    "event_types" (names; the last entry, the outcome to predict, is ignored)."""
    if len(histories) != len(targets):
        raise ValueError(f"{len(histories)} histories but {len(targets)} targets")
    if not targets:
        raise ValueError("no histories to evaluate")
    unknown_fields = sorted(set(contexts or {}) - set(CONTEXT_FIELDS))
    if unknown_fields:
        raise ValueError(f"unknown context fields {unknown_fields}; expected a subset of {list(CONTEXT_FIELDS)}")
    scorer = BundleScorer(bundle_dir, intra_threads=intra_threads)
    # Token space: the bundle's items first, then every other item named here (unknown to it).
    items = list(scorer.bundle.vocabulary.items)
    index = dict(scorer.bundle.vocabulary.item_to_token)
    for item in (str(i) for seq in (*histories, targets) for i in seq):
        if item not in index:
            index[item] = len(items) + FIRST_ITEM_TOKEN
            items.append(item)
    token_histories = [np.fromiter((index[str(i)] for i in h), dtype=np.int64, count=len(h)) for h in histories]
    token_targets = np.fromiter((index[str(t)] for t in targets), dtype=np.int64, count=len(targets))
    context_tokens, context_values = _context_tokens(contexts or {}, len(targets))
    n = len(targets)
    eval_set = EvalSet(
        split="test", user_ids=np.arange(n).astype(str).astype(object), histories=token_histories,
        targets=token_targets, source_rows=np.arange(n), context=context_tokens,
        removes_history=scorer.target.removes_history,
    )
    score = scorer.scorer(items, context_values)
    ranks = np.empty(n, dtype=np.float64)
    for start in range(0, n, 1024):  # users per scorer call, as evaluate's default batch
        batch = eval_set.subset(slice(start, start + 1024))
        ranks[start : start + len(batch)] = full_ranks(score(batch), batch.targets, batch.excluded(slice(None)))
    unknown = token_targets >= len(scorer.bundle.vocabulary.items) + FIRST_ITEM_TOKEN
    ranks[unknown] = np.inf  # a miss, whatever the catalogue size (per_user_metrics: 0 everywhere)
    return {**ranking_metrics(ranks, ks), "n": float(n), "unknown_target_share": float(unknown.mean())}


def _context_tokens(
    contexts: Mapping[str, list[list]], n: int
) -> tuple[dict[str, list[np.ndarray]], dict[str, dict[int, str]]]:
    """Raw per-position context values -> EvalSet context tokens, and the token -> value maps of
    devices and segments that let `BundleScorer.scorer` hand serving the values back."""
    tokens: dict[str, list[np.ndarray]] = {}
    values: dict[str, dict[int, str]] = {}
    for name, rows in contexts.items():
        if len(rows) != n:
            raise ValueError(f"context {name!r} has {len(rows)} rows for {n} histories")
        if name in VOCABULARY_CONTEXTS:
            numbering: dict[str, int] = {}
            tokens[name] = [
                np.array([0 if v is None else numbering.setdefault(str(v), len(numbering) + 1) for v in row], dtype=np.int64)
                for row in rows
            ]
            values[VOCABULARY_CONTEXTS[name]] = {t: v for v, t in numbering.items()}
        elif name == "event_types":
            tokens[name] = [np.array([EVENT_TYPE_TOKENS.get(str(v), 0) for v in row], dtype=np.int64) for row in rows]
        else:
            tokens[name] = [np.array([0 if v is None else int(v) for v in row], dtype=np.int64) for row in rows]
    return tokens, values


__all__ = ["BundleScorer", "evaluate_bundle_on_histories"]
