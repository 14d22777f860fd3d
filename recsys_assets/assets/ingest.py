"""Stage 1: raw events from the configured source (the synthetic generator by default)."""


import hashlib
import os
from pathlib import Path
from typing import Literal, get_args

import duckdb
from dagster import (
    AssetCheckExecutionContext,
    AssetKey,
    DagsterInstance,
    AssetCheckResult,
    AssetExecutionContext,
    Config,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field, TypeAdapter, ValidationError

from recsys_assets.assets.metadata import table_markdown
from recsys_assets.config import recsys_home
from recsys_assets.data import sources, synthetic
from recsys_assets.data.served_events import ServedEvents, append_served_events, served_event_files
from recsys_assets.io_manager import TableQuery
from recsys_assets.resources import WarehouseResource


# Spelled out (Dagster turns a Literal into an enum of the config schema); "" = the environment's.
EventsFormat = Literal[
    "", "synthetic", "rees46", "retailrocket", "otto", "sasrec", "amazon", "diginetica", "parquet", "csv"
]
if set(get_args(EventsFormat)) != {"", "synthetic", *sources.FORMATS}:
    raise ImportError(f"EventsFormat {get_args(EventsFormat)} differs from the source formats {sources.FORMATS}")


class RawEventsConfig(Config):
    """Where the events come from; empty fields fall back to the environment, then to synthetic data."""

    events_path: str = Field("", description="File, directory or glob; default $RECSYS_EVENTS_PATH.")
    events_format: EventsFormat = Field(
        "", description=f"synthetic | {' | '.join(sources.FORMATS)}; default $RECSYS_EVENTS_FORMAT or synthetic."
    )
    synthetic_users: int | None = Field(None, description="Override the generator's number of users.")
    synthetic_items: int | None = Field(None, description="Override the generator's number of items.")
    synthetic_seed: int | None = Field(None, description="Override the generator's seed.")
    synthetic_periods_json: str = Field(
        "",
        description="Following periods of the generator, a JSON list of PeriodShift objects, e.g. "
        '[{"days": 14, "new_items": 50, "new_item_share": 0.3}]; default $RECSYS_SYNTHETIC_PERIODS, else none.',
    )
    include_served_events: bool = Field(
        True, description="Append the events the serving API logged under $RECSYS_HOME/events/served."
    )

    def resolved(self) -> tuple[str, str]:
        fmt = (self.events_format or os.environ.get("RECSYS_EVENTS_FORMAT") or "synthetic").lower()
        path = self.events_path or os.environ.get("RECSYS_EVENTS_PATH", "")
        if fmt != "synthetic" and not path:
            raise ValueError(f"events format {fmt!r} needs a path: set RECSYS_EVENTS_PATH or events_path")
        if fmt not in ("synthetic", *sources.FORMATS):  # $RECSYS_EVENTS_FORMAT (config is an enum)
            raise ValueError(f"unknown events format {fmt!r}; expected synthetic or one of {sources.FORMATS}")
        return fmt, path


SYNTHETIC_PERIODS_ENV = "RECSYS_SYNTHETIC_PERIODS"
# raw_events' `source_kind` metadata: the generator's files or the user's (training budgets by it)
GENERATOR_SOURCE, FILE_SOURCE = "built-in generator", "files"


def latest_source(instance: DagsterInstance) -> tuple[str, str] | None:
    """(source_kind, source_path) of the latest raw_events materialization, None before the first."""
    event = instance.get_latest_materialization_event(AssetKey("raw_events"))
    metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
    kind, path = metadata.get("source_kind"), metadata.get("source_path")
    if kind is None:
        return None
    return str(getattr(kind, "value", kind)), str(getattr(path, "value", path) or "")


def source_name(source: tuple[str, str] | None) -> str | None:
    """How a report names the data: the generator, or the source file or directory's name."""
    if source is None:
        return None
    kind, path = source
    return "the built-in generator's data" if kind == GENERATOR_SOURCE else (Path(path).name or path)


def synthetic_periods(config: RawEventsConfig) -> list[synthetic.PeriodShift]:
    """The following periods asked for in the run config, else in $RECSYS_SYNTHETIC_PERIODS."""
    name = "synthetic_periods_json" if config.synthetic_periods_json.strip() else f"${SYNTHETIC_PERIODS_ENV}"
    text = config.synthetic_periods_json.strip() or os.environ.get(SYNTHETIC_PERIODS_ENV, "").strip()
    if not text:
        return []
    try:
        return TypeAdapter(list[synthetic.PeriodShift]).validate_json(text)
    except ValidationError as exc:
        raise ValueError(f"{name} is not a JSON list of PeriodShift objects: {exc}") from None


def _synthetic_source(config: RawEventsConfig, log) -> tuple[Path, str]:
    """Generate the default data once per generator config (cached under $RECSYS_HOME/sources)."""
    overrides = {
        "n_users": config.synthetic_users,
        "n_items": config.synthetic_items,
        "seed": config.synthetic_seed,
        "following_periods": synthetic_periods(config) or None,
    }
    gen_config = synthetic.DEFAULT_CONFIG.model_copy(
        update={k: v for k, v in overrides.items() if v is not None}
    )
    # Without periods the key is the one of a config without the field: existing caches stay valid.
    unset = None if gen_config.following_periods else {"following_periods"}
    key = hashlib.sha256(gen_config.model_dump_json(exclude=unset).encode()).hexdigest()[:12]
    out_dir = recsys_home() / "sources" / f"synthetic-{key}"
    done = out_dir / "_SUCCESS.json"
    if not done.exists():
        log.info(f"generating synthetic events into {out_dir}: {gen_config.model_dump_json()}")
        summary = synthetic.generate_events(out_dir, gen_config)
        done.write_text(summary.model_dump_json(indent=2))
    else:
        log.info(f"reusing synthetic events in {out_dir}")
    return out_dir, gen_config.output_format


@asset(
    group_name="ingest",
    io_manager_key="warehouse_io_manager",
    description="Every event of the source in the canonical schema, unparsable rows included (with parse_error).",
)
def raw_events(context: AssetExecutionContext, config: RawEventsConfig, warehouse: WarehouseResource) -> TableQuery:
    fmt, path = config.resolved()
    source_kind = GENERATOR_SOURCE if fmt == "synthetic" else FILE_SOURCE
    if fmt == "synthetic":
        source_dir, fmt = _synthetic_source(config, context.log)
        path = str(source_dir)
    with warehouse.connect() as con:
        rows = sources.load_events(con, path, fmt, table="raw_events")
        served = served_event_files() if config.include_served_events else []
        appended = append_served_events(con, served, table="raw_events") if served else ServedEvents(0, 0)
        by_type = con.execute(
            "SELECT coalesce(event_type, '<null>'), count(*) FROM raw_events GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
        span = con.execute("SELECT min(ts)::VARCHAR, max(ts)::VARCHAR FROM raw_events").fetchall()[0]
        errors = con.execute("SELECT count(*) FROM raw_events WHERE parse_error IS NOT NULL").fetchall()[0][0]
        preview = con.sql("SELECT * EXCLUDE (raw_line) FROM raw_events LIMIT 10").pl()
    context.log.info(f"loaded {rows:,} rows of {fmt} from {path} (+{appended.rows:,} served events; "
                     f"{appended.duplicates:,} retried lines of an event already appended)")
    context.add_output_metadata(
        {
            "source_kind": source_kind,
            "source_format": fmt,
            "source_path": path,
            "source_rows": rows,
            "served_event_rows": appended.rows,
            "served_event_duplicates": appended.duplicates,
            "parse_errors": int(errors),
            "rows_by_event_type": MetadataValue.json(dict(by_type)),
            "time_span": f"{span[0]} .. {span[1]}",
            "preview": table_markdown(preview),
        }
    )
    return TableQuery()  # written in place by the reader


@asset_check(asset=raw_events, description="event_id identifies a row: unique and never null.")
def raw_events_ids_unique(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.connect() as con:
        total, distinct, nulls = con.execute(
            "SELECT count(*), count(DISTINCT event_id), count(*) - count(event_id) FROM raw_events"
        ).fetchall()[0]
    return AssetCheckResult(
        passed=total == distinct and nulls == 0 and total > 0,
        metadata={"rows": total, "distinct_event_ids": distinct, "null_event_ids": nulls},
    )


assets = [raw_events]
asset_checks = [raw_events_ids_unique]
