"""transforms/plan.py (with table_diff.py): the columnar planner against a plain Python statement
of the rules."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from transforms import plan as plans
from transforms import table
from transforms.image_rows import LISTING_SCHEMA, image_id
from transforms.listing import Listing


def _reference(listed, copies, retry_errors, prune):
    """(ids to embed, (file, id) pairs to remove, kept rows, kept errors), one image at a time."""
    by_id = {}
    for c in copies:
        by_id.setdefault(c["image_id"], []).append(c)
    todo, remove, kept_rows, kept_errors = set(), set(), 0, 0
    for ref in listed:
        existing = by_id.get(ref["image_id"], [])

        def matches(c, ref=ref):
            if not ref["file_version"] or not c["file_version"]:
                return (
                    not ref["file_size"] or not c["file_size"] or ref["file_size"] == c["file_size"]
                )
            return ref["file_size"] == c["file_size"] and ref["file_version"] == c["file_version"]

        good = [c for c in existing if matches(c)]
        keep = next((c for c in good if c["kind"] == 0), None)
        if keep is None and not retry_errors:
            keep = next((c for c in good if c["kind"] == 1), None)
        if keep is None:
            todo.add(ref["image_id"])
        elif keep["kind"] == 0:
            kept_rows += 1
        else:
            kept_errors += 1
        remove |= {(c["file"], c["image_id"]) for c in existing if c is not keep}
    if prune:
        listed_ids = {r["image_id"] for r in listed}
        remove |= {(c["file"], c["image_id"]) for c in copies if c["image_id"] not in listed_ids}
    return todo, remove, kept_rows, kept_errors


@pytest.mark.parametrize("retry_errors, prune", [(False, False), (True, False), (False, True)])
def test_the_columnar_planner_follows_the_rules(tmp_path, retry_errors, prune):
    rng = np.random.default_rng(7)
    uris = [f"/data/img{i:04d}.jpg" for i in range(400)]
    listed = [
        {
            "image_id": image_id(u),
            "uri": u,
            "label": None,
            "split": None,
            "file_size": int(rng.choice([0, 100, 200])),
            "file_version": str(rng.choice(["", "v1", "v2"])),
        }
        for u in uris[:300]
    ]
    out = tmp_path / "t"
    out.mkdir()
    (out / "_errors").mkdir()
    copies = []
    for f in range(4):
        kind = 0 if f < 3 else 1
        rows = []
        for u in rng.choice(uris, 120, replace=False):
            row = {
                "image_id": image_id(str(u)),
                "file_size": int(rng.choice([0, 100, 200])),
                "file_version": str(rng.choice(["", "v1", "v2"])),
            }
            rows.append(row)
        prefix = table.FEATURES if kind == 0 else table.ERRORS
        uri = str(
            (out if kind == 0 else out / "_errors") / table.shard_name(prefix, f, 4, run_id="r")
        )
        pa_rows = pa.Table.from_pylist(rows)
        table.write_parquet(uri, pa_rows)
        copies += [{**r, "kind": kind, "file": uri} for r in rows]

    found = Listing(pa.Table.from_pylist(listed, schema=LISTING_SCHEMA))
    planned = plans.plan_run(
        found,
        str(out),
        metadata={},
        incremental=True,
        chunk_size=7,
        retry_errors=retry_errors,
        prune=prune,
    )
    todo, remove, kept_rows, kept_errors = _reference(listed, copies, retry_errors, prune)
    work = planned.work
    chunks = work.filter(pa.compute.greater_equal(work["chunk"], 0))
    removals = work.filter(pa.compute.equal(work["chunk"], plans.REMOVAL))
    assert set(chunks["image_id"].to_pylist()) == todo and chunks.num_rows == len(todo)
    assert (
        set(zip(removals["stale_file"].to_pylist(), removals["image_id"].to_pylist(), strict=True))
        == remove
    )
    assert (planned.run.kept_rows, planned.run.kept_errors) == (kept_rows, kept_errors)
    assert planned.run.to_embed == len(todo) and planned.run.num_chunks == -(-len(todo) // 7)
    assert chunks["image_id"].to_pylist() == sorted(todo)  # chunks: consecutive id ranges
