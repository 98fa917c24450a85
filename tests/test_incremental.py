"""Incremental runs and resuming a killed run: each image in the table exactly once."""

from __future__ import annotations

import collections
import logging
import os
import signal

import pyarrow.parquet as pq
import pytest
from conftest import encode, gradient
from fakes import MeanColorHandler, add_bad_files, interrupt_real_job, run_extract, run_table

from pipeline.extract import run
from transforms import listing, table


class NoModelHandler(MeanColorHandler):
    """Fails if any model work is attempted."""

    def load_model(self):
        raise AssertionError("the model was loaded")


def incremental(sources, out, handler=None, **kwargs):
    return run_table(
        str(sources), out, handler=handler, mode="incremental", max_pixels=4_000_000, **kwargs
    )


def ids_in(out) -> collections.Counter:
    return collections.Counter(table.read_table(str(out)).column("image_id").to_pylist())


def mtimes(out) -> dict[str, float]:
    return {f: os.path.getmtime(f) for f in table.shard_files(str(out))}


def test_only_new_images_are_embedded_and_unchanged_input_does_no_model_work(image_tree, tmp_path):
    add_bad_files(image_tree)
    out = tmp_path / "t"
    first = incremental(image_tree, out, chunk_size=5)
    assert (first["rows"], first["errors"], first["run"]["embedded"]) == (12, 4, 16)
    before = mtimes(out)

    new = image_tree / "train" / "cats"
    for i in range(3):
        (new / f"new{i}.png").write_bytes(encode(gradient(seed=100 + i)))
    second = incremental(image_tree, out, chunk_size=5)
    assert second["run"]["embedded"] == 3 and second["run"]["new_rows"] == 3
    assert (second["inputs"], second["rows"], second["errors"]) == (19, 15, 4)
    assert {f: os.path.getmtime(f) for f in before} == before  # old shards untouched
    counts = ids_in(out)
    assert len(counts) == 15 and set(counts.values()) == {1}

    third = incremental(image_tree, out, NoModelHandler(), chunk_size=5)
    assert third["run"]["embedded"] == 0 and third["run"]["new_rows"] == 0
    assert (third["inputs"], third["rows"], third["errors"]) == (19, 15, 4)
    assert ids_in(out) == counts


def test_a_changed_file_replaces_its_row(image_tree, tmp_path):
    out = tmp_path / "t"
    incremental(image_tree, out, chunk_size=4)
    target = image_tree / "val" / "dogs" / "0.png"
    old = table.read_table(str(out)).to_pandas().set_index("uri").loc[str(target)]

    target.write_bytes(encode(gradient(50, 50, seed=999)))  # new size and mtime
    summary = incremental(image_tree, out, chunk_size=4)
    assert summary["run"]["embedded"] == 1 and summary["run"]["stale_rows_removed"] == 1
    frame = table.read_table(str(out)).to_pandas()
    assert frame["image_id"].is_unique and len(frame) == 12
    new = frame.set_index("uri").loc[str(target)]
    assert (new["width"], new["height"]) == (50, 50) != (old["width"], old["height"])
    assert new["file_size"] == target.stat().st_size


def test_errors_are_kept_unless_retried(image_tree, tmp_path):
    add_bad_files(image_tree)
    out = tmp_path / "t"
    incremental(image_tree, out)
    kept = incremental(image_tree, out)
    assert kept["run"]["embedded"] == 0 and kept["errors"] == 4
    retried = incremental(image_tree, out, retry_errors=True)
    assert retried["run"]["embedded"] == 4 and retried["run"]["new_errors"] == 4
    errors = table.read_table(str(out), prefix=table.ERRORS)
    assert errors.num_rows == 4 and len(set(errors.column("image_id").to_pylist())) == 4


def test_a_table_made_with_other_settings_is_refused(image_tree, tmp_path):
    out = tmp_path / "t"
    incremental(image_tree, out)
    with pytest.raises(ValueError, match="resize"):
        incremental(image_tree, out, MeanColorHandler(resize="crop"))


def test_full_mode_refuses_an_existing_table(image_tree, tmp_path):
    out = tmp_path / "t"
    run_extract(str(image_tree), out)
    with pytest.raises(FileExistsError, match="--mode incremental"):
        run_extract(str(image_tree), out)


@pytest.mark.slow
def test_a_run_killed_midway_is_finished_by_the_next_run(tmp_path, caplog):
    argv, job, _ = interrupt_real_job(tmp_path, signum=signal.SIGKILL, shards=2)
    images, out = tmp_path / "images", tmp_path / "t"

    committed = table.shard_files(str(out))
    before = {f: os.path.getmtime(f) for f in committed}
    done = sum(pq.read_metadata(f).num_rows for f in committed)  # every visible shard is whole
    assert 0 < done < 120
    assert len(list((out / "_plans").iterdir())) == 1  # the dead run's plan

    # The dead run still holds the lease, but it names this host and a pid that is gone: the next
    # run takes it over at once (no --break-lease, no wait for the expiry), saying so.
    assert (out / "_LEASE.json").exists()
    with caplog.at_level(logging.WARNING, logger="transforms.lease"):
        summary = run([*argv, "--mode", "incremental"])
    assert f"(pid {job.pid}) is no longer running on this host" in caplog.text
    assert summary["run"]["embedded"] == 120 - done
    assert (summary["inputs"], summary["rows"], summary["errors"]) == (120, 120, 0)
    assert {f: os.path.getmtime(f) for f in committed} == before  # not recomputed
    counts = ids_in(out)
    expected = {r.image_id for r in listing.list_sources([str(images)])}
    assert set(counts) == expected and set(counts.values()) == {1}
    assert not (out / "_plans").exists() and not (out / "_LEASE.json").exists()
