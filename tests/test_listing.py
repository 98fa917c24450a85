"""ListImages and its pure helpers: folders, globs, labels, splits, duplicates, sniffing (the
manifests' own rules are in test_manifest.py)."""

from __future__ import annotations

import os

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to
from conftest import local_pipeline, refs_of

from pipeline import extract
from transforms.image_rows import image_id, refs_from_table
from transforms.listing import (
    ListImages,
    check_sources,
    label_and_split,
    list_inputs,
    list_source,
    list_sources,
    looks_like_image,
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


def test_folder_listing_labels_and_skips_non_images(image_tree):
    (image_tree / "README.txt").write_text("not an image")
    table, skipped = list_source(str(image_tree))
    assert skipped == {str(image_tree / "README.txt"): "not an image"}
    refs = refs_from_table(table)
    assert len(refs) == 12
    by_name = {os.path.relpath(r.uri, image_tree): r for r in refs}
    ref = by_name[os.path.join("train", "cats", "0.png")]
    assert (ref.label, ref.split) == ("cats", "train")
    assert ref.size > 0 and ref.version
    assert ref.image_id == image_id(ref.uri)


def test_relative_paths_become_absolute_uris(image_tree, monkeypatch):
    monkeypatch.chdir(image_tree.parent)
    refs = refs_of("images/val")
    assert all(os.path.isabs(r.uri) for r in refs)
    assert {r.split for r in refs} == {"val"}


def test_glob_takes_every_match(image_tree):
    refs = refs_of(str(image_tree / "*" / "dogs" / "*.png"))
    assert len(refs) == 4
    assert {(r.label, r.split) for r in refs} == {("dogs", "train"), ("dogs", "val")}


def test_a_uri_reached_twice_is_listed_once(image_tree):
    refs = list(list_sources([str(image_tree / "train"), str(image_tree)]))
    assert len(refs) == 12
    assert len({r.uri for r in refs}) == 12


def test_missing_input_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        check_sources([str(tmp_path / "nope")])
    check_sources([str(tmp_path / "*.jpg")])  # an empty glob is allowed


def test_list_images_composite(image_tree):
    expected = sorted(r.uri for r in refs_of(str(image_tree)))
    with local_pipeline() as p:
        uris = p | ListImages(str(image_tree)) | beam.Map(lambda r: r.uri)
        assert_that(uris, equal_to(expected), label="AllImagesOnce")


def test_extensionless_images_are_sniffed_and_other_files_counted(tmp_path):
    from conftest import encode, gradient

    root = tmp_path / "bucket"
    root.mkdir()
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        (root / f"{fmt.lower()}0a1b2c").write_bytes(encode(gradient(seed=3), fmt))
    (root / "named.jpg").write_bytes(encode(gradient(seed=4), "JPEG"))
    (root / "notes.txt").write_text("hello")
    (root / "meta.json").write_text("{}")
    (root / "deadbeef").write_bytes(b"\x00\x01 binary, not an image")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    found = list_inputs([str(root)])
    names = sorted(u.rsplit("/", 1)[-1] for u in found.images["uri"].to_pylist())
    assert names == [
        "bmp0a1b2c", "gif0a1b2c", "jpeg0a1b2c", "named.jpg", "png0a1b2c", "tiff0a1b2c",
        "webp0a1b2c",
    ]  # fmt: skip
    assert found.skipped == 4
    assert {e.rsplit("/", 1)[-1] for e in found.skipped_examples} == {
        "notes.txt", "meta.json", "deadbeef", ".DS_Store",
    }  # fmt: skip
    everything = list_inputs([str(root)], include_all_files=True)
    assert everything.images.num_rows == 11 and everything.skipped == 0


def test_looks_like_image_uses_pillows_own_checks():
    from conftest import encode, gradient

    assert looks_like_image(encode(gradient(), "PNG")[:64])
    assert not looks_like_image(b"plain text")
    assert not looks_like_image(b"\x89HDF\r\n\x1a\n")  # Pillow identifies HDF5 but cannot decode it


def test_files_shorter_than_a_header_are_not_images(tmp_path):
    # Pillow's DIB check unpacks 4 bytes: an empty or 2-byte file without an extension crashed the
    # listing with struct.error instead of being counted as not an image.
    from conftest import encode, gradient

    for prefix in (b"", b"B", b"ab", b"\x00\x00\x00"):
        assert not looks_like_image(prefix)
    root = tmp_path / "folder"
    root.mkdir()
    (root / "a.png").write_bytes(encode(gradient()))
    (root / "EMPTY").write_bytes(b"")
    (root / "TWO").write_bytes(b"ab")
    found = list_inputs([str(root)])
    assert [u.rsplit("/", 1)[-1] for u in found.images["uri"].to_pylist()] == ["a.png"]
    assert found.skipped == 2


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
