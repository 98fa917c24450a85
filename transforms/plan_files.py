"""A planned run's files in the table folder, from submit to the end of the run: the plan file
(written when the run is submitted, read chunk by chunk, removed at the end), the stale rows the
first step removes, and an ``--overwrite`` run's staging folder (swapped in at the end, or
discarded when the run fails). What the run is and does is decided in ``transforms.plan``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transforms import storage, table
from transforms.image_rows import ImageRef, refs_from_table
from transforms.plan import PLANS_DIR, REMOVAL, STAGING_DIR, Plan, RunPlan

_LOG = logging.getLogger(__name__)


def _entries(output_dir: str, folder: str) -> list[str]:
    """What ``output_dir/folder`` holds (nothing when it is not there)."""
    fs, path = storage.filesystem(storage.join(output_dir, folder))
    if not fs.exists(path):
        return []
    return [storage.to_uri(fs, p) for p in fs.ls(path, detail=False)]


def plan_files(output_dir: str) -> list[str]:
    return [uri for uri in _entries(output_dir, PLANS_DIR) if uri.endswith(".parquet")]


def staging_dirs(output_dir: str) -> list[str]:
    """The staging folders of ``--overwrite`` runs in the table's folder."""
    return _entries(output_dir, STAGING_DIR)


def write_plan(plan: Plan) -> None:
    """Writes the plan file; removes plan files of earlier runs, which died (the caller holds the
    table's lease, so no other run is live)."""
    for dead in plan_files(plan.run.output_dir):
        _LOG.warning("removing the plan of a run that did not finish: %s", dead)
        fs, path = storage.filesystem(dead)
        fs.rm(path)
    if plan.run.plan_uri is None:
        return
    # One row group per chunk (the removals follow the last one), so each worker reads only its own.
    rows_per_group = max(1, min(plan.work.num_rows, plan.run.chunk_size))
    buffer = pa.BufferOutputStream()
    pq.write_table(plan.work, buffer, row_group_size=rows_per_group, compression="zstd")
    data = buffer.getvalue().to_pybytes()
    storage.makedirs(storage.join(plan.run.output_dir, PLANS_DIR))
    storage.write_atomically(plan.run.plan_uri, lambda f: f.write(data))


def read_chunk(plan_uri: str | None, chunk: int) -> list[ImageRef]:
    """The refs of one chunk of a plan file (none for a run with nothing to embed)."""
    if plan_uri is None:
        return []
    fs, path = storage.filesystem(plan_uri)
    t = pq.read_table(path, filesystem=fs, filters=[("chunk", "=", chunk)])
    return refs_from_table(t)


def remove_stale_rows(run: RunPlan) -> int:
    """Removes the stale copies the plan names (the pipeline's first step); returns rows removed."""
    if run.plan_uri is None:
        return 0
    fs, path = storage.filesystem(run.plan_uri)
    t = pq.read_table(path, filesystem=fs, filters=[("chunk", "=", REMOVAL)])
    by_file: dict[str, set[str]] = {}
    for image_id, stale_file in zip(
        t["image_id"].to_pylist(), t["stale_file"].to_pylist(), strict=True
    ):
        by_file.setdefault(stale_file, set()).add(image_id)
    return remove_rows(run.output_dir, by_file)


def remove_rows(output_dir: str, files_and_ids: Mapping[str, set[str]]) -> int:
    """Rewrites each shard of the table in ``output_dir`` in place, atomically, without the given
    image ids; returns rows removed.

    A shard left with no rows is deleted, unless it is the table's only feature shard (readers need
    one file to know the schema).
    """
    removed = 0
    feature_shards = len(table.shard_files(output_dir, table.FEATURES))
    for uri, ids in sorted(files_and_ids.items()):
        fs, path = storage.filesystem(uri)
        if not fs.exists(path):  # already rewritten away by an earlier attempt of this step
            continue
        t = pq.read_table(path, filesystem=fs)
        kept = t.filter(pc.invert(pc.is_in(t.column("image_id"), pa.array(sorted(ids)))))
        removed += t.num_rows - kept.num_rows
        is_errors = path.rsplit("/", 1)[-1].startswith(table.ERRORS)
        if kept.num_rows == 0 and (is_errors or feature_shards > 1):
            fs.rm(path)
            if not is_errors:
                feature_shards -= 1
        elif kept.num_rows < t.num_rows:
            table.write_parquet(uri, kept)
    return removed


def delete_plan(run: RunPlan) -> None:
    """Removes the run's plan file (and the plans folder when it is empty)."""
    if run.plan_uri is None:
        return
    fs, path = storage.filesystem(run.plan_uri)
    if fs.exists(path):
        fs.rm(path)
    storage.remove_if_empty(storage.join(run.output_dir, PLANS_DIR))


def move_staged_in(run: RunPlan, prefix: str) -> tuple[list[str], list[str]]:
    """``--overwrite``, once every chunk is committed, first half: the staged shards move into the
    table's folder, beside the old ones (which stay whole and readable); returns this run's row
    and error shards there. Idempotent: a retry moves what is still staged."""
    storage.move_in(run.output_dir, run.staging_dir)
    return tuple(
        _shards(run.output_dir, run.run_id, mine=True, prefixes=(p,))
        for p in (prefix, table.ERRORS)
    )


def remove_replaced(run: RunPlan) -> None:
    """``--overwrite``, second half, once the new ``_SUMMARY.json`` is written (from then on the
    new table is the table): the old shards (of other runs) and the staging folder go."""
    _remove(_shards(run.output_dir, run.run_id, mine=False))
    _remove_staging(run.output_dir, run.run_id)


def settle(output_dir: str, run_id: str) -> str:
    """An ``--overwrite`` run that stopped on the way (failed, killed or stopped): settled so
    that the folder holds one whole table again. Before its summary was written, the run is
    rolled back: its shards leave the table folder, which is the old table again, byte for byte.
    After, it is rolled forward: the old shards go. Returns what was done."""
    try:
        written = table.read_summary(output_dir).get("run", {}).get("run_id") == run_id
    except (FileNotFoundError, table.CorruptFile):
        written = False
    # Forward: the old shards go; back: this run's shards go.
    _remove(_shards(output_dir, run_id, mine=not written))
    _remove_staging(output_dir, run_id)
    return "completed" if written else "rolled back"


def settle_dead_runs(output_dir: str) -> None:
    """Settles (:func:`settle`) every ``--overwrite`` run that died in this table without a
    word (``kill -9``, a lost machine). The caller holds the table's lease, so no other run is
    live; this runs before the table is read for planning, which must see one whole table."""
    for dead in staging_dirs(output_dir):
        run_id = dead.rstrip("/").rsplit("/", 1)[-1]
        done = settle(output_dir, run_id)
        _LOG.warning("an --overwrite run that did not finish (%s): %s", run_id, done)


def discard(run: RunPlan) -> None:
    """What a run that failed or was stopped leaves behind, removed: its plan file, and for an
    ``--overwrite`` run its staging folder and any shards it had moved in (:func:`settle`).
    Shards an incremental run committed to the table itself stay (whole ones: the next run
    keeps them)."""
    delete_plan(run)
    if run.staging_dir is not None:
        settle(run.output_dir, run.run_id)


def _shards(
    output_dir: str,
    run_id: str,
    *,
    mine: bool,
    prefixes: tuple[str, ...] = (table.FEATURES, table.ERRORS),
) -> list[str]:
    """The table's shards (row and error shards) of run ``run_id`` (``mine``), or of every other
    run."""
    return [
        f
        for prefix in prefixes
        for f in table.shard_files(output_dir, prefix)
        if (table.shard_run(f) == run_id) == mine
    ]


def _remove(files: list[str]) -> None:
    if files:
        fs, _ = storage.filesystem(files[0])
        fs.rm([storage.filesystem(f)[1] for f in files])


def _remove_staging(output_dir: str, run_id: str) -> None:
    """The run's staging folder, and the staging root once it is empty (so that the table
    folder looks as it did)."""
    staging = storage.join(output_dir, STAGING_DIR, run_id)
    fs, path = storage.filesystem(staging)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    storage.remove_if_empty(storage.join(output_dir, STAGING_DIR))
