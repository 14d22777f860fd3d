"""Drift of the live traffic against the served model's training window, with Evidently 0.7.

Reference = the events of the served bundle's training window (its manifest's `data_window`);
current = the events after its end. Per-event and per-user columns are computed in DuckDB (out of
core); bounded, seeded samples of them go to Evidently (`Report` + `DataDriftPreset`), which gives
each signal its statistic, threshold and drift flag. Signals:

- per event: popularity decile of the item in the reference (decile 01 = the most popular tenth of
  the reference's items; items without reference events form the bucket "unseen"), whether the item
  is in the bundle's vocabulary, event type, category, device, segment, time of day (contract buckets);
- per user: sequence length (the user's events in the window);
- prediction drift, from the service's answer log (`SERVED_ANSWERS_DIR`): popularity decile of each
  recommended item and the fallback reason of each answer ("none": the model answered). A window
  without answers is reported as such, not an error.

Performance: the bundle's HR@10/NDCG@10 (`evaluate_bundle_on_histories`) on the current window
(per sampled user with current events: target = their last event, history = every earlier event)
against the same figure on the end of the reference window.

Verdict (`recsys_serving.contract.DriftVerdict`): "drift" when the share of drifted signals is over
`drift_share_threshold` or any of `key_signals` drifted; "degradation" when the relative drop of
`performance_metric` is over `degradation_threshold`; both; else "stable". "no_reference" when
nothing is promoted, the bundle has no training window, or no event lies after it.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import duckdb
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from recsys_serving.bundle import VOCABULARY_FILE, BundleRefused, Vocabulary, read_manifest
from recsys_serving.contract import DriftVerdict, history_length, time_of_day_sql

Log = Callable[[str], None]

EVENT_SIGNALS: tuple[str, ...] = (
    "popularity_decile", "out_of_vocabulary", "event_type", "category", "device", "segment", "time_of_day",
)
USER_SIGNALS: tuple[str, ...] = ("sequence_length",)
RECOMMENDATION_SIGNALS: tuple[str, ...] = ("recommended_popularity_decile",)
ANSWER_SIGNALS: tuple[str, ...] = ("fallback",)
PREDICTION_SIGNALS: frozenset[str] = frozenset((*RECOMMENDATION_SIGNALS, *ANSWER_SIGNALS))
SIGNALS: tuple[str, ...] = (*EVENT_SIGNALS, *USER_SIGNALS, *RECOMMENDATION_SIGNALS, *ANSWER_SIGNALS)
# The row unit of each group of signals: one Evidently report each (a report compares rows of one kind).
UNITS: dict[str, tuple[str, ...]] = {
    "events": EVENT_SIGNALS, "users": USER_SIGNALS, "recommendations": RECOMMENDATION_SIGNALS, "answers": ANSWER_SIGNALS,
}
NUMERICAL_SIGNALS: frozenset[str] = frozenset(USER_SIGNALS)
UNSEEN_BUCKET = "unseen"  # items without events in the reference window
DECILES: tuple[str, ...] = (*(f"{d:02d}" for d in range(1, 11)), UNSEEN_BUCKET)
IN_VOCABULARY, OUT_OF_VOCABULARY = "in_vocabulary", "out_of_vocabulary"
NO_VALUE = "(none)"  # a NULL category / device / segment: a value of its own, not dropped
NO_FALLBACK = "none"  # an answer of the model itself
SIGNAL_UNITS: dict[str, str] = {
    **{s: "event" for s in EVENT_SIGNALS}, "sequence_length": "user",
    "recommended_popularity_decile": "recommended item", "fallback": "answer",
}
ANSWER_GLOB = "*.jsonl*"  # the answer log's files, rotated ones included (answers-<host>-<pid>[.<n>].jsonl[.gz])


class DriftConfig(BaseModel):
    """Thresholds, sample sizes and windows of a drift report."""

    model_config = ConfigDict(extra="forbid")

    drift_share_threshold: float = Field(0.3, ge=0, le=1, description="drift when the share of drifted signals is over this")
    key_signals: list[str] = Field(
        ["popularity_decile", "out_of_vocabulary"], description="drift when any of these drifted, whatever the share"
    )
    categorical_method: str = Field("jensenshannon", description="Evidently stattest of the categorical signals")
    numerical_method: str = Field("wasserstein", description="Evidently stattest of sequence_length")
    categorical_threshold: float = Field(0.1, gt=0, description="threshold of categorical_method")
    numerical_threshold: float = Field(0.1, gt=0, description="threshold of numerical_method")
    per_signal_threshold: dict[str, float] = Field(default_factory=dict, description="thresholds of single signals")
    max_sample_rows: int = Field(200_000, ge=100, description="rows per side and unit handed to Evidently")
    min_rows: int = Field(100, ge=1, description="a signal needs this many rows on each side to be judged")
    seed: int = Field(0, ge=0, description="seed of every sample")
    reference_days: int = Field(0, ge=0, description="only the last N days of the training window (0: all of it)")
    current_days: int = Field(0, ge=0, description="only the last N days after the training window (0: all of it)")
    performance_metric: Literal["NDCG@10", "HR@10"] = "NDCG@10"
    degradation_threshold: float = Field(0.1, ge=0, le=1, description="degradation when the relative drop is over this")
    max_scored_users: int = Field(5_000, ge=1, description="users scored per window (seeded sample)")
    min_scored_users: int = Field(50, ge=1, description="fewer users with a history: performance not judged")
    score_performance: bool = Field(True, description="score the bundle (off: data drift only)")

    @field_validator("key_signals", "per_signal_threshold")
    @classmethod
    def _known_signals(cls, value: Any) -> Any:
        unknown = sorted(set(value) - set(SIGNALS))
        if unknown:
            raise ValueError(f"unknown signals {unknown}; the signals are {list(SIGNALS)}")
        return value


class SignalResult(BaseModel):
    """One signal; `statistic`, `threshold` and `drifted` as Evidently judged them."""

    unit: str
    kind: Literal["data", "prediction"]
    method: str | None = None
    statistic: float | None = None
    threshold: float | None = None
    drifted: bool = False
    evaluated: bool = False
    reference_rows: int = 0
    current_rows: int = 0
    note: str = ""


class WindowSummary(BaseModel):
    start: str | None = None
    end: str | None = None
    events: int = 0
    users: int = 0


class PerformanceSummary(BaseModel):
    metric: str
    reference: dict[str, float] = Field(default_factory=dict)
    current: dict[str, float] = Field(default_factory=dict)
    drop: float | None = Field(None, description="relative drop of `metric`, (reference - current) / reference")
    threshold: float
    degraded: bool = False
    note: str = ""


class AnswerSummary(BaseModel):
    files: int = 0
    lines: int = 0
    unreadable_lines: int = Field(0, description="lines that are not an answer (e.g. a partial last line)")
    reference: int = 0
    current: int = 0
    model_versions: dict[str, dict[str, int]] = Field(default_factory=dict)
    fallback_share: dict[str, float | None] = Field(default_factory=dict)
    note: str = ""


class DriftSummary(BaseModel):
    """summary.json of a report (read by the Pushgateway exporter: verdict, share_drifted, signals, performance)."""

    verdict: DriftVerdict
    reasons: list[str]
    created_at: str
    bundle: dict[str, Any] = Field(default_factory=dict)
    windows: dict[str, WindowSummary] = Field(default_factory=dict)
    signals: dict[str, SignalResult] = Field(default_factory=dict)
    evaluated_signals: int = 0
    drifted_signals: int = 0
    share_drifted: float | None = None
    key_signals_drifted: list[str] = Field(default_factory=list)
    performance: PerformanceSummary | None = None
    popularity_deciles: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="bucket -> share of all events of each window (exact, not sampled)"
    )
    out_of_vocabulary_share: dict[str, float] = Field(default_factory=dict)
    sample_sizes: dict[str, dict[str, int]] = Field(default_factory=dict)
    answers: AnswerSummary = Field(default_factory=AnswerSummary)
    config: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per phase")


@dataclass
class DriftResult:
    summary: DriftSummary
    snapshots: dict[str, Any] = field(default_factory=dict)  # unit -> Evidently Snapshot (for save_html)


@dataclass(frozen=True)
class ServedReference:
    """What the report needs of the served bundle."""

    path: Path
    version: str
    start: datetime
    end: datetime
    items: list[str]
    max_len: int
    data_window: dict[str, Any]


@dataclass(frozen=True)
class _Windows:
    ref_start: datetime
    ref_end: datetime
    cur_start: datetime  # exclusive
    cur_end: datetime


# --------------------------------------------------------------------------- the served bundle


def served_reference(bundle_dir: Path) -> tuple[ServedReference | None, str]:
    """The served bundle's version, training window and vocabulary, or None and why not."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.exists():
        return None, f"no promoted bundle at {bundle_dir}: nothing is served yet"
    try:
        manifest = read_manifest(bundle_dir)
        vocabulary = Vocabulary.from_json(json.loads((bundle_dir / VOCABULARY_FILE).read_text()))
    except (BundleRefused, OSError, ValueError, KeyError) as exc:
        return None, f"the bundle at {bundle_dir} cannot be read: {exc}"
    window = manifest.data_window or {}
    try:
        start, end = datetime.fromisoformat(str(window["start"])), datetime.fromisoformat(str(window["end"]))
    except (KeyError, TypeError, ValueError):
        return None, f"bundle {manifest.version} has no training window (manifest data_window {window})"
    return ServedReference(
        path=bundle_dir, version=manifest.version, start=start, end=end, items=vocabulary.items,
        max_len=manifest.model.max_len, data_window=dict(window),
    ), ""


# --------------------------------------------------------------------------- the report


_TEMP_TABLES = ("_drift_deciles", "_drift_vocabulary", "_drift_events", "_drift_answer_lines", "_drift_answers")


def compute_drift(
    con: duckdb.DuckDBPyConnection,
    table: str,
    bundle_dir: Path,
    answers_dir: Path | None,
    config: DriftConfig | None = None,
    log: Log | None = None,
) -> DriftResult:
    """The drift report of the events in `table` (cleaned_interactions' layout) against the bundle
    at `bundle_dir`, with the answer log in `answers_dir` (missing or empty: no prediction drift).
    Works in temp tables of `con` (`_drift_*`), dropped before it returns."""
    try:
        return _compute_drift(con, table, bundle_dir, answers_dir, config, log)
    finally:
        for name in _TEMP_TABLES:
            con.execute(f"DROP TABLE IF EXISTS temp.{name}")


def _compute_drift(
    con: duckdb.DuckDBPyConnection,
    table: str,
    bundle_dir: Path,
    answers_dir: Path | None,
    config: DriftConfig | None,
    log: Log | None,
) -> DriftResult:
    started = time.perf_counter()
    cfg = config or DriftConfig()
    say = log or (lambda _msg: None)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def finish(summary: DriftSummary, snapshots: dict[str, Any] | None = None) -> DriftResult:
        summary.seconds = round(time.perf_counter() - started, 2)
        return DriftResult(summary, snapshots or {})

    served, why = served_reference(bundle_dir)
    base = {"created_at": created, "config": cfg.model_dump()}
    if served is None:
        return finish(DriftSummary(verdict="no_reference", reasons=[why], **base))
    bundle = {"version": served.version, "path": str(served.path), "data_window": served.data_window}
    windows = _windows(con, table, served, cfg)
    ref, cur = (_window_summary(con, table, lo, hi, inclusive) for lo, hi, inclusive in (
        (windows.ref_start, windows.ref_end, True), (windows.cur_start, windows.cur_end, False)))
    summary = DriftSummary(
        verdict="no_reference", reasons=[], bundle=bundle, windows={"reference": ref, "current": cur}, **base
    )
    if ref.events == 0:
        summary.reasons = [f"{table} has no events in the training window of {served.version} ({ref.start} .. {ref.end})"]
        return finish(summary)
    if cur.events == 0:
        summary.reasons = [f"no events after the training window of {served.version} (ends {served.end}) yet"]
        return finish(summary)
    say(f"reference {ref.start} .. {ref.end}: {ref.events:,} events; current {cur.start} .. {cur.end}: {cur.events:,}")

    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        summary.timings[phase] = round(now - clock, 2)
        clock = now

    lap("windows")
    _stage_events(con, table, served, windows, cfg)
    snapshots: dict[str, Any] = {}
    summary.popularity_deciles = _decile_shares(con)
    summary.out_of_vocabulary_share = _oov_shares(con)
    frames = {"events": _event_samples(con, cfg), "users": _user_samples(con, cfg)}
    lap("event_and_user_columns")
    summary.answers, answer_frames = _answers(con, answers_dir, windows, cfg)
    frames.update(answer_frames)
    lap("answer_log")
    importlib.import_module("evidently.presets")  # its import alone takes seconds: timed apart

    lap("evidently_import")
    signals: dict[str, SignalResult] = {}
    for unit, names in UNITS.items():
        reference, current = frames[unit]
        summary.sample_sizes[unit] = {"reference": len(reference), "current": len(current)}
        results, snapshot = _evidently(unit, names, reference, current, cfg, summary.answers)
        signals.update(results)
        if snapshot is not None:
            snapshots[unit] = snapshot
        say(f"{unit}: {', '.join(f'{n} {r.statistic:.3f}' for n, r in results.items() if r.evaluated) or 'not judged'}")
    lap("evidently")
    summary.signals = signals
    judged = [n for n, s in signals.items() if s.evaluated]
    drifted = [n for n in judged if signals[n].drifted]
    summary.evaluated_signals, summary.drifted_signals = len(judged), len(drifted)
    summary.share_drifted = len(drifted) / len(judged) if judged else None
    summary.key_signals_drifted = [n for n in cfg.key_signals if n in drifted]

    if cfg.score_performance:
        summary.performance = _performance(con, table, served, windows, cfg, summary.sample_sizes)
        lap("performance")
    reasons = []
    over_share = summary.share_drifted is not None and summary.share_drifted > cfg.drift_share_threshold
    drift = over_share or bool(summary.key_signals_drifted)
    if judged:
        reasons.append(
            f"{len(drifted)} of {len(judged)} signals drifted ({summary.share_drifted:.0%}; drift over "
            f"{cfg.drift_share_threshold:.0%}): {', '.join(drifted) or 'none'}"
        )
    if summary.key_signals_drifted:
        reasons.append(f"key signals drifted: {', '.join(summary.key_signals_drifted)}")
    perf = summary.performance
    if perf is not None:
        reasons.append(perf.note)
    degraded = perf is not None and perf.degraded
    summary.verdict = (
        "drift_and_degradation" if drift and degraded else "drift" if drift else "degradation" if degraded else "stable"
    )
    if not judged and (perf is None or perf.drop is None):  # "stable" would claim what was not checked
        summary.verdict = "no_reference"
        reasons.insert(0, f"too little data after the training window to judge anything ({cur.events:,} events)")
    summary.reasons = [r for r in reasons if r]
    return finish(summary, snapshots)


def _windows(con: duckdb.DuckDBPyConnection, table: str, served: ServedReference, cfg: DriftConfig) -> _Windows:
    ref_start = served.start
    if cfg.reference_days:
        ref_start = max(ref_start, served.end - timedelta(days=cfg.reference_days))
    newest = con.execute(f'SELECT max(ts) FROM "{table}"').fetchall()[0][0]
    cur_end = max(newest, served.end) if newest is not None else served.end
    cur_start = served.end
    if cfg.current_days:
        cur_start = max(cur_start, cur_end - timedelta(days=cfg.current_days))
    return _Windows(ref_start, served.end, cur_start, cur_end)


def _window_summary(
    con: duckdb.DuckDBPyConnection, table: str, lo: datetime, hi: datetime, inclusive: bool
) -> WindowSummary:
    op = ">=" if inclusive else ">"
    events, users = con.execute(
        f'SELECT count(*), count(DISTINCT user_id) FROM "{table}" WHERE ts {op} ? AND ts <= ?', [lo, hi]
    ).fetchall()[0]
    return WindowSummary(start=str(lo), end=str(hi), events=int(events), users=int(users))


def _side_sql(windows: _Windows, ts: str = "ts") -> str:
    """'reference' | 'current' | NULL (outside both) of a timestamp column."""
    return (
        f"CASE WHEN {ts} >= TIMESTAMP '{windows.ref_start}' AND {ts} <= TIMESTAMP '{windows.ref_end}' THEN 'reference'"
        f" WHEN {ts} > TIMESTAMP '{windows.cur_start}' AND {ts} <= TIMESTAMP '{windows.cur_end}' THEN 'current' END"
    )


def _stage_events(
    con: duckdb.DuckDBPyConnection, table: str, served: ServedReference, windows: _Windows, cfg: DriftConfig
) -> None:
    """Temp tables: the reference popularity deciles, the served vocabulary, the per-event columns."""
    columns = {r[0] for r in con.execute(f'DESCRIBE "{table}"').fetchall()}
    missing = {"user_id", "item_id", "ts", "event_id"} - columns
    if missing:
        raise ValueError(f"{table} lacks the columns {sorted(missing)} a drift report needs")

    def col(name: str) -> str:
        return f"coalesce(CAST(\"{name}\" AS VARCHAR), '{NO_VALUE}')" if name in columns else f"'{NO_VALUE}'"

    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _drift_deciles AS
            SELECT item_id, lpad(CAST(ntile(10) OVER (ORDER BY n DESC, item_id) AS VARCHAR), 2, '0') AS decile
            FROM (SELECT item_id, count(*) AS n FROM "{table}"
                  WHERE ts >= ? AND ts <= ? GROUP BY item_id)""",
        [windows.ref_start, windows.ref_end],
    )
    con.register("_drift_vocabulary_arrow", pa.table({"item_id": pa.array(served.items, pa.string())}))
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE _drift_vocabulary AS SELECT DISTINCT item_id FROM _drift_vocabulary_arrow")
    finally:
        con.unregister("_drift_vocabulary_arrow")
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _drift_events AS
            SELECT side, hash(e.event_id, {cfg.seed}) AS draw, e.user_id,
                   coalesce(d.decile, '{UNSEEN_BUCKET}') AS popularity_decile,
                   CASE WHEN v.item_id IS NULL THEN '{OUT_OF_VOCABULARY}' ELSE '{IN_VOCABULARY}' END AS out_of_vocabulary,
                   {col('event_type')} AS event_type, {col('category')} AS category, {col('device')} AS device,
                   {col('segment')} AS segment, CAST({time_of_day_sql('e.ts')} AS VARCHAR) AS time_of_day
            FROM (SELECT *, {_side_sql(windows)} AS side FROM "{table}") e
            LEFT JOIN _drift_deciles d USING (item_id)
            LEFT JOIN _drift_vocabulary v USING (item_id)
            WHERE side IS NOT NULL"""
    )


def _decile_shares(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, float]]:
    rows = con.execute(
        """SELECT popularity_decile, side, count(*) / sum(count(*)) OVER (PARTITION BY side)
           FROM _drift_events GROUP BY popularity_decile, side"""
    ).fetchall()
    shares = {bucket: {"reference": 0.0, "current": 0.0} for bucket in DECILES}
    for bucket, side, share in rows:
        shares[bucket][side] = float(share)
    return shares


def _oov_shares(con: duckdb.DuckDBPyConnection) -> dict[str, float]:
    rows = con.execute(
        f"SELECT side, avg(CAST(out_of_vocabulary = '{OUT_OF_VOCABULARY}' AS DOUBLE)) FROM _drift_events GROUP BY side"
    ).fetchall()
    return {"reference": 0.0, "current": 0.0, **{side: float(v) for side, v in rows}}


def _sample(con: duckdb.DuckDBPyConnection, query: str, columns: list[str], n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first `n` rows of each side of `query` (which has `side` and `draw`) by the seeded draw."""
    select = ", ".join(f'"{c}"' for c in columns)
    frames = []
    for side in ("reference", "current"):
        frames.append(
            con.execute(f"SELECT {select} FROM ({query}) WHERE side = ? ORDER BY draw LIMIT {int(n)}", [side]).df()
        )
    return frames[0], frames[1]


def _event_samples(con: duckdb.DuckDBPyConnection, cfg: DriftConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    return _sample(con, "SELECT * FROM _drift_events", list(EVENT_SIGNALS), cfg.max_sample_rows)


def _user_samples(con: duckdb.DuckDBPyConnection, cfg: DriftConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    query = f"""SELECT side, hash(user_id, {cfg.seed}) AS draw, CAST(count(*) AS DOUBLE) AS sequence_length
                FROM _drift_events GROUP BY side, user_id"""
    return _sample(con, query, list(USER_SIGNALS), cfg.max_sample_rows)


# --------------------------------------------------------------------------- the answer log


def answer_files(answers_dir: Path | None) -> list[Path]:
    if answers_dir is None or not Path(answers_dir).is_dir():
        return []
    return sorted(p for p in Path(answers_dir).glob(ANSWER_GLOB) if p.is_file() and not p.name.startswith("."))


def _answers(
    con: duckdb.DuckDBPyConnection, answers_dir: Path | None, windows: _Windows, cfg: DriftConfig
) -> tuple[AnswerSummary, dict[str, tuple[pd.DataFrame, pd.DataFrame]]]:
    """The answer log's lines (every file, gzip or plain, unreadable lines counted and skipped), and
    the samples of the recommendations and answers units."""
    files = answer_files(answers_dir)
    if not files:
        empty = {
            unit: (pd.DataFrame({c: pd.Series(dtype=object) for c in UNITS[unit]}),) * 2
            for unit in ("recommendations", "answers")
        }
        return AnswerSummary(note=f"no answer log ({answers_dir} has no {ANSWER_GLOB} file)"), empty  # type: ignore[return-value]
    con.execute("CREATE OR REPLACE TEMP TABLE _drift_answer_lines (file INTEGER, line VARCHAR)")
    for i, path in enumerate(files):
        with open(path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        # One line per row (a delimiter JSON never holds unescaped); undecodable bytes are skipped.
        con.execute(
            f"""INSERT INTO _drift_answer_lines
                SELECT {i}, line FROM read_csv(?, columns = {{'line': 'VARCHAR'}},
                    header = false, auto_detect = false, delim = '\x1f', quote = '', escape = '',
                    compression = '{"gzip" if gz else "none"}', ignore_errors = true)
                WHERE trim(line) <> ''""",
            [str(path)],
        )
    tz = con.execute("SELECT current_setting('TimeZone')").fetchall()[0][0]
    con.execute("SET TimeZone = 'UTC'")  # offset-less timestamps in the log are UTC, whatever this machine's zone
    try:
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE _drift_answers AS
                SELECT file, line_hash, ts, {_side_sql(windows)} AS side, items, model_version, fallback
                FROM (SELECT file, hash(line) AS line_hash,  -- seeds the samples: the same lines, the same draw
                             CAST(try_cast(json_extract_string(line, '$.ts') AS TIMESTAMPTZ) AS TIMESTAMP) AS ts,
                             json_extract_string(line, '$.items[*]') AS items,
                             coalesce(json_extract_string(line, '$.model_version'), '{NO_VALUE}') AS model_version,
                             coalesce(json_extract_string(line, '$.fallback_reason'), '{NO_FALLBACK}') AS fallback
                      FROM _drift_answer_lines
                      WHERE json_valid(line) AND json_type(line, '$.items') = 'ARRAY')
                WHERE ts IS NOT NULL"""
        )
    finally:
        con.execute(f"SET TimeZone = '{tz}'")
    lines = con.execute("SELECT count(*) FROM _drift_answer_lines").fetchall()[0][0]
    parsed = con.execute("SELECT count(*) FROM _drift_answers").fetchall()[0][0]
    per_side = dict(con.execute("SELECT side, count(*) FROM _drift_answers WHERE side IS NOT NULL GROUP BY side").fetchall())
    versions: dict[str, dict[str, int]] = {"reference": {}, "current": {}}
    for side, version, n in con.execute(
        "SELECT side, model_version, count(*) FROM _drift_answers WHERE side IS NOT NULL GROUP BY ALL ORDER BY 3 DESC"
    ).fetchall():
        versions[side][version] = int(n)
    fallback = dict(con.execute(
        f"SELECT side, avg(CAST(fallback <> '{NO_FALLBACK}' AS DOUBLE)) FROM _drift_answers WHERE side IS NOT NULL GROUP BY side"
    ).fetchall())
    missing = [s for s in ("reference", "current") if not per_side.get(s)]
    summary = AnswerSummary(
        files=len(files), lines=int(lines), unreadable_lines=int(lines - parsed),
        reference=int(per_side.get("reference", 0)), current=int(per_side.get("current", 0)),
        model_versions=versions,
        fallback_share={s: (float(fallback[s]) if s in fallback else None) for s in ("reference", "current")},
        note=f"the answer log has no answers in the {' and '.join(missing)} window" if missing else "",
    )
    items = f"""SELECT side, hash(file, line_hash, pos, {cfg.seed}) AS draw,
                       coalesce(d.decile, '{UNSEEN_BUCKET}') AS recommended_popularity_decile
                FROM (SELECT side, file, line_hash, unnest(items) AS item_id, generate_subscripts(items, 1) AS pos
                      FROM _drift_answers WHERE side IS NOT NULL) u
                LEFT JOIN _drift_deciles d USING (item_id)"""
    answers = f"SELECT side, hash(file, line_hash, {cfg.seed}) AS draw, fallback FROM _drift_answers WHERE side IS NOT NULL"
    return summary, {
        "recommendations": _sample(con, items, list(RECOMMENDATION_SIGNALS), cfg.max_sample_rows),
        "answers": _sample(con, answers, list(ANSWER_SIGNALS), cfg.max_sample_rows),
    }


# --------------------------------------------------------------------------- Evidently


def _evidently(
    unit: str, names: tuple[str, ...], reference: pd.DataFrame, current: pd.DataFrame, cfg: DriftConfig,
    answers: AnswerSummary,
) -> tuple[dict[str, SignalResult], Any]:
    """Each signal of one unit judged by Evidently's DataDriftPreset; too few rows: not judged."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    results: dict[str, SignalResult] = {}
    judged = []
    for name in names:
        n_ref, n_cur = int(reference[name].notna().sum()), int(current[name].notna().sum())
        result = SignalResult(
            unit=SIGNAL_UNITS[name], kind="prediction" if name in PREDICTION_SIGNALS else "data",
            reference_rows=n_ref, current_rows=n_cur,
        )
        if min(n_ref, n_cur) < cfg.min_rows:
            short = [side for side, n in (("reference", n_ref), ("current", n_cur)) if n < cfg.min_rows]
            result.note = (
                answers.note if name in PREDICTION_SIGNALS and answers.note else
                f"not judged: fewer than {cfg.min_rows} rows in the {' and '.join(short)} window"
            )
        else:
            judged.append(name)
        results[name] = result
    if not judged:
        return results, None
    numerical = [n for n in judged if n in NUMERICAL_SIGNALS]
    categorical = [n for n in judged if n not in NUMERICAL_SIGNALS]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    preset = DataDriftPreset(
        columns=judged,
        drift_share=cfg.drift_share_threshold,
        cat_method=cfg.categorical_method,
        num_method=cfg.numerical_method,
        cat_threshold=cfg.categorical_threshold,
        num_threshold=cfg.numerical_threshold,
        per_column_threshold={k: v for k, v in cfg.per_signal_threshold.items() if k in judged} or None,
    )
    snapshot = Report([preset], include_tests=True).run(
        Dataset.from_pandas(current[judged].copy(), data_definition=definition),
        Dataset.from_pandas(reference[judged].copy(), data_definition=definition),
    )
    doc = snapshot.dict()
    status = {t["metric_config"]["metric_id"]: t["status"] for t in doc["tests"]}
    for metric in doc["metrics"]:
        params = metric.get("config", {})
        if params.get("type") != "evidently:metric_v2:ValueDrift" or params.get("column") not in results:
            continue
        result = results[params["column"]]
        result.method, result.threshold = params.get("method"), params.get("threshold")
        result.statistic = float(metric["value"])
        result.drifted = status.get(metric["id"]) == "FAIL"
        result.evaluated = True
    return results, snapshot


# --------------------------------------------------------------------------- performance


def _histories(
    con: duckdb.DuckDBPyConnection, table: str, lo: datetime, hi: datetime, inclusive: bool,
    max_history: int, cfg: DriftConfig,
) -> tuple[list[list[str]], list[str], dict[str, list[list]]]:
    """Per sampled user with events in the window: target = their last event in it, history = their
    earlier events (any time, the latest `max_history`), with per-position contexts (target's last)."""
    columns = {r[0] for r in con.execute(f'DESCRIBE "{table}"').fetchall()}

    def col(name: str) -> str:
        return f'CAST("{name}" AS VARCHAR)' if name in columns else "NULL::VARCHAR"

    op = ">=" if inclusive else ">"
    rows = con.execute(
        f"""WITH picked AS (
                SELECT user_id FROM "{table}" WHERE ts {op} ? AND ts <= ? GROUP BY user_id
                ORDER BY hash(user_id, {cfg.seed}) LIMIT {cfg.max_scored_users}),
            ranked AS (
                SELECT t.user_id, t.item_id, {time_of_day_sql('t.ts')} AS tod, {col('device')} AS device,
                       {col('segment')} AS segment, {col('event_type')} AS event_type,
                       row_number() OVER (PARTITION BY t.user_id ORDER BY t.ts DESC, t.event_id DESC) AS back
                FROM "{table}" t SEMI JOIN picked p ON t.user_id = p.user_id
                WHERE t.ts <= ?)
            SELECT user_id, list(item_id ORDER BY back DESC), list(tod ORDER BY back DESC),
                   list(device ORDER BY back DESC), list(segment ORDER BY back DESC), list(event_type ORDER BY back DESC)
            FROM ranked WHERE back <= {max_history + 1} GROUP BY user_id HAVING count(*) >= 2
            ORDER BY hash(user_id, {cfg.seed})""",
        [lo, hi, hi],
    ).fetchall()
    histories = [list(r[1][:-1]) for r in rows]
    targets = [r[1][-1] for r in rows]
    contexts = {
        "tod": [list(r[2]) for r in rows],
        "devices": [list(r[3]) for r in rows],
        "segments": [list(r[4]) for r in rows],
        "event_types": [list(r[5]) for r in rows],
    }
    return histories, targets, contexts


def _performance(
    con: duckdb.DuckDBPyConnection, table: str, served: ServedReference, windows: _Windows, cfg: DriftConfig,
    sample_sizes: dict[str, dict[str, int]],
) -> PerformanceSummary:
    from recsys_assets.evaluation.bundle_scorer import evaluate_bundle_on_histories

    perf = PerformanceSummary(metric=cfg.performance_metric, threshold=cfg.degradation_threshold)
    max_history = history_length(served.max_len)
    figures: dict[str, dict[str, float]] = {}
    sizes: dict[str, int] = {}
    for side, lo, hi, inclusive in (
        ("reference", windows.ref_start, windows.ref_end, True), ("current", windows.cur_start, windows.cur_end, False),
    ):
        histories, targets, contexts = _histories(con, table, lo, hi, inclusive, max_history, cfg)
        sizes[side] = len(targets)
        if len(targets) >= cfg.min_scored_users:
            figures[side] = evaluate_bundle_on_histories(served.path, histories, targets, ks=(10,), contexts=contexts)
    sample_sizes["performance_users"] = sizes
    perf.reference, perf.current = figures.get("reference", {}), figures.get("current", {})
    short = [s for s in ("reference", "current") if s not in figures]
    if short:
        perf.note = (
            f"performance not judged: fewer than {cfg.min_scored_users} users with a history in the "
            f"{' and '.join(short)} window ({sizes})"
        )
        return perf
    before, after = perf.reference[cfg.performance_metric], perf.current[cfg.performance_metric]
    perf.drop = (before - after) / before if before > 0 else None
    perf.degraded = perf.drop is not None and perf.drop > cfg.degradation_threshold
    drop = f"{perf.drop:+.1%}" if perf.drop is not None else "undefined (reference is 0)"
    perf.note = (
        f"{cfg.performance_metric} {before:.4f} at the end of the reference window, {after:.4f} on the current one "
        f"(drop {drop}; degradation over {cfg.degradation_threshold:.0%})"
    )
    return perf


__all__ = [
    "DriftConfig", "DriftResult", "DriftSummary", "SIGNALS", "compute_drift", "served_reference",
]
