"""What a listed image is, as data: its id (a hash of its URI alone), the 16-byte key the id
stands for, and the listing's row (:data:`LISTING_SCHEMA`, or an :class:`ImageRef` tuple).

Ids are handled as Arrow arrays and numpy views, never a Python object per image: planning a run
over millions of images sorts and compares these keys (``transforms.table_diff``). pyarrow and
numpy only.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import pyarrow as pa

_ID_BATCH = 1 << 18

#: One row per listed image. ``file_size``/``file_version`` are the change signal (0/"" unknown).
LISTING_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("split", pa.string()),
        pa.field("file_size", pa.int64(), nullable=False),
        pa.field("file_version", pa.string(), nullable=False),
    ]
)


class ImageRef(NamedTuple):
    """One image to embed. ``size``/``version`` are a cheap change signal (0/"" when unknown)."""

    uri: str
    image_id: str
    label: str | None
    split: str | None
    size: int
    version: str


def refs_from_table(table: pa.Table) -> list[ImageRef]:
    """Listing (or plan) rows as :class:`ImageRef` tuples."""
    columns = [
        table.column(c).to_pylist()
        for c in ("uri", "image_id", "label", "split", "file_size", "file_version")
    ]
    return [
        ImageRef(u, i, lb, s, z or 0, v or "") for u, i, lb, s, z, v in zip(*columns, strict=True)
    ]


def _digest(uri: str) -> bytes:
    """The 16 bytes an image id is made of: a hash of the URI alone."""
    return hashlib.blake2b(uri.encode("utf-8"), digest_size=16).digest()


def image_id(uri: str) -> str:
    """A stable 32-hex-digit id derived from the URI alone."""
    return _digest(uri).hex()


def image_ids(uris: pa.Array | pa.ChunkedArray) -> pa.Array:
    """:func:`image_id` of every URI (the same hex strings), in batches so that millions never
    exist as Python strings all at once; the hex encoding is vectorised."""
    uris = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris
    parts = []
    for i in range(0, len(uris), _ID_BATCH):
        digests = b"".join(_digest(u) for u in uris.slice(i, _ID_BATCH).to_pylist())
        n = len(digests) // 16
        keys = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(digests)])
        parts.append(hex_ids(keys))
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
_HEX_VALUES = np.full(256, 255, np.uint8)
_HEX_VALUES[_HEX_DIGITS] = np.arange(16, dtype=np.uint8)
_HEX_VALUES[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def hex_ids(keys: pa.FixedSizeBinaryArray) -> pa.StringArray:
    """16-byte keys as 32-hex-digit image ids (vectorised)."""
    n = len(keys)
    raw = np.frombuffer(keys.buffers()[1], np.uint8, count=16 * n, offset=16 * keys.offset)
    raw = raw.reshape(n, 16)
    chars = np.empty((n, 32), np.uint8)
    chars[:, 0::2] = _HEX_DIGITS[raw >> 4]
    chars[:, 1::2] = _HEX_DIGITS[raw & 15]
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars))


def key_view(keys: pa.FixedSizeBinaryArray | pa.ChunkedArray) -> np.ndarray:
    """16-byte keys as a numpy ``S16`` array without copying: sorted and compared byte-wise."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    return np.frombuffer(keys.buffers()[1], "S16", count=len(keys), offset=16 * keys.offset)


def image_keys(ids: pa.Array | pa.ChunkedArray) -> pa.FixedSizeBinaryArray:
    """Image ids (32 hex digits) as 16-byte keys: half the memory, and faster to sort and compare.
    Decoded in blocks, so the temporaries stay small at 10M ids.

    Raises:
        ValueError: an id that is not 32 hex digits.
    """
    chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
    n = sum(len(c) for c in chunks)
    raw = np.empty((n, 16), np.uint8)
    done = 0
    for chunk in chunks:
        if chunk.type != pa.string():
            chunk = chunk.cast(pa.string())
        for start in range(0, len(chunk), _ID_BATCH):
            block = chunk.slice(start, _ID_BATCH)
            k = len(block)
            offsets = np.frombuffer(
                block.buffers()[1], np.int32, count=k + 1, offset=4 * block.offset
            )
            if block.null_count or offsets[-1] - offsets[0] != 32 * k:
                raise ValueError("image ids must be 32 hex digits")
            data = np.frombuffer(block.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
            nibbles = _HEX_VALUES[data.reshape(k, 32)]
            if (nibbles == 255).any():
                raise ValueError("image ids must be 32 hex digits")
            raw[done : done + k] = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
            done += k
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(raw)])
