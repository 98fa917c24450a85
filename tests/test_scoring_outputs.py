"""The jobs that score and write results: which rows train and validate (the split rule), a
head's recipe beside a table, every job's output rule (refuse a used output unless --overwrite;
replace it only once the new result is complete), messages that fit, and classify's preview."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest
from conftest import encode, gradient
from test_gcs import gcs_emulator  # noqa: F401  (the GCS emulator fixture)

from pipeline import neighbors as neighbors_job
from pipeline import report as report_job
from pipeline import train_head
from transforms import model_io, splits, storage, table
from transforms.models.recipe import table_fingerprint

RECIPE = {"backbone": "mobilenet_v2", "pooling": "avg", "input_size": "160"}


def write_table(folder: pathlib.Path, x, labels, split_names, *, uris=None, metadata=RECIPE):
    """A feature table of the given vectors, labels and splits (one shard)."""
    rows = [
        {
            "image_id": f"id{i:04d}",
            "uri": uris[i] if uris else f"/img/{split_names[i] or 'none'}/{i}.jpg",
            "label": labels[i],
            "split": split_names[i],
            "width": 1,
            "height": 1,
            "file_size": 1,
            "file_version": "1",
            "feature": np.asarray(v, np.float32),
        }
        for i, v in enumerate(x)
    ]
    schema = table.feature_schema(x.shape[1], metadata)
    table.write_parquet(
        str(folder / table.shard_name("features", 0, 1)), table.to_arrow(rows, schema)
    )


def clusters(counts: dict[str, int], dim=8, seed=0):
    """Rows around one centre per label, in the order of ``counts``."""
    rng = np.random.default_rng(seed)
    x, labels = [], []
    for c, (label, n) in enumerate(counts.items()):
        centre = np.zeros(dim)
        centre[c % dim] = 5.0
        x.append(centre + 0.3 * rng.normal(size=(n, dim)))
        labels += [label] * n
    return np.concatenate(x), labels


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def no_staging_left(parent: pathlib.Path) -> bool:
    return not [p for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


def assert_refused(main, argv, capsys, output):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: [^\n]*\n", err), err
    assert str(output) in err and "--overwrite" in err and "another" in err


# --- 6. the split rule ---------------------------------------------------------------------------


@pytest.fixture
def split_table(tmp_path):
    """40 train, 12 val, 6 test and 2 'holdout' rows of two labels."""
    names = ["train"] * 40 + ["val"] * 12 + ["test"] * 6 + ["holdout"] * 2
    labels = (["ants", "bees"] * 30)[:60]
    rng = np.random.default_rng(1)
    centres = {"ants": np.eye(8)[0] * 4, "bees": np.eye(8)[1] * 4}
    x = np.stack([centres[label] + 0.5 * rng.normal(size=8) for label in labels])
    write_table(tmp_path / "t", x, labels, names)
    uris = [f"/img/{n}/{i}.jpg" for i, n in enumerate(names)]
    return tmp_path / "t", np.array(names), np.array(uris)


def test_train_head_trains_on_train_rows_and_validates_on_val_rows(split_table, tmp_path, capsys):
    folder, names, uris = split_table
    out = tmp_path / "head"
    train_head.main(["--features", str(folder), "--model-dir", str(out), "--epochs", "2"])
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert sum(report["counts"]["train"].values()) == 40
    assert sum(report["counts"]["validation"].values()) == 12
    assert report["validation"]["source"] == "split column"
    assert report["validation"]["left_out"] == {"holdout": 2}
    assert report["test"]["rows"] == 6 and 0.0 <= report["test"]["accuracy"] <= 1.0
    validated = model_io.read_validation_predictions(str(out)).column("uri").to_pylist()
    assert sorted(validated) == sorted(uris[names == "val"].tolist())  # exactly the val rows
    assert "validation: split column (40 train rows, 12 validation rows)" in printed
    assert "holdout: 2" in printed and "test accuracy" in printed


def test_split_rule_at_its_boundaries():
    labels = np.array(["a", "b"] * 10)
    no_split = splits.split_rows([None] * 20, labels, fraction=0.2, seed=0)
    assert no_split.source == "random stratified 20%" and len(no_split.val) == 4
    assert not no_split.from_column
    empty = splits.split_rows([""] * 20, labels, fraction=0.2, seed=0)  # every split empty
    assert empty.source == no_split.source
    train_only = splits.split_rows(["train"] * 18 + [None] * 2, labels, fraction=0.25, seed=0)
    assert train_only.source.startswith("split column; no val rows: random stratified 25%")
    assert set(train_only.val) <= set(range(18)) and set(train_only.train) <= set(range(18))
    assert not set(train_only.val) & set(train_only.train)
    assert train_only.left_out == {splits.NO_SPLIT: 2}
    named = splits.split_rows(["Training", "VALIDATION", "dev", "testing"] * 5, labels)
    assert (len(named.train), len(named.val), len(named.test)) == (5, 10, 5)
    with pytest.raises(ValueError, match="t1 has a split column but no train rows"):
        splits.split_rows(["val"] * 20, labels, where="t1")
    given = splits.training_rows(["train", "val", "test", None] * 5, source="--val-features")
    assert len(given.train) == 5 and len(given.test) == 5 and len(given.val) == 0
    assert given.left_out[splits.NO_SPLIT] == 5


def test_train_head_without_split_information_says_it_split_at_random(tmp_path):
    x, labels = clusters({"a": 10, "b": 10})
    write_table(tmp_path / "t", x, labels, [None] * 20)
    report = train_head.run(
        ["--features", str(tmp_path / "t"), "--model-dir", str(tmp_path / "h"), "--epochs", "1"]
    )
    assert report["validation"]["source"] == "random stratified 20%"
    assert sum(report["counts"]["validation"].values()) == 4


def test_neighbors_scores_val_rows_against_train_rows_only(tmp_path):
    """The val rows sit in a cluster of their own, with a label no train row has: against the
    train rows they are all wrong; leave-one-out (today) would find each other and be right."""
    x, labels = clusters({"a": 20, "b": 20, "c": 8, "d": 4})
    names = ["train"] * 40 + ["val"] * 8 + ["test"] * 4
    write_table(tmp_path / "t", x, labels, names)
    summary = neighbors_job.run(
        ["--features", str(tmp_path / "t"), "--output", str(tmp_path / "nn"), "--k", "3"]
    )
    assert summary["knn_accuracy"] == {1: 0.0, 5: 0.0, 20: 0.0}
    assert summary["knn_on"].startswith("8 val rows against 40 train rows (split column")
    assert summary["knn_test_accuracy"][1] == 0.0
    assert summary["knn_validation"]["test_rows"] == 4
    write_table(tmp_path / "u", x, labels, [None] * 52)  # no split information: leave-one-out
    summary = neighbors_job.run(
        ["--features", str(tmp_path / "u"), "--output", str(tmp_path / "nn2"), "--k", "3"]
    )
    assert summary["knn_on"].startswith("leave-one-out") and summary["knn_accuracy"][1] == 1.0


def test_finetune_takes_its_split_from_the_images(image_tree):
    """``finetune`` follows the same rule: the val/ images validate, train/ ones train."""
    from pipeline.finetune import _labelled

    uris, targets, image_splits = _labelled([str(image_tree)], ["cats", "dogs"])
    chosen = splits.split_rows(image_splits, targets)
    assert chosen.source == "split column"
    assert all("/val/" in uris[i] for i in chosen.val) and len(chosen.val) == 6
    assert all("/train/" in uris[i] for i in chosen.train) and len(chosen.train) == 6


# --- 8. report --head checks the head's recipe ---------------------------------------------------


def fake_head(folder: pathlib.Path, metadata: dict) -> pathlib.Path:
    folder.mkdir()
    report = {
        "head": "logistic",
        "classes": ["a", "b"],
        "accuracy": 0.9,
        "confusion_matrix": [[1, 0], [0, 1]],
        "validation": {"source": "split column"},
        "feature_table_metadata": metadata,
        "feature_table_fingerprint": table_fingerprint(metadata),
    }
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_report_warns_about_a_head_of_another_recipe(tmp_path, caplog, capsys):
    x, labels = clusters({"a": 6, "b": 6})
    write_table(tmp_path / "t", x, labels, ["train"] * 12)
    other = fake_head(tmp_path / "other", {**RECIPE, "pooling": "max"})
    same = fake_head(tmp_path / "same", RECIPE)
    base = ["--features", str(tmp_path / "t")]
    result = report_job.run([*base, "--output", str(tmp_path / "o.html"), "--head", str(other)])
    assert "another recipe (pooling is 'max' there but 'avg' here)" in result["head_warning"]
    assert "another recipe" in caplog.text
    page = (tmp_path / "o.html").read_text()
    assert "Warning: the head" in page and "split column" in page
    result = report_job.run([*base, "--output", str(tmp_path / "s.html"), "--head", str(same)])
    assert result["head_warning"] is None
    assert "Warning: the head" not in (tmp_path / "s.html").read_text()
    report_job.main(
        [*base, "--output", str(tmp_path / "o.html"), "--head", str(other), "--overwrite"]
    )
    assert "warning: the head" in capsys.readouterr().out


# --- 9. one rule for every job's output ----------------------------------------------------------


def test_neighbors_output_rule(split_table, tmp_path, capsys, monkeypatch):
    folder, _, _ = split_table
    out = tmp_path / "nn"
    base = ["--features", str(folder), "--output", str(out), "--k", "3"]
    neighbors_job.run([*base, "--duplicates", "0.5"])
    assert (out / "duplicates.parquet").exists()
    assert_refused(neighbors_job.main, base, capsys, out)
    # --query into a used folder was the mixing case: refused too
    assert_refused(neighbors_job.main, [*base, "--query", str(folder)], capsys, out)

    before = snapshot(out)

    def broken(*args, **kwargs):
        raise RuntimeError("disk gone")

    with monkeypatch.context() as patched:  # fails after neighbors.parquet is written
        patched.setattr(neighbors_job, "_write_duplicates", broken)
        with pytest.raises(RuntimeError, match="disk gone"):
            neighbors_job.run([*base, "--duplicates", "0.5", "--overwrite"])
    assert snapshot(out) == before and no_staging_left(tmp_path)

    summary = neighbors_job.run([*base, "--query", str(folder), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["_SUMMARY.json", "query_neighbors.parquet"]
    assert json.loads((out / "_SUMMARY.json").read_text())["query_rows"] == summary["query_rows"]
    assert no_staging_left(tmp_path)


def test_train_head_output_rule(split_table, tmp_path, capsys, monkeypatch):
    folder, _, _ = split_table
    out = tmp_path / "head"
    argv = ["--features", str(folder), "--model-dir", str(out), "--epochs", "1"]
    train_head.run(argv)
    (out / "stale.txt").write_text("from an older run")
    assert_refused(train_head.main, argv, capsys, out)
    before = snapshot(out)

    def broken(*args, **kwargs):
        raise RuntimeError("upload failed")

    with monkeypatch.context() as patched:  # fails after head.keras and report.json are written
        patched.setattr(model_io, "write_validation_predictions", broken)
        with pytest.raises(RuntimeError, match="upload failed"):
            train_head.run([*argv, "--overwrite", "--seed", "1"])
    assert snapshot(out) == before and no_staging_left(tmp_path)
    report = train_head.run([*argv, "--overwrite", "--seed", "1"])
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "report.json").read_text())["seed"] == report["seed"] == 1


def test_report_output_rule(split_table, tmp_path, capsys, monkeypatch):
    folder, _, _ = split_table
    out = tmp_path / "r.html"
    argv = ["--features", str(folder), "--output", str(out)]
    report_job.run(argv)
    assert_refused(report_job.main, argv, capsys, out)
    before = out.read_bytes()
    real = storage.write_atomically

    def half_then_fail(uri, write):
        def partial(f):
            f.write(b"<!DOCTYPE html><html>half a page")
            raise OSError("no space left on device")

        real(uri, partial)

    with monkeypatch.context() as patched:
        patched.setattr(report_job.storage, "write_atomically", half_then_fail)
        with pytest.raises(OSError, match="no space"):
            report_job.run([*argv, "--overwrite", "--seed", "3"])
    assert out.read_bytes() == before and [p.name for p in tmp_path.glob("*r.html*")] == ["r.html"]
    report_job.run([*argv, "--overwrite", "--seed", "3"])
    assert out.read_bytes() != before


def test_staged_output_on_gcs(gcs_emulator):  # noqa: F811
    """The same rule through fsspec on gs://: the old objects stay until the new ones are
    complete, and only the new ones remain after."""
    out = f"{gcs_emulator}/results/nn"
    fs, _ = storage.filesystem(out)
    with storage.staged_output(out, overwrite=False, flag="--output") as staging:
        table.write_summary(staging, {"run": 1})
        storage.write_atomically(storage.join(staging, "old.parquet"), lambda f: f.write(b"1"))
    refused = pytest.raises(FileExistsError, match="pass --overwrite .* or choose another folder")
    with refused, storage.staged_output(out, overwrite=False, flag="--output"):
        pass
    with (
        pytest.raises(RuntimeError),
        storage.staged_output(out, overwrite=True, flag="--output") as staging,
    ):
        table.write_summary(staging, {"run": 2})
        raise RuntimeError("killed")
    assert table.read_summary(out) == {"run": 1}
    assert storage.read_bytes(storage.join(out, "old.parquet")) == b"1"
    with storage.staged_output(out, overwrite=True, flag="--output") as staging:
        table.write_summary(staging, {"run": 3})
        assert table.read_summary(out) == {"run": 1}  # not replaced before the end
    assert table.read_summary(out) == {"run": 3}
    assert not storage.exists(storage.join(out, "old.parquet"))
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{gcs_emulator}/results")] == ["nn"]


@pytest.mark.slow
def test_export_model_and_finetune_output_rule(image_tree, tmp_path, capsys, monkeypatch):
    from pipeline import export_model, finetune
    from pipeline.extract import run as extract

    recipe = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--image-size", "32"]
    extract(["--input", str(image_tree), "--output", str(tmp_path / "t"), *recipe])
    train_head.run(
        ["--features", str(tmp_path / "t"), "--model-dir", str(tmp_path / "h"), "--epochs", "1"]
    )
    model = tmp_path / "model"
    export = ["--head", str(tmp_path / "h"), "--model-dir", str(model), "--check-images", "2"]
    export_model.run(export)
    assert_refused(export_model.main, export, capsys, model)
    before = snapshot(model)

    def broken(*args, **kwargs):
        raise RuntimeError("exported model disagrees")

    with monkeypatch.context() as patched:  # fails after model.keras is saved
        patched.setattr(export_model, "_check", broken)
        with pytest.raises(RuntimeError):
            export_model.run([*export, "--overwrite"])
    assert snapshot(model) == before and no_staging_left(tmp_path)
    export_model.run([*export, "--overwrite"])
    assert sorted(p.name for p in model.iterdir()) == ["classes.json", "model.keras", "recipe.json"]

    tuned = tmp_path / "ft"
    tune = ["--images", str(image_tree), "--from", str(model), "--model-dir", str(tuned)]
    tune += ["--unfreeze-top", "2", "--steps", "1", "--batch-size", "4"]
    report = finetune.run(tune)
    assert report["validation"]["source"] == "split column" and report["val_images"] == 6
    assert_refused(finetune.main, tune, capsys, tuned)
    before = snapshot(tuned)
    with monkeypatch.context() as patched:  # fails after model.keras is saved
        patched.setattr(model_io, "write_json", broken)
        with pytest.raises(RuntimeError):
            finetune.run([*tune, "--overwrite"])
    assert snapshot(tuned) == before and no_staging_left(tmp_path)


# --- 13. messages that fit -----------------------------------------------------------------------


def empty_table(folder: pathlib.Path) -> pathlib.Path:
    schema = table.feature_schema(4, RECIPE)
    table.write_parquet(
        str(folder / table.shard_name("features", 0, 1)), table.to_arrow([], schema)
    )
    return folder


def test_empty_tables_are_named(tmp_path, capsys):
    empty = empty_table(tmp_path / "empty")
    for main, argv in (
        (neighbors_job.main, ["--features", str(empty), "--output", str(tmp_path / "nn")]),
        (train_head.main, ["--features", str(empty), "--model-dir", str(tmp_path / "h")]),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"{empty}: the feature table has no rows" in err, err
        words = err.replace(str(tmp_path), "TMP").split()  # pytest's tmp path may hold "-1"
        assert "-1" not in words and "Traceback" not in err


def test_classify_existing_output_suggests_only_its_own_flags(tmp_path, capsys):
    from pipeline import classify

    out = empty_table(tmp_path / "pred")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(encode(gradient(seed=1)))
    argv = ["--input", str(tmp_path / "img"), "--output", str(out)]
    argv += ["--backbone", "mobilenet_v3_small", "--weights", "none"]
    with pytest.raises(SystemExit) as exit_:
        classify.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "another --output" in err
    options = {o for a in classify.build_parser()._actions for o in a.option_strings}
    assert set(re.findall(r"--[a-z][a-z-]+", err)) <= options, err  # no --mode incremental


# --- 15. classify shows what it found ------------------------------------------------------------


@pytest.mark.slow
def test_classify_previews_predictions_and_names_its_shards(image_tree, tmp_path, capsys):
    from pipeline import classify

    out = tmp_path / "pred"
    argv = ["--input", str(image_tree), "--output", str(out), "--top-k", "2"]
    argv += ["--backbone", "mobilenet_v3_small", "--weights", "none"]
    classify.main(argv)
    printed = capsys.readouterr().out
    names = sorted(p.name for p in out.glob("*.parquet"))
    assert names and all(n.startswith("predictions-") for n in names), names
    predictions = table.read_table(str(out)).sort_by("uri")  # readers keep working
    assert predictions.num_rows == 12
    import pandas as pd

    assert len(pd.read_parquet(out)) == 12
    first = predictions.slice(0, 8).to_pylist()
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("first 8 of 12 predictions"))
    for line, row in zip(lines[start + 1 : start + 9], first, strict=True):
        assert line.split() == [
            row["uri"].rsplit("/", 1)[-1],
            row["prediction"],
            f"{row['probability']:.3f}",
        ]
    counts = {}
    for label in predictions.column("prediction").to_pylist():
        counts[label] = counts.get(label, 0) + 1
    assert lines[start + 9].startswith("predicted labels: ")
    assert all(f"{label} {n}" in lines[start + 9] for label, n in counts.items())
    assert f"{out}/predictions-*.parquet" in printed
    assert_refused(classify.main, argv, capsys, out)
