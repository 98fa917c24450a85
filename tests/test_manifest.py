"""transforms/manifest.py, read through the listing: headers, headerless and text manifests,
relative paths, the change-signal columns, bad rows named by line, and a header of names we do
not read refused with the ones we do."""

from __future__ import annotations

import pytest
from conftest import refs_of

from pipeline import extract
from transforms.listing import list_source


def test_csv_manifest_with_header_and_relative_paths(image_tree):
    manifest = image_tree / "list.csv"
    manifest.write_text("path,label\ntrain/cats/0.png,kitty\n\n/abs/missing.jpg,\n")
    refs = refs_of(str(manifest))
    assert [r.uri for r in refs] == [str(image_tree / "train/cats/0.png"), "/abs/missing.jpg"]
    assert [r.label for r in refs] == ["kitty", None]


def test_headerless_csv_and_text_manifests(image_tree):
    (image_tree / "a.csv").write_text("train/cats/0.png,cat,train\n")
    (image_tree / "b.txt").write_text("# comment\ntrain/cats/0.png\n\ngs://b/x.jpg\n")
    (ref,) = refs_of(str(image_tree / "a.csv"))
    assert (ref.label, ref.split) == ("cat", "train")
    assert [r.uri for r in refs_of(str(image_tree / "b.txt"))] == [
        str(image_tree / "train/cats/0.png"),
        "gs://b/x.jpg",
    ]


def test_manifest_row_without_uri_names_the_line(image_tree):
    (image_tree / "bad.csv").write_text("uri,label\nx.jpg,a\n,b\n")
    with pytest.raises(ValueError, match="bad.csv:3: manifest row has no URI"):
        list_source(str(image_tree / "bad.csv"))


def test_manifest_change_signal_columns_and_stat(image_tree):
    target = image_tree / "train" / "cats" / "0.png"
    (image_tree / "signal.csv").write_text(
        "uri,label,file_size,file_version\ntrain/cats/0.png,cat,123,etag-1\n"
    )
    (ref,) = refs_of(str(image_tree / "signal.csv"))
    assert (ref.size, ref.version) == (123, "etag-1")
    (image_tree / "plain.csv").write_text("uri\ntrain/cats/0.png\nmissing.png\n")
    plain, missing = refs_of(str(image_tree / "plain.csv"))
    assert (plain.size, plain.version) == (0, "")
    stated, gone = refs_of(str(image_tree / "plain.csv"), stat_manifest=True)
    assert stated.size == target.stat().st_size and stated.version
    assert (gone.size, gone.version) == (0, "")  # its read fails later, as an error row


def test_a_bad_file_size_column_is_a_clear_error(image_tree):
    (image_tree / "bad.csv").write_text("uri,file_size\nx.jpg,big\n")
    with pytest.raises(ValueError, match="file_size must be a whole number"):
        list_source(str(image_tree / "bad.csv"))


def test_a_quoted_header_is_recognised(image_tree):
    (image_tree / "quoted.csv").write_text('"uri","label"\n"train/cats/0.png","cat"\n')
    (ref,) = refs_of(str(image_tree / "quoted.csv"))
    assert (ref.uri, ref.label) == (str(image_tree / "train/cats/0.png"), "cat")


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
