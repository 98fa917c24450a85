"""The planner benchmark (``python -m benchmarks --only plan``): an incremental plan of N
listed images against an N-row table, 1% of the listing new and 0.1% changed.

Each step runs in its own process, so the planner's peak RSS is its own:

1. ``plan-data`` synthesises the inputs: a table of N rows in shards of the job's default chunk size
   (1,000 rows, so 10,000 shards at 10M; 8-d vectors, since the planner never reads them), of which
   1% are no longer listed, and a CSV manifest of N URIs with ``file_size``/``file_version``
   columns: 99% already in the table (0.1% of those with a new version), 1% new;
2. ``plan`` lists the manifest and plans the run exactly as the job does (``pipeline.launch.plan``),
   then writes the plan file, timing each part.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

#: Metadata of the synthetic table (the planner checks that the run's recipe matches it).
_METADATA = {"backbone": "synthetic", "weights_fingerprint": "none", "feature_dim": "8"}


def measure_plan_data(args) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from transforms import table
    from transforms.extract import DEFAULT_CHUNK_SIZE
    from transforms.image_rows import image_ids

    n = args.count
    root = Path(args.work) / f"plan-{n}"
    out, manifest = root / "table", root / "manifest.csv"
    out.mkdir(parents=True)
    started = time.perf_counter()
    new = n // 100
    changed = n // 1000
    # Table rows 0..n-1; the listing is rows new..n-1 (row 0..new-1 are unlisted) plus `new`
    # URIs the table does not have.
    uris = pa.array([f"gs://bucket/images/{i:09d}.jpg" for i in range(n + new)], pa.string())
    ids = image_ids(uris)
    sizes = pa.array(np.full(n + new, 50_000, np.int64))
    versions = pa.array([f"{1_700_000_000 + i}" for i in range(n + new)], pa.string())
    schema = table.feature_schema(8, _METADATA)
    order = np.argsort(np.asarray(ids.to_numpy(zero_copy_only=False)[:n]))
    rows = pa.table(
        {
            "image_id": ids.slice(0, n),
            "uri": uris.slice(0, n),
            "label": pa.nulls(n, pa.string()),
            "split": pa.nulls(n, pa.string()),
            "width": pa.array(np.full(n, 640, np.int32)),
            "height": pa.array(np.full(n, 480, np.int32)),
            "file_size": sizes.slice(0, n),
            "file_version": versions.slice(0, n),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 8, np.float32)), 8),
        },
        schema=schema,
    ).take(order)
    shards = -(-n // DEFAULT_CHUNK_SIZE)
    for s in range(shards):
        piece = rows.slice(s * DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE)
        name = table.shard_name(table.FEATURES, s, shards, run_id="20260101T000000beef")
        table.write_parquet(str(out / name), piece)
    listed_versions = versions.slice(new).to_pylist()
    for i in range(0, n - new, max(1, (n - new) // changed)):  # 0.1% changed files
        listed_versions[i] = listed_versions[i] + "-changed"
    pacsv.write_csv(
        pa.table(
            {
                "uri": uris.slice(new),
                "file_size": sizes.slice(new),
                "file_version": pa.array(listed_versions, pa.string()),
            }
        ),
        str(manifest),
    )
    return {
        "table": str(out),
        "manifest": str(manifest),
        "shards": shards,
        "synth_s": time.perf_counter() - started,
        "manifest_mb": os.path.getsize(manifest) / 2**20,
    }


def measure_plan(args) -> dict:
    from pipeline.launch import TableRun
    from transforms import listing, plan_files
    from transforms import plan as plans

    started = time.perf_counter()
    found = listing.list_inputs([args.input])
    listed_s = time.perf_counter() - started
    planned = plans.plan_run(
        found,
        args.table,
        metadata=_METADATA,
        incremental=True,
        chunk_size=TableRun.chunk_size,
    )
    plan_s = time.perf_counter() - started - listed_s
    plan_files.write_plan(planned)
    write_s = time.perf_counter() - started - listed_s - plan_s
    run = planned.run
    return {
        "listed": run.listed,
        "to_embed": run.to_embed,
        "new": run.new,
        "changed": run.changed,
        "kept_rows": run.kept_rows,
        "stale_rows": run.stale_rows,
        "unlisted_rows": run.unlisted_rows,
        "list_s": listed_s,
        "diff_s": plan_s,
        "write_s": write_s,
    }


def report(sizes, measure, work: Path) -> None:
    """Runs the plan section for each size and prints its figures."""
    print("\nplanner: incremental plan, N listed vs N-row table, 1% new, 0.1% changed")
    print(
        f"  {'N':>11} {'list s':>7} {'diff s':>7} {'write s':>8} {'total s':>8} "
        f"{'peak RSS MiB':>13}  to embed (new + changed), kept, stale, unlisted"
    )
    for n in sizes:
        data = measure("plan-data", work, count=n)
        result = measure("plan", work, input=data["manifest"], table=data["table"])
        total = result["list_s"] + result["diff_s"] + result["write_s"]
        print(
            f"  {n:>11,} {result['list_s']:7.1f} {result['diff_s']:7.1f} {result['write_s']:8.1f} "
            f"{total:8.1f} {result['rss_mb']:13.0f}  {result['to_embed']:,} "
            f"({result['new']:,} + {result['changed']:,}), {result['kept_rows']:,}, "
            f"{result['stale_rows']:,}, {result['unlisted_rows']:,}"
        )
        print(
            f"  {'':>11} (synthesised in {data['synth_s']:.0f} s: {data['shards']:,} shards, "
            f"manifest {data['manifest_mb']:.0f} MiB)"
        )
