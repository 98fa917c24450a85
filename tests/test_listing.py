"""ListImages and its pure helpers: folders, globs, manifests, labels, splits, duplicates."""

from __future__ import annotations

import os

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to
from conftest import local_pipeline

from transforms.listing import (
    ImageRef,
    ListImages,
    check_sources,
    image_id,
    label_and_split,
    list_source,
    list_sources,
)


@pytest.mark.parametrize(
    "root, uri, expected",
    [
        ("/d/hym", "/d/hym/train/ants/x.jpg", ("ants", "train")),
        ("/d/hym/train", "/d/hym/train/ants/x.jpg", ("ants", "train")),
        ("/d/hym/", "/d/hym/x.jpg", (None, None)),
        ("/d/photos", "/d/photos/2021/cats/x.jpg", ("cats", None)),
        ("gs://b/p", "gs://b/p/val/bees/y.png", ("bees", "val")),
        ("/d/a", "/d/b/x.jpg", (None, None)),
    ],
)
def test_label_and_split(root, uri, expected):
    assert label_and_split(root, uri) == expected


def test_image_id_is_stable_and_distinct():
    assert image_id("/a/x.jpg") == image_id("/a/x.jpg")
    assert image_id("/a/x.jpg") != image_id("/a/y.jpg")
    assert len(image_id("gs://b/x")) == 32


def test_folder_listing_labels_and_skips_non_images(image_tree):
    (image_tree / "README.txt").write_text("not an image")
    refs, skipped = list_source(str(image_tree))
    assert skipped == 1
    assert len(refs) == 12
    by_name = {os.path.relpath(r.uri, image_tree): r for r in refs}
    ref = by_name[os.path.join("train", "cats", "0.png")]
    assert (ref.label, ref.split) == ("cats", "train")
    assert ref.size > 0 and ref.version
    assert ref.image_id == image_id(ref.uri)


def test_relative_paths_become_absolute_uris(image_tree, monkeypatch):
    monkeypatch.chdir(image_tree.parent)
    refs, _ = list_source("images/val")
    assert all(os.path.isabs(r.uri) for r in refs)
    assert {r.split for r in refs} == {"val"}


def test_glob_takes_every_match(image_tree):
    refs, _ = list_source(str(image_tree / "*" / "dogs" / "*.png"))
    assert len(refs) == 4
    assert {(r.label, r.split) for r in refs} == {("dogs", "train"), ("dogs", "val")}


def test_csv_manifest_with_header_and_relative_paths(image_tree):
    manifest = image_tree / "list.csv"
    manifest.write_text("path,label\ntrain/cats/0.png,kitty\n\n/abs/missing.jpg,\n")
    refs = list_source(str(manifest))[0]
    assert [r.uri for r in refs] == [str(image_tree / "train/cats/0.png"), "/abs/missing.jpg"]
    assert [r.label for r in refs] == ["kitty", None]


def test_headerless_csv_and_text_manifests(image_tree):
    (image_tree / "a.csv").write_text("train/cats/0.png,cat,train\n")
    (image_tree / "b.txt").write_text("# comment\ntrain/cats/0.png\n\ngs://b/x.jpg\n")
    (ref,) = list_source(str(image_tree / "a.csv"))[0]
    assert (ref.label, ref.split) == ("cat", "train")
    assert [r.uri for r in list_source(str(image_tree / "b.txt"))[0]] == [
        str(image_tree / "train/cats/0.png"),
        "gs://b/x.jpg",
    ]


def test_manifest_row_without_uri_names_the_line(image_tree):
    (image_tree / "bad.csv").write_text("uri,label\nx.jpg,a\n,b\n")
    with pytest.raises(ValueError, match="bad.csv:3: manifest row has no URI"):
        list_source(str(image_tree / "bad.csv"))


def test_a_uri_reached_twice_is_listed_once(image_tree):
    refs = list(list_sources([str(image_tree / "train"), str(image_tree)]))
    assert len(refs) == 12
    assert len({r.uri for r in refs}) == 12


def test_missing_input_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        check_sources([str(tmp_path / "nope")])
    check_sources([str(tmp_path / "*.jpg")])  # an empty glob is allowed


def test_list_images_composite(image_tree):
    expected = sorted(r.uri for r in list_source(str(image_tree))[0])
    with local_pipeline() as p:
        uris = p | ListImages(str(image_tree)) | beam.Map(lambda r: r.uri)
        assert_that(uris, equal_to(expected), label="AllImagesOnce")


def test_imageref_is_a_plain_tuple():
    ref = ImageRef("u", "i", None, None, 0, "")
    assert ref._replace(label="x").label == "x"
