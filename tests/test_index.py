"""transforms.index, index_update and index_files: the persisted index that follows a table: built, searched (exactly and through faiss, with
filters), and updated in place after real incremental runs, as a fresh build would be."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import encode, gradient
from fakes import run_extract

from pipeline import index as index_job
from transforms import index, index_files, index_update, neighbors
from transforms import table as tables

META = {"backbone": "synthetic", "weights_fingerprint": "none", "feature_dim": "16"}


def write_shard(folder, name, ids, vectors, *, metadata=META, version="v1"):
    """A shard of the real feature schema holding ``ids`` (ints) and their vectors."""
    rows = [
        {
            "image_id": f"{i:032x}",
            "uri": f"/images/{i}.jpg",
            "label": f"c{i % 3}",
            "split": "train" if i % 4 else "val",
            "width": 8,
            "height": 8,
            "file_size": 100,
            "file_version": version,
            "feature": v,
        }
        for i, v in zip(ids, vectors, strict=True)
    ]
    schema = tables.feature_schema(len(vectors[0]), metadata)
    tables.write_parquet(os.path.join(folder, name), tables.to_arrow(rows, schema))


def clustered(n, *, dim=16, seed=0):
    """Vectors around 200 centres, as image features are (random points have no neighbours)."""
    centres = np.random.default_rng(99).standard_normal((200, dim))
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(0, 200, n)] + 0.4 * rng.standard_normal((n, dim))).astype(
        np.float32
    )


def ids_of(ix: index.SearchIndex, positions: np.ndarray) -> list[list[str | None]]:
    ids = ix.rows.column("image_id").to_pylist()
    return [[ids[p] if p >= 0 else None for p in row] for row in positions]


def recall_at_10(ix, queries, allowed=None, **search) -> float:
    _, found = ix.search(queries, 10, allowed=allowed, **search)
    _, truth = ix._exact(neighbors.normalize(queries), 10, allowed)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]))


@pytest.fixture
def small_table(tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    vectors = clustered(300)
    write_shard(out, "features-A-00000-of-00002.parquet", range(0, 150), vectors[:150])
    write_shard(out, "features-A-00001-of-00002.parquet", range(150, 300), vectors[150:])
    return str(out), vectors


def test_search_equals_the_neighbours_exact_search(small_table):
    out, vectors = small_table
    done = index.build_or_update(out)
    assert (done.action, done.added, done.rows, done.kind) == ("built", 300, 300, "exact")
    ix = index.SearchIndex.open(index.default_dir(out))
    assert (len(ix), ix.dim, ix.metadata["backbone"]) == (300, 16, "synthetic")
    assert ix.rows.column_names == ["image_id", "uri", "label", "split"]

    queries = clustered(20, seed=5)
    sims, positions = ix.search(queries, 7)
    shards = neighbors.FeatureShards.open(out)
    want_pos, want_sims = neighbors.exact_search(neighbors.normalize(queries), shards.batches, 7)
    np.testing.assert_array_equal(positions, want_pos)
    np.testing.assert_allclose(sims, want_sims, rtol=1e-6)
    assert sims.dtype == np.float32 and positions.dtype == np.int64

    position = ix.position_of(f"{123:032x}")
    np.testing.assert_allclose(ix.vector_at(position), neighbors.normalize(vectors[123:124])[0])
    sims, positions = ix.search(ix.vector_at(position)[None], 1)
    assert positions[0, 0] == position and sims[0, 0] == pytest.approx(1.0)
    with pytest.raises(KeyError):
        ix.position_of("f" * 32)

    sims, positions = ix.search(queries[:2], 305)  # more than there are: padded
    assert (positions[:, 300:] == -1).all() and np.isneginf(sims[:, 300:]).all()
    assert (positions[:, :300] >= 0).all()


@pytest.mark.parametrize("kind", ["exact", "faiss"])
def test_a_filter_finds_only_allowed_rows_exactly_and_through_faiss(small_table, kind, monkeypatch):
    out, _ = small_table
    index.build_or_update(out, kind=kind)
    ix = index.SearchIndex.open(index.default_dir(out))
    assert ix.kind == kind
    train = np.asarray(ix.rows.column("split").to_pylist()) == "train"
    queries = clustered(10, seed=3)
    shards = neighbors.FeatureShards.open(out)
    truth_pos, _ = neighbors.exact_search(
        neighbors.normalize(queries), shards.batches, 5, allowed=train
    )
    for subset_rows in (index.EXACT_SUBSET_ROWS, 10):  # exactly among them; faiss' bitmap
        monkeypatch.setattr(index, "EXACT_SUBSET_ROWS", subset_rows)
        sims, positions = ix.search(queries, 5, allowed=train)
        assert train[positions].all()
        if kind == "exact":
            np.testing.assert_array_equal(positions, truth_pos)
        else:
            assert (
                np.mean(
                    [len(set(a) & set(b)) / 5 for a, b in zip(positions, truth_pos, strict=True)]
                )
                > 0.95
            )
    few = np.zeros(len(ix), bool)
    few[[3, 77]] = True
    sims, positions = ix.search(queries, 4, allowed=few)
    assert set(positions[:, :2].ravel()) == {3, 77} and (positions[:, 2:] == -1).all()
    assert np.isneginf(sims[:, 2:]).all()
    sims, positions = ix.search(queries, 3, allowed=np.zeros(len(ix), bool))
    assert (positions == -1).all()


def replace_image(path):
    path.write_bytes(encode(gradient(40, 30, seed=999), "PNG"))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_after_real_incremental_runs_the_update_equals_a_fresh_build(image_tree, tmp_path):
    out = tmp_path / "t"
    run_extract(str(image_tree), out, chunk_size=3)  # 12 images, 4 shards
    first = index.build_or_update(str(out))
    assert (first.action, first.rows) == ("built", 12)
    shards_before = {f: os.stat(f).st_mtime_ns for f in tables.shard_files(str(out))}

    for i in range(3):  # added
        (image_tree / "train" / "cats" / f"new{i}.png").write_bytes(
            encode(gradient(40, 30, seed=500 + i), "PNG")
        )
    replace_image(image_tree / "val" / "dogs" / "0.png")  # replaced in place
    (image_tree / "train" / "dogs" / "1.jpg").unlink()  # pruned
    run_extract(str(image_tree), out, mode="incremental", prune=True, chunk_size=3)

    read = []
    real = index_update._shard_columns
    index_update._shard_columns = lambda s, **kw: read.append(s.uri) or real(s, **kw)
    try:
        done = index.build_or_update(str(out))
    finally:
        index_update._shard_columns = real
    assert (done.action, done.added, done.removed, done.rows) == ("updated", 4, 2, 14)
    untouched = {
        f for f in tables.shard_files(str(out)) if shards_before.get(f) == os.stat(f).st_mtime_ns
    }
    assert untouched and not untouched & set(read), "unchanged shards were read again"
    assert set(read) - set(shards_before), "the new shards were not read"
    assert index.build_or_update(str(out)).action == "unchanged"

    fresh = index.build_or_update(str(out), str(tmp_path / "fresh"))
    assert fresh.action == "built"
    updated = index.SearchIndex.open(index.default_dir(str(out)))
    built = index.SearchIndex.open(str(tmp_path / "fresh"))
    order_u = np.argsort(updated.rows.column("image_id").to_pylist())
    order_b = np.argsort(built.rows.column("image_id").to_pylist())
    assert updated.rows.take(order_u).equals(built.rows.take(order_b))
    np.testing.assert_array_equal(
        np.asarray(updated._vectors)[order_u], np.asarray(built._vectors)[order_b]
    )
    queries = np.random.default_rng(0).random((6, 3)).astype(np.float32)
    for ix in (updated, built):
        assert ix.position_of(ix.rows.column("image_id")[0].as_py()) == 0
    (su, pu), (sb, pb) = updated.search(queries, 5), built.search(queries, 5)
    np.testing.assert_array_equal(su, sb)
    assert ids_of(updated, pu) == ids_of(built, pb)
    assert tables.read_table(str(out)).num_rows == 14  # the index folder is not a shard
    history = json.loads((out / "_index" / "index.json").read_text())["history"]
    assert [h["action"] for h in history] == ["built", "updated"]


def test_faiss_keeps_recall_after_adds_and_removes(tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    vectors = clustered(24_000, seed=1)
    for j in range(4):
        rows = range(j * 5000, (j + 1) * 5000)
        write_shard(
            out, f"features-A-{j:05d}-of-00004.parquet", rows, vectors[rows.start : rows.stop]
        )
    assert index.build_or_update(str(out)).kind == "faiss"  # auto: past AUTO_INDEX_ROWS
    queries = clustered(200, seed=7)
    assert recall_at_10(index.SearchIndex.open(str(out / "_index")), queries) >= 0.95

    write_shard(out, "features-B-00000-of-00001.parquet", range(20_000, 24_000), vectors[20_000:])
    write_shard(out, "features-A-00001-of-00004.parquet", range(5000, 8000), vectors[5000:8000])
    done = index.build_or_update(str(out))
    assert (done.action, done.added, done.removed, done.rows) == ("updated", 4000, 2000, 22_000)
    assert done.reason == ""  # not retrained: 6,000 changed rows of 20,000
    ix = index.SearchIndex.open(str(out / "_index"))
    assert ix.manifest["trained"]["changed"] == 6000 and ix._faiss.ntotal == 22_000
    assert recall_at_10(ix, queries) >= 0.95
    train = np.asarray(ix.rows.column("split").to_pylist()) == "train"
    assert recall_at_10(ix, queries, train) >= 0.95
    assert recall_at_10(ix, queries, nprobe=1) < 0.95  # one cell searched: neighbours missed
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        ix.search(queries, 10, nprobe=0)
    gone = f"{9000:032x}"
    with pytest.raises(KeyError):
        ix.position_of(gone)
    _, positions = ix.search(vectors[9000:9001], 10)
    assert gone not in ids_of(ix, positions)[0]


def test_a_recipe_change_rebuilds_and_says_why(small_table):
    out, vectors = small_table
    index.build_or_update(out)
    other = {**META, "backbone": "another"}
    for j, rows in enumerate((range(0, 150), range(150, 300))):
        write_shard(
            out,
            f"features-A-{j:05d}-of-00002.parquet",
            rows,
            vectors[rows.start : rows.stop],
            metadata=other,
        )
    done = index.build_or_update(out)
    assert (done.action, done.added, done.removed) == ("rebuilt", 300, 300)
    assert "backbone" in done.reason and "another" in done.reason
    assert index.SearchIndex.open(index.default_dir(out)).metadata["backbone"] == "another"


def test_drift_retrains_and_records_when_and_why(small_table, monkeypatch):
    out, vectors = small_table
    index.build_or_update(out, kind="faiss")
    trained = index.read_manifest(index.default_dir(out))["trained"]
    assert (trained["rows"], trained["reason"]) == (300, "built")
    more = clustered(400, seed=11)
    write_shard(out, "features-B-00000-of-00001.parquet", range(300, 700), more)
    done = index.build_or_update(out)
    assert done.action == "updated" and done.reason.startswith("retrained: the table more than")
    trained = index.read_manifest(index.default_dir(out))["trained"]
    assert trained["rows"] == 700 and "doubled" in trained["reason"] and trained["at"]

    # auto switches kind when the table crosses the threshold, from the stored vectors
    monkeypatch.setattr(neighbors, "AUTO_INDEX_ROWS", 800)
    index.build_or_update(out, kind="auto")
    assert index.read_manifest(index.default_dir(out))["kind"] == "exact"
    write_shard(out, "features-C-00000-of-00001.parquet", range(700, 900), clustered(200, seed=12))
    done = index.build_or_update(out)
    assert (done.action, done.kind, done.added) == ("updated", "faiss", 200)
    assert "grew past 800 rows" in done.reason
    ix = index.SearchIndex.open(index.default_dir(out))
    assert ix._faiss.ntotal == 900 and recall_at_10(ix, clustered(50, seed=2)) >= 0.95


def test_an_interrupted_update_leaves_the_previous_index_usable(small_table, monkeypatch):
    out, _ = small_table
    index.build_or_update(out)
    index_dir = index.default_dir(out)
    before = sorted(os.listdir(index_dir))
    write_shard(out, "features-B-00000-of-00001.parquet", range(300, 320), clustered(20, seed=4))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the new vectors, before the new rows and manifest

    monkeypatch.setattr(index_files, "write_rows", crash)
    with pytest.raises(KeyboardInterrupt):
        index.build_or_update(out)
    assert len(os.listdir(index_dir)) > len(before)  # a half-written generation lies there
    ix = index.SearchIndex.open(index_dir)
    assert len(ix) == 300 and ix.search(clustered(1), 3)[1].min() >= 0
    monkeypatch.undo()
    assert index.build_or_update(out).added == 20
    assert len(os.listdir(index_dir)) == len(before)  # the stray files are gone


def test_a_table_that_changes_during_the_update_is_retried_then_refused(small_table, monkeypatch):
    out, _ = small_table
    real = index_update._table_state
    calls = []

    def changing(folder):
        shards, metadata, dim = real(folder)
        calls.append(1)
        return (
            [
                *shards[:-1],
                index_update._Shard(shards[-1].name, shards[-1].uri, 1, str(len(calls))),
            ],
            metadata,
            dim,
        )

    monkeypatch.setattr(index_update, "_table_state", changing)
    with pytest.raises(index.TableChanged, match="changed while its index was being updated"):
        index.build_or_update(out, retries=2)
    assert len(calls) == 4
    with pytest.raises(FileNotFoundError):
        index.SearchIndex.open(index.default_dir(out))  # nothing committed
    assert not [n for n in os.listdir(index.default_dir(out)) if index_files.is_generation_file(n)]


def test_an_image_twice_in_the_table_is_refused(small_table):
    out, vectors = small_table
    write_shard(out, "features-B-00000-of-00001.parquet", range(0, 3), vectors[:3])
    with pytest.raises(index.TableChanged, match="more than once"):
        index.build_or_update(out)


def test_one_updater_at_a_time(small_table):
    out, _ = small_table
    index.build_or_update(out)
    busy = pytest.raises(index.IndexBusy, match="being updated by another process")
    with index_files.locked(index.default_dir(out)), busy:
        index.build_or_update(out)


def test_opening_a_missing_index_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="featurebeam index --features"):
        index.SearchIndex.open(str(tmp_path / "none"))


def test_the_command_prints_what_it_did_and_refuses_in_one_line(small_table, tmp_path, capsys):
    out, _ = small_table
    index_job.main(["--features", out, "--kind", "exact"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("built: +300 -0, 300 rows, exact,") and line.endswith("_index")
    index_job.main(["--features", out])
    assert capsys.readouterr().out.startswith("unchanged: 300 rows, exact")
    index_job.main(["--features", out, "--rebuild"])
    assert "(asked to rebuild (--rebuild))" in capsys.readouterr().out

    with pytest.raises(SystemExit) as stop:
        index_job.main(["--features", str(tmp_path / "missing")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no feature table here" in err
    with pytest.raises(SystemExit) as stop:
        index_job.main(["--features", out, "--index", "gs://bucket/ix"])
    assert stop.value.code == 2 and "local disk" in capsys.readouterr().err


def test_a_refused_update_writes_nothing(small_table, tmp_path, capsys):
    # Pointed at the image folder by mistake, the command used to refuse yet leave _index/.lock
    # there; a missing folder was created with it.
    mistakes = tmp_path / "mistakes"
    images = mistakes / "images"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"not really")
    for features in (images, mistakes / "missing"):
        with pytest.raises(SystemExit) as stop:
            index_job.main(["--features", str(features)])
        assert stop.value.code == 2 and "no feature table here" in capsys.readouterr().err
    assert [p.name for p in mistakes.iterdir()] == ["images"]
    assert [p.name for p in images.iterdir()] == ["a.jpg"]
    out, _ = small_table
    index_job.main(["--features", out])
    with pytest.raises(SystemExit) as stop:  # --index at a file of the index
        index_job.main(["--features", out, "--index", f"{out}/_index/index.json"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.endswith(
        "is a file; the index is a folder (pass --index DIR)"
    )


def test_behind_says_what_the_index_has_not_read(small_table, tmp_path):
    out, vectors = small_table
    assert index.behind(out, index.default_dir(out)) == ""  # no index: nothing to be behind
    index.build_or_update(out)
    assert index.behind(out, index.default_dir(out)) == ""
    write_shard(out, "features-B-00000-of-00001.parquet", range(300, 310), clustered(10, seed=3))
    os.remove(os.path.join(out, "features-A-00000-of-00002.parquet"))
    assert index.behind(out, index.default_dir(out)).startswith(
        "the table changed since the index was updated (1 shard(s) new or rewritten, 1 gone); "
        f"run `featurebeam index --features {out}`"
    )
    other = str(tmp_path / "elsewhere")
    index.build_or_update(out, other)
    write_shard(out, "features-B-00000-of-00001.parquet", range(300, 312), clustered(12, seed=4))
    assert index.behind(out, other).endswith(
        f"run `featurebeam index --features {out} --index {other}`"
    )
    recipe = {**META, "backbone": "another"}
    for name in os.listdir(out):
        if name.startswith("features-"):
            os.remove(os.path.join(out, name))
    write_shard(out, "features-C-00000-of-00001.parquet", range(5), clustered(5), metadata=recipe)
    assert index.behind(out, other).startswith(
        "the index needs a rebuild: the table's recipe changed (backbone was 'synthetic'"
    )


def test_the_index_is_a_pyarrow_table_and_numpy_array_on_disk(small_table):
    """What the serve helper and any reader rely on: rows parquet position-aligned with the npy."""
    out, vectors = small_table
    index.build_or_update(out)
    manifest = index.read_manifest(index.default_dir(out))
    rows = pq.read_table(os.path.join(index.default_dir(out), manifest["files"]["rows"]))
    stored = np.load(os.path.join(index.default_dir(out), manifest["files"]["vectors"]))
    assert stored.dtype == np.float32 and stored.flags.c_contiguous
    at = rows.column("image_id").to_pylist().index(f"{42:032x}")
    np.testing.assert_allclose(stored[at], neighbors.normalize(vectors[42:43])[0])
    assert manifest["fingerprint"] and set(manifest["shards"]) == {
        "features-A-00000-of-00002.parquet",
        "features-A-00001-of-00002.parquet",
    }


def test_faiss_on_too_few_rows_is_exact_until_the_table_grows(tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    write_shard(out, "features-A-00000-of-00001.parquet", range(40), clustered(40))
    done = index.build_or_update(str(out), kind="faiss")
    assert done.kind == "exact" and "too few to train a faiss index" in done.reason
    assert index.SearchIndex.open(str(out / "_index")).search(clustered(1), 3)[1].min() >= 0
    write_shard(out, "features-B-00000-of-00001.parquet", range(40, 400), clustered(360, seed=2))
    done = index.build_or_update(str(out))  # still asked for faiss: trained now
    assert (done.action, done.kind) == ("updated", "faiss") and "grew past 256 rows" in done.reason


@pytest.mark.parametrize("kind", ["exact", "faiss"])
def test_missing_index_files_are_named_and_the_next_update_rebuilds(small_table, kind):
    out, _ = small_table
    index.build_or_update(out, kind=kind)
    index_dir = index.default_dir(out)
    manifest = index.read_manifest(index_dir)
    lost = manifest["files"][kind == "faiss" and "faiss" or "rows"]
    os.remove(os.path.join(index_dir, lost))
    with pytest.raises(FileNotFoundError, match=f"{lost} is missing; rebuild"):
        index.SearchIndex.open(index_dir)
    done = index.build_or_update(out)
    assert (done.action, done.kind) == ("rebuilt", kind) and lost in done.reason
    assert len(index.SearchIndex.open(index_dir)) == 300


def test_opening_follows_an_update_that_commits_meanwhile(small_table, monkeypatch):
    out, _ = small_table
    index.build_or_update(out)
    index_dir = index.default_dir(out)
    write_shard(out, "features-B-00000-of-00001.parquet", range(300, 310), clustered(10, seed=8))
    real = index.SearchIndex._open_generation
    calls = []

    def update_first(index_dir, manifest):
        if not calls:  # the update commits (and removes this generation) before the files are read
            calls.append(index.build_or_update(out))
        return real(index_dir, manifest)

    monkeypatch.setattr(index.SearchIndex, "_open_generation", staticmethod(update_first))
    assert len(index.SearchIndex.open(index_dir)) == 310 and calls[0].added == 10
