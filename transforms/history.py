"""A table's run history: one small JSON record per run in ``OUT/_RUNS/<run id>.json``.

A run that gets as far as a plan under the table's lease leaves a record, finished or not:

- the launcher writes it ``running`` once the run is planned (what it lists, embeds, keeps and
  removes, its recipe, tool version, runner, host and pid), and refreshes its ``heartbeat`` every
  :data:`HEARTBEAT_S` seconds while it waits for the pipeline;
- the pipeline's last step (``transforms.finalize``, on a worker, on any runner) marks it
  ``succeeded`` with the summary's counts, so the history is right when the launcher does not
  wait for the job; a launcher that waited writes the same again once its heartbeat has stopped;
- a run that fails or is stopped (Ctrl-C, SIGTERM) is marked ``failed`` or ``stopped`` by the
  launcher, with its reason in one line;
- a run killed outright (``kill -9``, a lost VM) stays ``running`` with its last heartbeat:
  :func:`shown_status` calls it ``not finished`` once it no longer holds a live lease.

A run refused before it was planned (another run holds the lease, no image listed, a table made
with another recipe, bad flags) changed nothing and leaves no record: its one-line error and exit
status 2 are what a scheduler sees. Records are written whole (``storage.write_atomically``), on a
local disk or an object store; ``_RUNS/`` is not a table folder, so nothing that lists shards
sees it, and an ``--overwrite`` keeps it. Records are never removed: a table run nightly gains
365 small files a year.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from transforms import lease as leases
from transforms import storage
from transforms.models.recipe import table_fingerprint
from transforms.plan import RunPlan

_LOG = logging.getLogger(__name__)

RUNS_DIR = "_RUNS"
RUNNING, SUCCEEDED, FAILED, STOPPED = "running", "succeeded", "failed", "stopped"
#: What :func:`shown_status` calls a ``running`` record whose run is gone (killed, VM lost).
NOT_FINISHED = "not finished"
#: How often (seconds) a waiting launcher refreshes its record's heartbeat.
HEARTBEAT_S = 60.0


def now_iso() -> str:
    """Now in UTC, ISO 8601 to the millisecond (``2026-12-03T20:10:15.123Z``): records sort by
    it as text."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def record_uri(output_dir: str, run_id: str) -> str:
    return storage.join(output_dir, RUNS_DIR, f"{run_id}.json")


def _write(output_dir: str, record: Mapping[str, Any]) -> None:
    data = json.dumps(record, indent=2, sort_keys=True).encode()
    storage.makedirs(storage.join(output_dir, RUNS_DIR))
    storage.write_atomically(record_uri(output_dir, record["run_id"]), lambda f: f.write(data))


def read_record(output_dir: str, run_id: str) -> dict[str, Any] | None:
    """One run's record, or None when it has none (or it cannot be read)."""
    try:
        return json.loads(storage.read_bytes(record_uri(output_dir, run_id)))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_records(output_dir: str) -> list[dict[str, Any]]:
    """Every run's record, newest first (run ids sort by start time); unreadable ones skipped
    with a warning."""
    fs, path = storage.filesystem(storage.join(output_dir, RUNS_DIR))
    if not fs.exists(path):
        return []
    fs.invalidate_cache(path)
    records = []
    for entry in fs.ls(path, detail=False):
        uri = storage.to_uri(fs, entry)
        if not uri.endswith(".json"):
            continue
        try:
            records.append(json.loads(storage.read_bytes(uri)))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            _LOG.warning("skipping the unreadable run record %s: %s", uri, exc)
    return sorted(records, key=lambda r: (r.get("started") or "", r["run_id"]), reverse=True)


def planned_counts(run: RunPlan) -> dict[str, Any]:
    """What a planned run is to do; ``embedded`` is known once it has succeeded."""
    return {
        "listed": run.listed,
        "to_embed": run.to_embed,
        "embedded": None,
        "kept": run.kept_rows,
        "removed": run.stale_rows + (run.unlisted_rows + run.unlisted_errors if run.pruned else 0),
        "errors": run.kept_errors,
        "new_errors": None,
        "skipped": run.skipped,
    }


def summary_counts(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A finished run's counts, from its table summary (``transforms.finalize``)."""
    run = summary.get("run", {})
    return {
        "listed": summary.get("inputs"),
        "to_embed": run.get("embedded"),
        "embedded": run.get("embedded"),
        "kept": run.get("kept_rows"),
        "removed": run.get("stale_rows_removed", 0)
        + run.get("unlisted_rows_removed", 0)
        + run.get("unlisted_errors_removed", 0),
        "errors": summary.get("errors"),
        "new_errors": run.get("new_errors"),
        "skipped": summary.get("skipped"),
    }


def start(
    run: RunPlan,
    *,
    metadata: Mapping[str, str],
    command: str,
    mode: str,
    inputs: Sequence[str],
    runner: str,
    listing_flags: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """Writes the record of a run just planned under the lease, ``running``; returns it."""
    started = now_iso()
    record = {
        "run_id": run.run_id,
        "status": RUNNING,
        "command": command,
        "mode": mode,
        "output": run.output_dir,
        # Absolute: `featurebeam runs` lists them again to count pending images, from any folder.
        "inputs": [storage.absolute(i) for i in inputs],
        "listing": dict(listing_flags or {}),
        "started": started,
        "ended": None,
        "heartbeat": started,
        "counts": planned_counts(run),
        "recipe": {
            "fingerprint": table_fingerprint(metadata),
            "backbone": metadata.get("backbone"),
            "weights_fingerprint": metadata.get("weights_fingerprint"),
        },
        "tool_version": metadata.get("tool_version"),
        "runner": runner,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "reason": None,
    }
    _write(run.output_dir, record)
    return record


def beat(output_dir: str, run_id: str) -> None:
    """Refreshes a ``running`` record's heartbeat; a finished one is left alone."""
    record = read_record(output_dir, run_id)
    if record is None or record["status"] != RUNNING:
        return
    record["heartbeat"] = now_iso()
    _write(output_dir, record)


@contextlib.contextmanager
def beating(runs: Sequence[RunPlan], interval_s: float | None = None) -> Iterator[None]:
    """Refreshes the runs' heartbeats in a background thread until the block ends (and has
    stopped when it does, so nothing rewrites a record after the caller's last word)."""
    stop = threading.Event()
    interval = HEARTBEAT_S if interval_s is None else interval_s

    def loop():
        while not stop.wait(interval):
            for run in runs:
                try:
                    beat(run.output_dir, run.run_id)
                except Exception as exc:  # a missed heartbeat is not fatal; the next may succeed
                    _LOG.warning("could not refresh run %s's record: %s", run.run_id, exc)

    thread = threading.Thread(target=loop, name="history-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def succeeded(output_dir: str, run_id: str, summary: Mapping[str, Any]) -> None:
    """Marks a run's record ``succeeded`` with its summary's counts (idempotent). A run without
    a record (a graph built by hand, without the launcher) is left without one."""
    record = read_record(output_dir, run_id)
    if record is None:
        return
    now = now_iso()
    record.update(
        status=SUCCEEDED,
        ended=record.get("ended") if record["status"] == SUCCEEDED else now,
        heartbeat=now,
        counts=summary_counts(summary),
        reason=None,
    )
    _write(output_dir, record)


def reason_for(exc: BaseException) -> tuple[str, str]:
    """``(status, one-line reason)`` for the exception a run ended with: ``stopped`` for Ctrl-C
    or a stop signal (also when a Beam step re-raised it as another exception), else ``failed``."""
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, KeyboardInterrupt):
            signum = getattr(cause, "signum", None)
            if isinstance(signum, int):
                return STOPPED, f"stopped by {signal.Signals(signum).name}"
            return STOPPED, "interrupted"
        cause = cause.__cause__ or cause.__context__
    lines = str(exc).strip().splitlines()
    return FAILED, f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")[:500]


def ended(output_dir: str, run_id: str, exc: BaseException) -> None:
    """Marks a run that ended with ``exc`` ``failed`` or ``stopped``, with its reason. A record
    already ``succeeded`` stays so (the table was committed before the launcher failed)."""
    record = read_record(output_dir, run_id)
    if record is None or record["status"] == SUCCEEDED:
        return
    status, reason = reason_for(exc)
    now = now_iso()
    record.update(status=status, ended=now, heartbeat=now, reason=reason)
    _write(output_dir, record)


# --- reading the history ---


def shown_status(record: Mapping[str, Any], lease: Mapping[str, Any] | None) -> str:
    """The status to show: a ``running`` record whose run no longer holds a live lease on the
    table (``lease``: ``transforms.lease.read_lease``) is :data:`NOT_FINISHED`."""
    if record["status"] != RUNNING:
        return record["status"]
    live = (
        lease is not None
        and lease.get("run_id") == record["run_id"]
        and lease["age_s"] <= float(lease.get("expiry_s", leases.DEFAULT_EXPIRY_S))
        and not leases.holder_gone(lease)
    )
    return RUNNING if live else NOT_FINISHED


def age_s(text: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds since an ISO time, or None."""
    when = parse_time(text)
    if when is None:
        return None
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (now - when).total_seconds())
