"""transforms/manifest.py, read through the listing: headers, headerless and text manifests,
relative paths, the change-signal columns, and bad rows named by line."""

from __future__ import annotations

import pytest
from conftest import refs_of

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
