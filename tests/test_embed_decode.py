"""transforms/embed/decode.py: an image read once and decoded per target, or its error row."""

from __future__ import annotations

from conftest import encode, gradient

from transforms import table
from transforms.embed.decode import Decoded, read_and_decode
from transforms.image_rows import ImageRef, image_id
from transforms.images import Target


def _ref(path) -> ImageRef:
    return ImageRef(str(path), image_id(str(path)), "cats", "train", 7, "v1")


def test_one_read_gives_pixels_for_every_target(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(encode(gradient(40, 30)))
    ref = _ref(path)
    decoded = read_and_decode(ref, [Target((8, 8)), Target((16, 12), "crop")], 1_000_000)
    assert [key for key, _ in decoded] == [Decoded(ref, 40, 30)] * 2
    assert [pixels.shape for _, pixels in decoded] == [(8, 8, 3), (16, 12, 3)]


def test_a_missing_file_is_a_read_error_row(tmp_path):
    ref = _ref(tmp_path / "gone.png")
    row = read_and_decode(ref, [Target((8, 8))], 1_000_000)
    assert list(row) == table.ERROR_SCHEMA.names
    assert (row["stage"], row["file_size"], row["file_version"]) == ("read", 7, "v1")
    assert row["reason"].startswith("FileNotFoundError: ")


def test_undecodable_and_too_large_images_are_error_rows(tmp_path):
    (tmp_path / "notes.jpg").write_bytes(b"plain text")
    (tmp_path / "big.png").write_bytes(encode(gradient(40, 30)))
    assert read_and_decode(_ref(tmp_path / "notes.jpg"), [Target((8, 8))], 1_000_000)["stage"] == (
        "decode"
    )
    assert read_and_decode(_ref(tmp_path / "big.png"), [Target((8, 8))], 40 * 30 - 1)["stage"] == (
        "limits"
    )
    assert isinstance(read_and_decode(_ref(tmp_path / "big.png"), [Target((8, 8))], 40 * 30), list)
