"""Exact neighbours against brute force; duplicate groups; k-NN accuracy; bad inputs."""

import numpy as np
import pytest

from transforms import neighbors


def _clustered(n=300, dim=24, clusters=6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    labels = rng.integers(0, clusters, n)
    x = centers[labels] + 0.6 * rng.normal(size=(n, dim))
    return neighbors.normalize(x), np.array([f"c{c}" for c in labels], dtype=object)


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_exact_neighbors_match_brute_force(block):
    x, _ = _clustered()
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
    x, _ = _clustered()
    q = x[:5] + 0.01
    index, _ = neighbors.exact_neighbors(neighbors.normalize(q), x, 3, block=32)
    assert index[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_k_and_threshold_are_checked():
    x, _ = _clustered(n=10)
    with pytest.raises(ValueError, match="larger than the 9 rows"):
        neighbors.exact_neighbors(x, x, 10, exclude_self=True)
    with pytest.raises(ValueError, match="k must be >= 1"):
        neighbors.exact_neighbors(x, x, 0)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            neighbors.check_threshold(bad)


def test_duplicate_groups_are_connected_components():
    x, _ = _clustered(n=50)
    x = np.concatenate([x, x[[3, 3, 7]] * 1.0, neighbors.normalize(x[[20]] + 1e-3)])  # 50..53
    index, sims = neighbors.exact_neighbors(x, x, 5, exclude_self=True)
    groups = neighbors.duplicate_groups(index, sims, 0.999)
    assert [3, 50, 51] in groups and [7, 52] in groups and [20, 53] in groups
    assert all(len(g) > 1 for g in groups)


def test_knn_accuracy_on_clusters_and_unlabelled_rows():
    x, labels = _clustered(n=400)
    index, _ = neighbors.exact_neighbors(x, x, 20, exclude_self=True)
    acc = neighbors.knn_accuracy(labels[index], labels)
    assert set(acc) == {1, 5, 20} and all(v > 0.8 for v in acc.values())
    shuffled = np.random.default_rng(1).permutation(labels)
    assert neighbors.knn_accuracy(shuffled[index], shuffled)[5] < 0.4
    unlabelled = labels.copy()
    unlabelled[0] = None
    with pytest.raises(ValueError, match="unlabelled"):
        neighbors.knn_accuracy(labels[index], unlabelled)


def _write_table(folder, vectors, labels=None, splits=None):
    from transforms import table

    rows = [
        {
            "image_id": f"id{i}",
            "uri": f"/img/{i}.jpg",
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
    schema = table.feature_schema(vectors.shape[1], {"backbone": "test"})
    table.write_parquet(
        str(folder / "features-00000-of-00001.parquet"), table.to_arrow(rows, schema)
    )


def test_neighbors_job_writes_tables_and_reports(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.neighbors import run

    x, labels = _clustered(n=60)
    x = np.concatenate([x, x[[5]]])  # a duplicate of row 5 in the other split
    labels = np.concatenate([labels, labels[[5]]])
    splits = ["train"] * 60 + ["val"]
    features = tmp_path / "features"
    features.mkdir()
    _write_table(features, x, labels, splits)
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
    assert set(summary["knn_accuracy"]) == {1, 5}


def test_neighbors_job_bad_inputs(tmp_path, capsys):
    from pipeline.neighbors import main, run

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no feature table here"):
        run(["--features", str(empty), "--output", str(tmp_path / "o")])
    x, _ = _clustered(n=8)
    features = tmp_path / "f"
    features.mkdir()
    _write_table(features, x)
    with pytest.raises(ValueError, match="larger than the 7 rows"):
        run(["--features", str(features), "--output", str(tmp_path / "o"), "--k", "8"])
    with pytest.raises(SystemExit):
        main(["--features", str(features), "--output", str(tmp_path / "o"), "--duplicates", "1.5"])
    assert "(0, 1]" in capsys.readouterr().err


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
