"""The two steps around a run's chunks, once per run: :func:`remove_stale` before any chunk
(the stale copies the plan names), :func:`finalize` after every chunk (an ``--overwrite`` run's
staged table swapped in, ``_SUMMARY.json`` written, the run's history record marked succeeded,
the plan removed, the lease given back)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pyarrow as pa

from transforms import history, plan_files, storage, table
from transforms import plan as plans
from transforms.table_job import TableJob

_LOG = logging.getLogger(__name__)


def _shards_or_empty_one(run: plans.RunPlan, prefix: str, schema: pa.Schema) -> list[str]:
    """The table's shards of ``prefix``; when there are none, writes an empty one first, because
    readers (pyarrow, DuckDB, pandas) need at least one file to know the schema. (An
    ``--overwrite`` run's shards may be staged still, or already swapped in by an earlier attempt
    of this step.)"""
    files = table.shard_files(run.write_dir, prefix)
    if run.staging_dir is not None:
        files += [
            f for f in table.shard_files(run.output_dir, prefix) if table.shard_run(f) == run.run_id
        ]
    if files:
        return files
    uri = storage.join(
        table.table_dir_for(run.write_dir, prefix),
        table.shard_name(prefix, 0, 1, run_id=run.run_id),
    )
    table.write_parquet(uri, table.to_arrow([], schema))
    return [uri]


def remove_stale(_, *, jobs: Sequence[TableJob]) -> dict[int, int]:
    """Removes every table's stale copies (idempotent: a runner may run it more than once)."""
    removed = {}
    for i, job in enumerate(jobs):
        if job.lease is not None:
            job.lease.check()
        removed[i] = plan_files.remove_stale_rows(job.run)
        if removed[i]:
            # Both kinds the summary counts apart: stale copies of changed images, pruned rows.
            _LOG.info(
                "%s: removed %d rows (stale or pruned) before embedding",
                job.run.output_dir,
                removed[i],
            )
    return removed


def finalize(element: tuple[int, list[dict]], *, jobs: Sequence[TableJob]) -> dict:
    """Commits table ``index`` once its chunks' count records (``results``) are all in; returns
    its summary, as written to ``_SUMMARY.json``."""
    index, results = element
    job = jobs[index]
    run, schema, metadata, lease = job.run, job.schema, job.metadata, job.lease
    results = [r for r in results if "chunk" in r]
    new_rows = sum(r["rows"] for r in results)
    new_errors = sum(r["errors"] for r in results)
    feature_files = _shards_or_empty_one(run, job.prefix, schema)
    error_files = _shards_or_empty_one(run, table.ERRORS, table.ERROR_SCHEMA)
    if run.staging_dir is not None:  # --overwrite: the new table is complete, swap it in
        if lease is not None:
            lease.check()  # never replace a table another run has taken over
        feature_files, error_files = plan_files.move_staged_in(run, job.prefix)
    rows = run.kept_rows + new_rows
    unlisted_kept = 0 if run.pruned else run.unlisted_rows
    summary = {
        "inputs": run.listed,
        "rows": rows,
        "errors": run.kept_errors + new_errors,
        "skipped": run.skipped,
        "skipped_examples": list(run.skipped_examples),
        "skipped_reasons": dict(run.skipped_reasons),
        "label_conflicts": run.label_conflicts,
        "label_conflict_examples": list(run.label_conflict_examples),
        "table_rows": rows + unlisted_kept,
        "feature_files": feature_files,
        "error_files": error_files,
        "metadata": metadata,
        "run": {
            "run_id": run.run_id,
            "chunks": run.num_chunks,
            "embedded": run.to_embed,
            # Read, decoded and embedded by this pass for every table it wrote (one backbone or
            # several: then an image is counted once, however many tables it went to).
            "pass_images": run.pass_images,
            "new_images": run.new,
            "changed_images": run.changed,
            "new_rows": new_rows,
            "new_errors": new_errors,
            "kept_rows": run.kept_rows,
            "kept_errors": run.kept_errors,
            "stale_rows_removed": run.stale_rows,
            "unlisted_rows_kept": unlisted_kept,
            "unlisted_rows_removed": run.unlisted_rows if run.pruned else 0,
            "unlisted_errors_removed": run.unlisted_errors if run.pruned else 0,
            "workers": sorted({r["worker"] for r in results}),
        },
    }
    # An --overwrite run's point of no return: a run stopped before it is rolled back, after it
    # rolled forward (plan_files.settle).
    table.write_summary(run.output_dir, summary)
    if run.staging_dir is not None:
        plan_files.remove_replaced(run)
    # Here, on the worker, so that the history is right when the launcher does not wait.
    history.succeeded(run.output_dir, run.run_id, summary)
    plan_files.delete_plan(run)
    if lease is not None:
        lease.release()
    return summary
