"""Show a table's run history (``OUT/_RUNS/``), newest first, and how fresh the table is: the
time since its last successful run, and how many images its inputs list that it does not hold
yet (the last run's inputs planned against the table, as ``--mode incremental --plan-only``
would; nothing is written).

    featurebeam runs gs://bucket/features
    featurebeam runs out/features --no-pending --limit 5
    featurebeam runs out/features --json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from pipeline import cli
from transforms import history, listing, storage, table
from transforms import lease as leases

COLUMNS = (
    "run",
    "status",
    "started (UTC)",
    "duration",
    "listed",
    "embedded",
    "kept",
    "removed",
    "errors",
    "skipped",
    "runner",
    "host",
)
_NUMBERS = {3, 4, 5, 6, 7, 8, 9}
DEFAULT_LIMIT = 20


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "pipeline.runs",
        description="Show a table's run history, newest first: every run of extract or "
        "classify that was planned leaves a record in the table's _RUNS/ folder (finished, "
        "failed, stopped, or killed: then it is shown as not finished, with its last "
        "heartbeat). Then the table's freshness: the time since its last successful run, and "
        "the images its inputs list that it does not hold yet.",
    )
    parser.add_argument("output", metavar="OUT", help="the table folder (local or gs://)")
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help="show the newest N runs (default: %(default)s); 0 shows every run",
    )
    parser.add_argument(
        "--no-pending",
        action=cli.Switch,
        help="do not list the last run's inputs to count the images not yet embedded (listing "
        "a big bucket takes a while)",
    )
    parser.add_argument(
        "--json",
        action=cli.Switch,
        help="print the history and the freshness as one JSON object (for schedulers and "
        "monitoring) instead of a table",
    )
    return parser


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _shown(record: dict[str, Any], lease: dict[str, Any] | None, now: dt.datetime) -> dict:
    """The record with what the history shows: its status now, duration and heartbeat age."""
    status = history.shown_status(record, lease)
    start, end = history.parse_time(record.get("started")), history.parse_time(record.get("ended"))
    beat = history.parse_time(record.get("heartbeat"))
    last = end or (now if status == history.RUNNING else beat)
    return {
        **record,
        "shown_status": status,
        "duration_s": (last - start).total_seconds() if start and last else None,
        "heartbeat_age_s": history.age_s(record.get("heartbeat"), now),
    }


def pending_images(record: dict[str, Any], output: str) -> tuple[int | None, str | None]:
    """Images the record's inputs list that the table does not hold yet (new or changed), by
    planning them against the table in incremental mode; writes nothing. ``(None, why)`` when
    that cannot be said."""
    from pipeline import launch  # Beam: only when asked for

    files = table.shard_files(output)
    if not files:
        return None, "the table has no shard yet"
    fs, path = storage.filesystem(files[0])
    with table.reading(files[0]):
        metadata = table.table_metadata(pq.read_schema(path, filesystem=fs))
    flags = record.get("listing") or {}
    spec = launch.TableRun(
        inputs=tuple(record["inputs"]),
        output=output,
        mode="incremental",
        plan_only=True,
        include_all_files=bool(flags.get("include_all_files")),
        stat_manifest=bool(flags.get("stat_manifest")),
        allow_empty=True,
    )
    try:
        listing.check_sources(spec.inputs)
        return launch.plan(spec, metadata, log=False).run.to_embed, None  # no run: no run id
    except (OSError, ValueError) as exc:
        return None, f"could not list {', '.join(spec.inputs)}: {exc}"


def history_of(output: str, *, limit: int = DEFAULT_LIMIT, pending: bool = True) -> dict:
    """The table's history (newest first, at most ``limit`` runs; 0: all) and freshness.

    Raises:
        FileNotFoundError: ``output`` does not exist, or holds no run record.
    """
    if limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    if not storage.exists(output):
        raise FileNotFoundError(f"{output} does not exist; pass a table folder")
    records = history.read_records(output)
    if not records:
        raise FileNotFoundError(
            f"no runs recorded in {output} (no {history.RUNS_DIR}/ records): runs of extract or "
            "classify leave one each from this version on"
        )
    now = dt.datetime.now(dt.UTC)
    lease = leases.read_lease(output)
    runs = [_shown(r, lease, now) for r in records]
    last_ok = next((r for r in runs if r["status"] == history.SUCCEEDED), None)
    freshness: dict[str, Any] = {
        "last_success": last_ok["run_id"] if last_ok else None,
        "since_last_success_s": history.age_s(last_ok["ended"], now) if last_ok else None,
        "pending": None,
        "pending_note": "not counted (--no-pending)",
    }
    if pending:
        freshness["pending"], freshness["pending_note"] = pending_images(records[0], output)
    return {
        "output": output,
        "runs": runs[:limit] if limit else runs,
        "total_runs": len(runs),
        "freshness": freshness,
    }


def _count(counts: dict[str, Any], key: str) -> str:
    value = counts.get(key)
    return "-" if value is None else str(value)


def format_history(result: dict[str, Any]) -> str:
    """The history as an aligned table, then a note per run that did not succeed, then the
    freshness."""
    rows, notes = [], []
    for r in result["runs"]:
        counts = r.get("counts") or {}
        started = (r.get("started") or "-").replace("T", " ")[:19]  # to the second
        rows.append(
            (
                r["run_id"],
                r["shown_status"],
                started,
                _ago(r["duration_s"]),
                *(
                    _count(counts, k)
                    for k in ("listed", "embedded", "kept", "removed", "errors", "skipped")
                ),
                str(r.get("runner") or "-"),
                str(r.get("host") or "-"),
            )
        )
        if r["shown_status"] == history.NOT_FINISHED:
            notes.append(
                f"{r['run_id']} did not finish: last heartbeat {_ago(r['heartbeat_age_s'])} ago "
                f"(pid {r.get('pid')} on {r.get('host')}); it was killed or lost, or is still "
                "being cleaned up. The next incremental run embeds what it left"
            )
        elif r["shown_status"] == history.RUNNING:
            notes.append(
                f"{r['run_id']} is running: last heartbeat {_ago(r['heartbeat_age_s'])} ago"
            )
        elif r.get("reason"):
            notes.append(f"{r['run_id']} {r['shown_status']}: {r['reason']}")
    lines = [cli.text_table(COLUMNS, rows, right=_NUMBERS)]
    if result["total_runs"] > len(result["runs"]):
        lines.append(f"(newest {len(result['runs'])} of {result['total_runs']} runs; --limit 0)")
    lines += notes
    fresh = result["freshness"]
    if fresh["last_success"]:
        lines.append(
            f"last successful run: {fresh['last_success']}, "
            f"{_ago(fresh['since_last_success_s'])} ago"
        )
    else:
        lines.append("no successful run recorded")
    if fresh["pending"] is not None:
        n = fresh["pending"]
        lines.append(f"{n} image{'' if n == 1 else 's'} listed but not yet embedded")
    else:
        lines.append(f"images listed but not yet embedded: {fresh['pending_note']}")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses flags; returns the history and freshness (``--json``: also how to print it)."""
    args = build_parser().parse_args(argv)
    result = history_of(args.output, limit=args.limit, pending=not args.no_pending)
    result["as_json"] = args.json
    return result


def main(argv: Sequence[str] | None = None) -> None:
    result = cli.run_main(run, argv)
    if result.pop("as_json"):
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(format_history(result))


if __name__ == "__main__":
    main()
