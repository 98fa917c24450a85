"""transforms/image_rows.py: image ids, their 16-byte keys, the listing row."""

from __future__ import annotations

import pyarrow as pa
import pytest

from transforms.image_rows import (
    ImageRef,
    hex_ids,
    image_id,
    image_ids,
    image_keys,
    key_view,
    refs_from_table,
)


def test_image_id_is_stable_and_distinct():
    assert image_id("/a/x.jpg") == image_id("/a/x.jpg")
    assert image_id("/a/x.jpg") != image_id("/a/y.jpg")
    assert len(image_id("gs://b/x")) == 32


def test_imageref_is_a_plain_tuple():
    ref = ImageRef("u", "i", None, None, 0, "")
    assert ref._replace(label="x").label == "x"


def test_vectorised_ids_equal_image_id():
    uris = pa.chunked_array([["/a/x.jpg", "gs://b/y.png"], ["/a/é.jpg"]])
    assert image_ids(uris).to_pylist() == [image_id(u) for u in uris.to_pylist()]
    assert image_ids(pa.array([], pa.string())).to_pylist() == []


def test_keys_and_hex_ids_round_trip_and_sort_like_the_ids():
    ids = [image_id(f"/a/{i}.jpg") for i in range(5)]
    keys = image_keys(pa.array(ids))
    assert keys.type == pa.binary(16) and keys[0].as_py() == bytes.fromhex(ids[0])
    assert hex_ids(keys).to_pylist() == ids
    assert sorted(key_view(keys).tolist()) == [bytes.fromhex(i) for i in sorted(ids)]
    assert image_keys(pa.array([ids[0].upper()])).to_pylist() == [bytes.fromhex(ids[0])]


@pytest.mark.parametrize("bad", ["0" * 31, "0" * 33, "g" * 32, None])
def test_an_id_that_is_not_32_hex_digits_is_refused(bad):
    with pytest.raises(ValueError, match="image ids must be 32 hex digits"):
        image_keys(pa.array(["0" * 32, bad], pa.string()))


def test_listing_rows_become_refs_with_unknown_signals_as_zero_and_empty():
    rows = pa.Table.from_pylist(
        [
            {"image_id": "i", "uri": "u", "label": None, "split": "val"}
            | {"file_size": None, "file_version": None},
            {"image_id": "j", "uri": "v", "label": "a", "split": None}
            | {"file_size": 5, "file_version": "g1"},
        ]
    )
    assert refs_from_table(rows) == [
        ImageRef("u", "i", None, "val", 0, ""),
        ImageRef("v", "j", "a", None, 5, "g1"),
    ]
