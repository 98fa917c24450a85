"""How runs treat a table: --prune, the one-writer lease, sniffed inputs and counted skips,
manifests' change signal (the planner's and the lease's own rules are in test_plan.py and
test_lease.py)."""

from __future__ import annotations

import time

import pytest
from conftest import encode, gradient
from fakes import MeanColorHandler, run_table

from transforms import lease as leases
from transforms import plan as plans
from transforms import table
from transforms.image_rows import image_id


def incremental(sources, out, **kwargs):
    return run_table(sources, out, mode="incremental", **kwargs)


def ids(out, prefix=table.FEATURES) -> list[str]:
    return sorted(table.read_table(str(out), prefix=prefix).column("image_id").to_pylist())


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
