"""Exact neighbours against brute force; duplicate groups; k-NN accuracy; bad inputs."""

import numpy as np
import pytest

from transforms import neighbors


def clustered(n=300, dim=24, clusters=6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    labels = rng.integers(0, clusters, n)
    x = centers[labels] + 0.6 * rng.normal(size=(n, dim))
    return neighbors.normalize(x), np.array([f"c{c}" for c in labels], dtype=object)


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_exact_neighbors_match_brute_force(block):
    x, _ = clustered()
    k = 10
    index, sims = neighbors.exact_neighbors(x, x, k, exclude_self=True, block=block)
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    expected = np.sort(full, axis=1)[:, ::-1][:, :k]
    np.testing.assert_allclose(sims, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(full, index, 1), sims, rtol=1e-5, atol=1e-6)
    assert not (index == np.arange(len(x))[:, None]).any()  # never itself
    assert (np.diff(sims, axis=1) <= 1e-7).all()  # best first


def test_queries_against_another_table():
    x, _ = clustered()
    q = x[:5] + 0.01
    index, _ = neighbors.exact_neighbors(neighbors.normalize(q), x, 3, block=32)
    assert index[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_k_and_threshold_are_checked():
    x, _ = clustered(n=10)
    with pytest.raises(ValueError, match="larger than the 9 rows"):
        neighbors.exact_neighbors(x, x, 10, exclude_self=True)
    with pytest.raises(ValueError, match="k must be >= 1"):
        neighbors.exact_neighbors(x, x, 0)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            neighbors.check_threshold(bad)


def test_duplicate_groups_are_connected_components():
    x, _ = clustered(n=50)
    x = np.concatenate([x, x[[3, 3, 7]] * 1.0, neighbors.normalize(x[[20]] + 1e-3)])  # 50..53
    index, sims = neighbors.exact_neighbors(x, x, 5, exclude_self=True)
    groups = neighbors.duplicate_groups(index, sims, 0.999)
    assert [3, 50, 51] in groups and [7, 52] in groups and [20, 53] in groups
    assert all(len(g) > 1 for g in groups)


def test_knn_accuracy_on_clusters_and_unlabelled_rows():
    x, labels = clustered(n=400)
    index, _ = neighbors.exact_neighbors(x, x, 20, exclude_self=True)
    acc = neighbors.knn_accuracy(labels[index], labels)
    assert set(acc) == {1, 5, 20} and all(v > 0.8 for v in acc.values())
    shuffled = np.random.default_rng(1).permutation(labels)
    assert neighbors.knn_accuracy(shuffled[index], shuffled)[5] < 0.4
    unlabelled = labels.copy()
    unlabelled[0] = None
    with pytest.raises(ValueError, match="unlabelled"):
        neighbors.knn_accuracy(labels[index], unlabelled)


def write_vector_table(
    folder, vectors, labels=None, splits=None, *, shards=1, metadata=None, uris=None
):
    """A feature table of given vectors: rows ``id0 ...``, URIs ``/img/0.jpg ...`` by default."""
    from transforms import table

    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "image_id": f"id{i}",
            "uri": uris[i] if uris is not None else f"/img/{i}.jpg",
            "label": None if labels is None else labels[i],
            "split": None if splits is None else splits[i],
            "width": 1,
            "height": 1,
            "file_size": 1,
            "file_version": "1",
            "feature": v.astype(np.float32),
        }
        for i, v in enumerate(vectors)
    ]
    schema = table.feature_schema(vectors.shape[1], metadata or {"backbone": "test"})
    bounds = np.linspace(0, len(rows), shards + 1).astype(int)
    for s in range(shards):  # ids sort as strings: keep each shard's rows in order
        part = table.to_arrow(rows[bounds[s] : bounds[s + 1]], schema)
        part = part.take(np.argsort([int(i[2:]) for i in part.column("image_id").to_pylist()]))
        table.write_parquet(str(folder / table.shard_name("features", s, shards)), part)


def test_neighbors_job_writes_tables_and_reports(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.neighbors import run

    x, labels = clustered(n=60)
    x = np.concatenate([x, x[[5]]])  # a duplicate of row 5 in the other split
    labels = np.concatenate([labels, labels[[5]]])
    splits = ["train"] * 60 + ["val"]
    features = tmp_path / "features"
    write_vector_table(features, x, labels, splits)
    summary = run(
        ["--features", str(features), "--output", str(tmp_path / "nn"), "--k", "5"]
        + ["--duplicates", "0.999"]
    )
    out = {
        r["image_id"]: r for r in pq.read_table(tmp_path / "nn" / "neighbors.parquet").to_pylist()
    }
    assert len(out) == 61 and all(len(r["neighbor_ids"]) == 5 for r in out.values())
    assert out["id60"]["neighbor_ids"][0] == "id5" and out["id60"]["similarities"][0] > 0.9999
    assert out["id60"]["neighbor_uris"][0] == "/img/5.jpg"
    assert "id60" not in out["id60"]["neighbor_ids"]
    assert summary["duplicate_groups"] == 1 and summary["cross_split_groups"] == 1
    dups = pq.read_table(tmp_path / "nn" / "duplicates.parquet").to_pylist()
    assert sorted(d["split"] for d in dups) == ["train", "val"]
    assert set(summary["knn_accuracy"]) == {1, 5, 20}


def test_neighbors_job_bad_inputs(tmp_path, capsys):
    from pipeline.neighbors import main, run

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no feature table here"):
        run(["--features", str(empty), "--output", str(tmp_path / "o")])
    x, _ = clustered(n=8)
    features = tmp_path / "f"
    write_vector_table(features, x)
    with pytest.raises(ValueError, match="larger than the 7 rows"):
        run(["--features", str(features), "--output", str(tmp_path / "o"), "--k", "8"])
    with pytest.raises(SystemExit):
        main(["--features", str(features), "--output", str(tmp_path / "o"), "--duplicates", "1.5"])
    assert "(0, 1]" in capsys.readouterr().err


def test_streamed_search_over_shards_matches_brute_force(tmp_path):
    """Three shards read 13 rows at a time give the in-memory answer; the id columns follow."""
    x, labels = clustered(n=100)
    write_vector_table(tmp_path / "t", x, labels, shards=3)
    shards = neighbors.FeatureShards.open(str(tmp_path / "t"))
    assert len(shards) == 100 and shards.dim == x.shape[1] and len(shards.files) == 3
    assert [len(m) for _, m in shards.batches(rows=13)] == [13] * 7 + [9]  # across shard ends
    assert [len(m) for _, m in shards.batches(rows=1000)] == [100]
    expected_index, expected_sims = neighbors.exact_neighbors(x, x, 7, exclude_self=True)
    for offset, batch in shards.batches(rows=13):
        index, sims = neighbors.exact_search(
            batch,
            lambda: shards.batches(rows=13),
            7,
            self_rows=offset + np.arange(len(batch)),
            block=5,
        )
        np.testing.assert_allclose(sims, expected_sims[offset : offset + len(batch)], atol=1e-6)
        assert (index == expected_index[offset : offset + len(batch)]).mean() > 0.99  # ties
    assert shards.column("label").tolist() == labels.tolist()
    assert shards.column("split").tolist() == [None] * 100


def test_faiss_index_finds_the_exact_neighbours_and_never_the_row_itself():
    x, _ = clustered(n=2000, dim=32, clusters=20)
    exact, _ = neighbors.exact_neighbors(x, x, 10, exclude_self=True)
    index = neighbors.FaissIndex(32, neighbors.cells_for(len(x)), nprobe=8)
    index.index.train(x)
    index.index.add(x)
    found, sims = index.search(x, 10, self_rows=np.arange(len(x)))
    assert found.shape == (2000, 10) and not (found == np.arange(2000)[:, None]).any()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)])
    assert recall > 0.9, recall
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    assert neighbors.cells_for(2000) == 51 and neighbors.cells_for(10) == 1


def test_queries_the_index_cannot_fill_are_answered_exactly(tmp_path, monkeypatch):
    x, _ = clustered(n=200)
    write_vector_table(tmp_path / "t", x)
    searcher = neighbors.Searcher(neighbors.FeatureShards.open(str(tmp_path / "t")), index="faiss")
    real = searcher._index.search

    def short_of_rows(queries, k, *, self_rows=None):
        index, sims = real(queries, k, self_rows=self_rows)
        index[::3, -1] = -1  # as faiss answers when the probed cells hold fewer than k rows
        return index, sims

    monkeypatch.setattr(searcher._index, "search", short_of_rows)
    found, sims = searcher.search(x, 5, self_rows=np.arange(200))
    exact, exact_sims = neighbors.exact_neighbors(x, x, 5, exclude_self=True)
    assert (found >= 0).all()
    np.testing.assert_array_equal(found[::3], exact[::3])
    np.testing.assert_allclose(sims[::3], exact_sims[::3], atol=1e-6)


def test_auto_index_is_exact_for_small_tables_and_faiss_past_the_threshold():
    small = neighbors.AUTO_INDEX_ROWS
    assert neighbors.choose_index("auto", small) == "exact"
    assert neighbors.choose_index("auto", small + 1) == "faiss"
    assert neighbors.choose_index("exact", 10**9) == "exact"
    with pytest.raises(ValueError, match="unknown index"):
        neighbors.choose_index("annoy", 10)


def test_neighbors_job_with_the_faiss_index(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.neighbors import run
    from transforms import table

    x, labels = clustered(n=500)
    write_vector_table(tmp_path / "f", x, labels, shards=2)
    summary = run(
        ["--features", str(tmp_path / "f"), "--output", str(tmp_path / "nn"), "--k", "5"]
        + ["--index", "faiss"]
    )
    assert summary["index"] == "faiss" and summary["knn_accuracy"][5] > 0.8
    written = pq.read_table(tmp_path / "nn" / "neighbors.parquet")
    assert written.num_rows == 500
    meta = table.table_metadata(written.schema)
    assert meta["source_fingerprint"] == summary["source_fingerprint"]
    assert meta["index"] == "faiss" and meta["backbone"] == "test" and meta["source_rows"] == "500"


def test_val_features_query_tables_and_heads_must_match(tmp_path, capsys):
    import json

    import pyarrow.parquet as pq

    from pipeline.neighbors import main, run

    x, labels = clustered(n=300)
    recipe = {"backbone": "mobilenet_v2", "pooling": "avg", "input_size": "160"}
    write_vector_table(tmp_path / "train", x[:200], labels[:200], metadata=recipe)
    write_vector_table(tmp_path / "val", x[200:], labels[200:], metadata=recipe)
    other = {**recipe, "pooling": "max"}
    write_vector_table(tmp_path / "other", x[200:], labels[200:], metadata=other)
    write_vector_table(tmp_path / "unlabelled", x[200:], metadata=recipe)
    head = tmp_path / "head"
    head.mkdir()
    (head / "report.json").write_text(
        json.dumps({"head": "logistic", "accuracy": 0.9, "validation": "tables"})
    )
    # every run replaces the last one's results in NN_OUT: --overwrite
    base = ["--features", str(tmp_path / "train"), "--output", str(tmp_path / "nn"), "--overwrite"]

    summary = run([*base, "--val-features", str(tmp_path / "val"), "--head", str(head)])
    assert summary["knn_on"].startswith("val table") and summary["knn_accuracy"][5] > 0.8
    assert summary["head"]["accuracy"] == 0.9 and not summary["head"]["same_recipe"]

    summary = run([*base, "--k", "3", "--query", str(tmp_path / "val")])
    assert summary["query_rows"] == 100
    assert "knn_accuracy" not in summary  # a query alone: the table's own neighbours are skipped
    found = pq.read_table(tmp_path / "nn" / "query_neighbors.parquet").to_pylist()
    assert len(found) == 100 and all(len(r["neighbor_ids"]) == 3 for r in found)
    assert all(int(r["neighbor_ids"][0][2:]) < 200 for r in found)  # neighbours in the table

    with pytest.raises(ValueError, match="another recipe.*pooling is 'max' there but 'avg'"):
        run([*base, "--query", str(tmp_path / "other")])
    with pytest.raises(ValueError, match="another recipe"):
        run([*base, "--val-features", str(tmp_path / "other")])
    with pytest.raises(ValueError, match="needs a label on every row.*100 unlabelled"):
        run([*base, "--val-features", str(tmp_path / "unlabelled")])
    unlabelled = ["--features", str(tmp_path / "unlabelled"), "--output", str(tmp_path / "o")]
    unlabelled += ["--overwrite"]
    with pytest.raises(ValueError, match="needs a label on every row"):
        run([*unlabelled, "--head", str(head)])
    assert "knn_accuracy" not in run(unlabelled)  # not asked: no figure, no error
    write_vector_table(tmp_path / "no-recipe", x[:20])
    with pytest.raises(ValueError, match="cannot rebuild the recipe"):
        run(
            ["--features", str(tmp_path / "no-recipe"), "--output", str(tmp_path / "o2")]
            + ["--query", str(tmp_path)]
        )
    main([*base, "--val-features", str(tmp_path / "val"), "--head", str(head)])
    printed = capsys.readouterr().out
    assert "5-NN accuracy (val table" in printed and "logistic head accuracy: 0.900" in printed


@pytest.mark.slow
def test_a_planted_near_duplicate_is_found_across_splits(tmp_path, sample_weights):
    """A val photo resized and re-encoded into train is grouped with its original, and the
    group is flagged as crossing the split boundary; no other pair of these photos is."""
    import io
    import shutil

    from PIL import Image

    from pipeline.config import demo_images_dir
    from pipeline.extract import run as extract
    from pipeline.neighbors import run

    photos = demo_images_dir()
    train = ["astronaut.png", "coffee.png", "rocket.jpg", "retina.jpg", "camera.png"]
    val = ["chelsea.png", "hubble_deep_field.jpg", "motorcycle_left.png", "brick.png"]
    for split, names in (("train", train), ("val", val)):
        (tmp_path / "images" / split / "photos").mkdir(parents=True)
        for name in names:
            shutil.copy(f"{photos}/{name}", tmp_path / "images" / split / "photos" / name)
    with Image.open(f"{photos}/chelsea.png") as image:
        smaller = image.convert("RGB").resize((image.width * 7 // 10, image.height * 7 // 10))
    buffer = io.BytesIO()
    smaller.save(buffer, "JPEG", quality=85)
    (tmp_path / "images" / "train" / "photos" / "cat_copy.jpg").write_bytes(buffer.getvalue())

    extract(
        ["--input", str(tmp_path / "images"), "--output", str(tmp_path / "features")]
        + ["--backbone", "mobilenet_v2", "--weights", "sample"]
    )
    summary = run(
        ["--features", str(tmp_path / "features"), "--output", str(tmp_path / "nn"), "--k", "3"]
        + ["--duplicates", "0.95"]
    )
    assert summary["duplicate_groups"] == 1 and summary["cross_split_groups"] == 1
    (group,) = summary["cross_split_examples"]
    assert sorted(uri.rsplit("/", 1)[-1] for uri in group) == ["cat_copy.jpg", "chelsea.png"]

    # The copy as a query, embedded with the table's own recipe: its nearest rows are itself (the
    # same vector) and the original.
    import pyarrow.parquet as pq

    from transforms import table

    summary = run(
        ["--features", str(tmp_path / "features"), "--output", str(tmp_path / "nn"), "--k", "2"]
        + ["--query", str(tmp_path / "images" / "train" / "photos" / "cat_copy.jpg")]
        + ["--overwrite"]  # NN_OUT holds the first run's results
    )
    assert summary["query_inputs"] == 1 and summary["query_rows"] == 1
    (found,) = pq.read_table(tmp_path / "nn" / "query_neighbors.parquet").to_pylist()
    names = [uri.rsplit("/", 1)[-1] for uri in found["neighbor_uris"]]
    assert names == ["cat_copy.jpg", "chelsea.png"], names
    assert found["similarities"][0] > 0.9999 and found["similarities"][1] > 0.95
    query_meta = table.read_table(str(tmp_path / "nn" / "query")).schema
    base_meta = table.read_table(str(tmp_path / "features")).schema
    assert (
        table.table_metadata(query_meta)["weights_fingerprint"]
        == (table.table_metadata(base_meta)["weights_fingerprint"])
    )
