"""Manifests a user writes by hand: an unknown header is an error naming the columns we read, and a
URI listed twice with different labels is counted and reported (``transforms.manifest``,
``transforms.listing``)."""

from __future__ import annotations

import pytest

from pipeline import extract
from transforms.listing import list_inputs, list_source


def test_an_unknown_header_names_the_columns_we_read(image_tree):
    manifest = image_tree / "list.csv"
    manifest.write_text("img_path,class\ntrain/cats/0.png,cat\n")
    with pytest.raises(ValueError) as error:
        list_source(str(manifest))
    message = str(error.value)
    assert "'img_path,class' looks like a header" in message
    assert "uri or path or image or file or filename or url" in message
    assert "label, split, file_size, file_version" in message


def test_an_unknown_header_stops_the_job_in_one_line(image_tree, tmp_path, capsys):
    manifest = image_tree / "list.csv"
    manifest.write_text("img_path,class\ntrain/cats/0.png,cat\n")
    out = tmp_path / "out"
    argv = ["--input", str(manifest), "--output", str(out), "--backbone", "mobilenet_v3_small"]
    with pytest.raises(SystemExit) as exit_info:
        extract.main([*argv, "--weights", "none", "--image-size", "32"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "img_path,class" in lines[0]
    assert not out.exists() or list(out.iterdir()) == []  # no lease, no plan file left


def test_a_headerless_first_line_naming_a_file_is_data(image_tree):
    """Object stores key images by hash, without an extension: such a first field is a file,
    not a column name."""
    key = image_tree / "3f2a9c81"
    key.write_bytes((image_tree / "train/cats/0.png").read_bytes())
    manifest = image_tree / "hashes.csv"
    manifest.write_text("3f2a9c81,cat\n")
    rows = list_source(str(manifest))[0]
    assert rows["uri"].to_pylist() == [str(key)]
    assert rows["label"].to_pylist() == ["cat"]


def test_known_header_with_extra_columns_is_read_and_the_extra_ones_named(image_tree, caplog):
    manifest = image_tree / "list.csv"
    manifest.write_text("uri,label,weight\ntrain/cats/0.png,cat,0.5\n")
    with caplog.at_level("WARNING"):
        rows = list_source(str(manifest))[0]
    assert rows["label"].to_pylist() == ["cat"]
    assert "columns not read: weight" in caplog.text


def test_conflicting_labels_for_one_uri_are_counted_and_reported(image_tree, tmp_path):
    one = image_tree / "one.csv"
    two = image_tree / "two.csv"
    one.write_text("uri,label\ntrain/cats/0.png,cat\ntrain/cats/1.png,cat\ntrain/dogs/0.png,dog\n")
    two.write_text("uri,label\ntrain/cats/0.png,dog\ntrain/cats/1.png,cat\n")
    listing = list_inputs([str(one), str(two)])
    assert listing.images.num_rows == 3
    assert listing.duplicates == 2
    assert listing.label_conflicts == 1
    assert listing.label_conflict_examples == (str(image_tree / "train/cats/0.png"),)
    first = listing.images.to_pylist()[0]
    assert (first["uri"], first["label"]) == (str(image_tree / "train/cats/0.png"), "cat")

    out = tmp_path / "out"
    summary = extract.run(
        ["--input", str(one), "--input", str(two), "--output", str(out)]
        + ["--backbone", "mobilenet_v3_small", "--weights", "none", "--image-size", "32"]
    )
    assert summary["label_conflicts"] == 1
    assert summary["label_conflict_examples"] == [str(image_tree / "train/cats/0.png")]
    assert "1 URIs listed with conflicting labels" in extract.format_summary(summary)


def test_the_same_label_twice_is_no_conflict(image_tree):
    one = image_tree / "one.csv"
    one.write_text("uri,label\ntrain/cats/0.png,cats\ntrain/cats/0.png,cats\n")
    listing = list_inputs([str(one), str(image_tree / "train")])
    assert listing.label_conflicts == 0
