"""transforms/image_rows.py: image ids, their 16-byte keys, the listing row."""

from __future__ import annotations

from transforms.image_rows import ImageRef, image_id


def test_image_id_is_stable_and_distinct():
    assert image_id("/a/x.jpg") == image_id("/a/x.jpg")
    assert image_id("/a/x.jpg") != image_id("/a/y.jpg")
    assert len(image_id("gs://b/x")) == 32


def test_imageref_is_a_plain_tuple():
    ref = ImageRef("u", "i", None, None, 0, "")
    assert ref._replace(label="x").label == "x"
