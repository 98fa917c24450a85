"""The front door: nothing lost. An overwrite that fails keeps the old table, a stopped run gives
its table back, a strange file never hangs a run, and an empty listing is refused."""

from __future__ import annotations

import os
import pathlib

import pytest
from conftest import write_image_tree
from fakes import MeanColorHandler, run_extract
from test_gcs import BUCKET, gcs_emulator  # noqa: F401 (a fixture)

from transforms import storage, table


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


class BrokenModelHandler(MeanColorHandler):
    """A model that cannot load (bad weights, a crash in the worker)."""

    def load_model(self):
        raise RuntimeError("the weights file is damaged")


# --- 1. --overwrite is safe ---


def test_a_failed_overwrite_leaves_the_old_table_byte_identical(tmp_path):
    images = tmp_path / "images"
    write_image_tree(images, per_class=2)
    out = tmp_path / "t"
    run_extract(str(images), out, chunk_size=3)
    before = snapshot(out)
    assert any(name.startswith("features-") for name in before)

    with pytest.raises(Exception, match="damaged"):
        run_extract(str(images), out, handler=BrokenModelHandler(), overwrite=True, chunk_size=3)
    assert snapshot(out) == before  # every file, the same bytes, nothing added
    assert table.read_table(str(out)).num_rows == 8


def test_a_successful_overwrite_replaces_every_old_shard(tmp_path):
    images = tmp_path / "images"
    write_image_tree(images, per_class=2)
    out = tmp_path / "t"
    first = run_extract(str(images), out, chunk_size=3)
    old_files = set(first["feature_files"]) | set(first["error_files"])

    second = run_extract(str(images), out, overwrite=True, chunk_size=5)
    new_id = second["run"]["run_id"]
    shards = table.shard_files(str(out)) + table.shard_files(str(out), table.ERRORS)
    assert shards and not old_files & set(shards)
    assert all(f"-{new_id}-" in os.path.basename(f) for f in shards)
    assert sorted(second["feature_files"]) == table.shard_files(str(out))
    assert table.read_table(str(out)).num_rows == 8
    assert table.read_summary(str(out))["run"]["run_id"] == new_id
    leftovers = {p.name for p in out.iterdir()} - {os.path.basename(f) for f in shards}
    assert leftovers == {table.SUMMARY_FILE, table.ERRORS_DIR}


def _bucket_snapshot(uri: str) -> dict[str, bytes]:
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache()
    return {p[len(path) :]: fs.cat_file(p) for p in sorted(fs.find(path))}


def test_an_overwrite_on_a_bucket_is_safe_too(gcs_emulator, tmp_path):  # noqa: F811
    local = tmp_path / "images"
    write_image_tree(local, per_class=1)
    fs, _ = storage.filesystem(gcs_emulator)
    fs.put(str(local), f"{BUCKET}/safe-images", recursive=True)
    images, out = f"{gcs_emulator}/safe-images", f"{gcs_emulator}/safe-table"
    first = run_extract(images, out, chunk_size=2)
    before = _bucket_snapshot(out)
    assert any(name.startswith("/features-") for name in before)

    with pytest.raises(Exception, match="damaged"):
        run_extract(images, out, handler=BrokenModelHandler(), overwrite=True, chunk_size=2)
    assert _bucket_snapshot(out) == before

    second = run_extract(images, out, overwrite=True, chunk_size=3)
    shards = table.shard_files(out) + table.shard_files(out, table.ERRORS)
    assert shards and not set(first["feature_files"]) & set(shards)
    assert all(f"-{second['run']['run_id']}-" in f for f in shards)
    assert table.read_table(out).num_rows == 4
    after = _bucket_snapshot(out)
    assert not [name for name in after if name.startswith(("/_staging", "/_plans", "/_LEASE"))]
