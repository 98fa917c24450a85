"""How runs treat a table: the columnar planner, --prune, the one-writer lease, sniffed inputs
and counted skips, manifests' change signal."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from conftest import encode, gradient
from fakes import MeanColorHandler, run_table

from transforms import lease as leases
from transforms import plan as plans
from transforms import table
from transforms.image_rows import LISTING_SCHEMA, image_id
from transforms.listing import Listing


def incremental(sources, out, **kwargs):
    return run_table(sources, out, mode="incremental", **kwargs)


def ids(out, prefix=table.FEATURES) -> list[str]:
    return sorted(table.read_table(str(out), prefix=prefix).column("image_id").to_pylist())


# --- the planner against a plain Python statement of the rules ---


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


# --- prune ---


def test_prune_removes_rows_of_images_no_longer_listed(image_tree, tmp_path):
    out = tmp_path / "t"
    (image_tree / "bad.jpg").write_bytes(b"not a jpeg")
    incremental(image_tree, out, chunk_size=5)
    gone = [image_tree / "val" / "cats" / "0.png", image_tree / "bad.jpg"]
    for path in gone:
        path.unlink()

    kept = incremental(image_tree, out, chunk_size=5)
    assert kept["run"]["unlisted_rows_kept"] == 1 and kept["table_rows"] == 12
    assert len(ids(out)) == 12

    pruned = incremental(image_tree, out, chunk_size=5, prune=True)
    assert pruned["run"]["embedded"] == 0
    assert pruned["run"]["unlisted_rows_removed"] == 1
    assert pruned["run"]["unlisted_errors_removed"] == 1
    assert (pruned["inputs"], pruned["rows"], pruned["errors"], pruned["table_rows"]) == (
        11,
        11,
        0,
        11,
    )
    assert image_id(str(gone[0])) not in ids(out) and len(ids(out)) == 11
    assert ids(out, table.ERRORS) == []


def test_prune_needs_incremental_mode(image_tree, tmp_path):
    with pytest.raises(ValueError, match="--mode incremental"):
        run_table(image_tree, tmp_path / "t", prune=True)


# --- the lease: one writer per table ---


def test_a_second_run_fails_fast_naming_the_holder(image_tree, tmp_path):
    out = tmp_path / "t"
    held = leases.acquire(str(out), "20261130T000000live")
    started = time.monotonic()
    with pytest.raises(
        leases.LeaseHeld, match=r"run 20261130T000000live on .* \(pid \d+\), last renewed \d+ s ago"
    ):
        run_table(image_tree, out)
    assert time.monotonic() - started < 5
    assert not table.shard_files(str(out))
    held.release()
    assert run_table(image_tree, out)["rows"] == 12


def test_an_expired_lease_is_taken_over_and_dead_plans_are_removed(image_tree, tmp_path, caplog):
    out = tmp_path / "t"
    incremental(image_tree, out)
    dead = leases.acquire(str(out), "20261130T000000dead", expiry_s=0.2)
    (out / plans.PLANS_DIR).mkdir()
    (out / plans.PLANS_DIR / "plan-20261130T000000dead.parquet").write_bytes(b"old plan")
    time.sleep(0.3)
    (image_tree / "train" / "cats" / "new.png").write_bytes(encode(gradient(seed=50)))
    summary = incremental(image_tree, out)
    assert summary["run"]["embedded"] == 1
    assert "taking over the lease" in caplog.text and "expired" in caplog.text
    assert not (out / plans.PLANS_DIR).exists()
    assert not (out / leases.LEASE_FILE).exists()  # given back at the end
    with pytest.raises(leases.LeaseLost):
        dead.check()


def test_break_lease_takes_over_a_live_lease(image_tree, tmp_path):
    out = tmp_path / "t"
    leases.acquire(str(out), "20261130T000000stuck")
    summary = run_table(image_tree, out, break_lease=True)
    assert summary["rows"] == 12


def test_only_one_of_many_simultaneous_runs_gets_the_lease(tmp_path):
    for trial in range(5):
        out = tmp_path / f"t{trial}"
        barrier = threading.Barrier(6)
        won, refused = [], []

        def take(i, out=out, barrier=barrier, won=won, refused=refused):
            barrier.wait()
            try:
                won.append(leases.acquire(str(out), f"run{i}"))
            except leases.LeaseHeld:
                refused.append(i)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 5
        assert json.loads((out / leases.LEASE_FILE).read_text())["run_id"] == won[0].run_id


def test_simultaneous_takeovers_of_a_dead_lease_leave_one_holder(tmp_path):
    out = tmp_path / "t"
    leases.acquire(str(out), "dead", expiry_s=0.1)
    time.sleep(0.2)
    barrier = threading.Barrier(4)
    won = []

    def take(i):
        barrier.wait()
        with contextlib.suppress(leases.LeaseHeld):
            won.append(leases.acquire(str(out), f"run{i}", expiry_s=60))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].check()


def test_a_worker_whose_lease_was_taken_over_commits_nothing(image_tree, tmp_path):
    out = tmp_path / "t"

    class TakenOver(MeanColorHandler):
        def load_model(self):  # another run breaks the lease while this one embeds
            leases.acquire(str(out), "20261130T000000thief", break_lease=True)
            return super().load_model()

    with pytest.raises(Exception, match="no longer holds the lease"):
        run_table(image_tree, out, handler=TakenOver())
    assert not table.shard_files(str(out))


# --- what is listed, what is skipped ---


def test_extensionless_images_are_embedded_and_skipped_files_counted(tmp_path):
    root = tmp_path / "objects"
    root.mkdir()
    (root / "3f2a9c").write_bytes(encode(gradient(seed=1), "JPEG"))
    (root / "b71e04").write_bytes(encode(gradient(seed=2), "PNG"))
    (root / "photo.png").write_bytes(encode(gradient(seed=3), "PNG"))
    (root / "captions.txt").write_text("a cat")
    (root / "meta.json").write_text("{}")
    out = tmp_path / "t"
    summary = run_table(root, out)
    assert (summary["inputs"], summary["rows"], summary["errors"], summary["skipped"]) == (
        3,
        3,
        0,
        2,
    )
    assert {e.rsplit("/", 1)[-1] for e in summary["skipped_examples"]} == {
        "captions.txt",
        "meta.json",
    }
    everything = run_table(root, tmp_path / "all", include_all_files=True)
    assert (everything["inputs"], everything["rows"], everything["errors"]) == (5, 3, 2)
    assert everything["skipped"] == 0


def test_a_manifest_change_signal_is_noticed(image_tree, tmp_path):
    manifest = tmp_path / "list.csv"
    target = image_tree / "train" / "cats" / "0.png"
    manifest.write_text(f"uri,file_size,file_version\n{target},10,etag-1\n")
    out = tmp_path / "t"
    incremental(str(manifest), out)
    assert incremental(str(manifest), out)["run"]["embedded"] == 0
    manifest.write_text(f"uri,file_size,file_version\n{target},10,etag-2\n")
    changed = incremental(str(manifest), out)
    assert changed["run"]["embedded"] == 1 and changed["run"]["stale_rows_removed"] == 1

    plain = tmp_path / "plain.txt"
    plain.write_text(f"{target}\n")
    out2 = tmp_path / "t2"
    incremental(str(plain), out2, stat_manifest=True)
    target.write_bytes(encode(gradient(60, 60, seed=61)))
    assert incremental(str(plain), out2)["run"]["embedded"] == 0  # no signal: not noticed
    assert incremental(str(plain), out2, stat_manifest=True)["run"]["embedded"] == 1
