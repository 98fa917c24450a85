"""The index folder's files: where an index lives, what ``index.json`` holds, and how a new
generation of files replaces the old one. The search (``transforms.index``) and the updates
(``transforms.index_update``) both stand on this. numpy, pyarrow and faiss only.

    index.json              what the index holds: the table's recipe metadata and fingerprint, each
                            shard it read (name, size, version), the kind, when and why it was
                            built and trained, and the last builds and updates
    rows-GEN.parquet        image_id, uri, label, split of each row (and its key, shard and change
                            signal), position-aligned with ...
    vectors-GEN.npy         ... the rows' unit vectors, one contiguous float32 array (memory-mapped)
    faiss-GEN.index         kind "faiss": the inverted file over the rows (ids: the rows' ``key``)

A new generation (``GEN``) is written beside the old one, then ``index.json`` is replaced (one
rename), then the old generation's files go (:func:`commit`). A crash midway leaves the old
``index.json`` and its files, so the previous index still opens; the next commit removes what the
crash left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa

from transforms import neighbors, storage
from transforms import table as tables

DEFAULT_DIRNAME = "_index"
MANIFEST = "index.json"
FORMAT = 1
#: The columns of ``SearchIndex.rows``.
ROW_COLUMNS = neighbors.ID_COLUMNS
#: The rows file: :data:`ROW_COLUMNS`, then each row's stable key (its faiss id; keys grow with
#: the positions), the shard it came from and its change signal (what an update compares).
ROWS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("split", pa.string()),
        pa.field("key", pa.int64(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        *tables.SOURCE_FIELDS,
    ]
)


def default_dir(features_dir: str) -> str:
    """Where a table's index lives unless told otherwise: ``OUT/_index``."""
    return storage.join(features_dir.rstrip("/"), DEFAULT_DIRNAME)


class IndexBusy(ValueError):
    """Another process is updating the same index."""


def read_manifest(index_dir: str) -> dict[str, Any] | None:
    """An index's ``index.json``, or None when there is none.

    Raises:
        ValueError: it is not an index this version reads.
    """
    path = os.path.join(index_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); rebuild with `featurebeam index --rebuild`"
        ) from exc
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path} is an index of format {manifest.get('format')!r}, not {FORMAT}; "
            "rebuild with `featurebeam index --rebuild`"
        )
    return manifest


@contextlib.contextmanager
def locked(index_dir: str):
    """One updater per index folder (an ``flock`` on ``index_dir/.lock``)."""
    path = os.path.join(index_dir, ".lock")
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusy(
                f"{index_dir} is being updated by another process; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def generation_tag(manifest) -> str:
    """``GEN`` in the generation's file names."""
    return manifest["files"]["vectors"].removeprefix("vectors-").removesuffix(".npy")


def vectors_of(index_dir, manifest) -> np.ndarray:
    """A generation's vectors, memory-mapped read-only."""
    return np.load(os.path.join(index_dir, manifest["files"]["vectors"]), mmap_mode="r")


def write_faiss(index_dir, manifest, index) -> None:
    """Writes a generation's faiss index under a temporary name, then renames it."""
    import faiss

    path = os.path.join(index_dir, manifest["files"]["faiss"])
    tmp = os.path.join(index_dir, f".{manifest['files']['faiss']}.{uuid.uuid4().hex}.tmp")
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_rows(index_dir: str, manifest: dict[str, Any], rows: pa.Table) -> None:
    tables.write_parquet(os.path.join(index_dir, manifest["files"]["rows"]), rows)


def commit(index_dir: str, manifest: dict[str, Any]) -> None:
    """Makes ``manifest``'s generation the index (one rename), then removes the others' files."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    storage.write_atomically(os.path.join(index_dir, MANIFEST), lambda f: f.write(data))
    keep = set(manifest["files"].values())
    for name in os.listdir(index_dir):
        left = name.startswith(".") and name.endswith(".tmp")  # by a writer that was killed
        if (is_generation_file(name) and name not in keep) or left:
            os.remove(os.path.join(index_dir, name))


def discard_generation(index_dir: str, manifest: dict[str, Any]) -> None:
    """The files of a generation that was not committed (the table changed meanwhile)."""
    current = read_manifest(index_dir)
    keep = set(current["files"].values()) if current else set()
    for name in manifest["files"].values():
        path = os.path.join(index_dir, name)
        if name not in keep and os.path.exists(path):
            os.remove(path)


def is_generation_file(name: str) -> bool:
    return name.startswith(("rows-", "vectors-", "faiss-")) and not name.startswith(".")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
