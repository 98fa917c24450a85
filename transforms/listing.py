"""ListImages: turns what the user points at into one :class:`ImageRef` per image.

An input is one of:

- a directory or ``gs://bucket/prefix``: every file below it, recursively, whose extension is an
  image extension (others are counted in the ``skipped_non_image_files`` metric and logged);
- a glob (``data/*/*.jpg``, ``gs://b/**/*.png``): every match, whatever its extension;
- a manifest (``.csv``, ``.tsv`` or ``.txt``): one URI per row, optionally with ``label`` and
  ``split`` columns; relative URIs are resolved against the manifest's folder;
- a single image file.

Labels come from class folders: below a directory or glob root, an image's parent folder is its
label and the nearest enclosing folder named like a split (``train``, ``val``, ``test``, ...) is its
split, so ``hymenoptera/train/ants/x.jpg`` listed from ``hymenoptera`` gets ``label=ants,
split=train``. Images directly in the root get no label.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import posixpath
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import apache_beam as beam

from transforms import storage

_LOG = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
MANIFEST_EXTENSIONS = frozenset({".csv", ".tsv", ".txt"})
SPLIT_NAMES = frozenset(
    {"train", "training", "val", "valid", "validation", "test", "testing", "dev"}
)
_URI_COLUMNS = ("uri", "path", "image", "file", "filename", "url")
_GLOB_CHARS = frozenset("*?[")


class ImageRef(NamedTuple):
    """One image to embed. ``size``/``version`` are a cheap change signal (0/"" when unknown)."""

    uri: str
    image_id: str
    label: str | None
    split: str | None
    size: int
    version: str


def image_id(uri: str) -> str:
    """A stable 32-hex-digit id derived from the URI alone."""
    return hashlib.blake2b(uri.encode("utf-8"), digest_size=16).hexdigest()


def _extension(uri: str) -> str:
    return posixpath.splitext(uri)[1].lower()


def _parts(uri: str) -> list[str]:
    return [p for p in uri.replace("\\", "/").split("/") if p]


def label_and_split(root: str, uri: str) -> tuple[str | None, str | None]:
    """Class-folder label and split of ``uri`` relative to ``root`` (see the module docstring)."""
    root_parts = _parts(root)
    parts = _parts(uri)
    if parts[: len(root_parts)] != root_parts:
        return None, None
    folders = parts[len(root_parts) : -1]
    label = folders[-1] if folders else None
    # The split may be the root folder itself (pointing at hymenoptera/val) or any folder below it.
    candidates = ([root_parts[-1]] if root_parts else []) + folders[:-1]
    split = next((f for f in reversed(candidates) if f.lower() in SPLIT_NAMES), None)
    return label, split


def _glob_root(pattern: str) -> str:
    """The longest leading folder of a glob without wildcards."""
    head, sep, rest = pattern.partition("://")
    path = rest if sep else head
    kept = []
    for part in path.split("/"):
        if _GLOB_CHARS & set(part):
            break
        kept.append(part)
    root = "/".join(kept)
    return f"{head}://{root}" if sep else root


def _ref(info: storage.FileInfo, root: str | None, label=None, split=None) -> ImageRef:
    if root is not None and label is None and split is None:
        label, split = label_and_split(root, info.uri)
    return ImageRef(info.uri, image_id(info.uri), label, split, info.size, info.version)


def read_manifest(uri: str) -> list[ImageRef]:
    """Parses a manifest file into refs (see the module docstring for the format).

    Raises:
        ValueError: a row without a URI, naming the line.
    """
    text = storage.read_bytes(uri).decode("utf-8-sig")
    base = posixpath.dirname(uri) if not storage.is_local(uri) else os.path.dirname(uri)
    ext = _extension(uri)
    if ext == ".txt":
        rows = [
            {"uri": line.strip()}
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        numbered = list(enumerate(rows, start=1))
    else:
        delimiter = "\t" if ext == ".tsv" else ","
        reader = list(csv.reader(io.StringIO(text), delimiter=delimiter))
        if not reader:
            return []
        header = [h.strip().lower() for h in reader[0]]
        uri_column = next((c for c in _URI_COLUMNS if c in header), None)
        if uri_column is None:  # no header: uri[, label[, split]]
            header, body, first = ["uri", "label", "split"], reader, 1
        else:
            header = ["uri" if h == uri_column else h for h in header]
            body, first = reader[1:], 2
        numbered = [
            (n, dict(zip(header, (c.strip() for c in row), strict=False)))
            for n, row in enumerate(body, start=first)
            if any(c.strip() for c in row)
        ]
    refs = []
    for line, row in numbered:
        target = row.get("uri") or ""
        if not target:
            raise ValueError(f"{uri}:{line}: manifest row has no URI")
        if not ("://" in target or os.path.isabs(target)):
            target = storage.join(base, target)
        refs.append(
            ImageRef(
                target, image_id(target), row.get("label") or None, row.get("split") or None, 0, ""
            )
        )
    return refs


def list_source(source: str) -> tuple[list[ImageRef], int]:
    """Lists one input; returns the refs and how many non-image files a folder walk skipped."""
    if storage.is_local(source):
        # fsspec lists local files by absolute path; roots must match for labels, and absolute
        # URIs keep image ids independent of the working directory.
        source = os.path.abspath(source.removeprefix("file://"))
    if _GLOB_CHARS & set(source):
        root = _glob_root(source)
        return [_ref(info, root) for info in storage.glob_files(source)], 0
    if storage.is_dir(source):
        files = storage.find_files(source)
        images = [f for f in files if _extension(f.uri) in IMAGE_EXTENSIONS]
        return [_ref(info, source) for info in images], len(files) - len(images)
    if _extension(source) in MANIFEST_EXTENSIONS:
        return read_manifest(source), 0
    return [_ref(storage.file_info(source), None)], 0


def list_sources(sources: Sequence[str]) -> Iterable[ImageRef]:
    """Lists every input once; a URI reached from two inputs is listed once (the first wins)."""
    seen: set[str] = set()
    skipped = beam.metrics.Metrics.counter("featurebeam", "skipped_non_image_files")
    duplicates = beam.metrics.Metrics.counter("featurebeam", "duplicate_uris")
    for source in sources:
        refs, n_skipped = list_source(source)
        if n_skipped:
            skipped.inc(n_skipped)
            _LOG.info("%s: skipped %d files without an image extension", source, n_skipped)
        for ref in refs:
            if ref.uri in seen:
                duplicates.inc()
                continue
            seen.add(ref.uri)
            yield ref


def check_sources(sources: Sequence[str]) -> None:
    """Fails fast, at graph-construction time, on inputs that do not exist.

    Raises:
        FileNotFoundError: naming the missing input.
    """
    for source in sources:
        if _GLOB_CHARS & set(source):
            continue  # a glob with no match is an empty input, not an error
        if not storage.exists(source):
            raise FileNotFoundError(f"input not found: {source}")


class ListImages(beam.PTransform):
    """Lists every image under the given inputs, then spreads the refs across workers.

    Listing runs in one worker (as Beam's ``MatchFiles`` does); the ``Reshuffle`` after it breaks
    fusion so that reading and embedding are distributed.
    """

    def __init__(self, sources: str | Sequence[str]):
        super().__init__()
        self._sources = [sources] if isinstance(sources, str) else list(sources)
        if not self._sources:
            raise ValueError("ListImages needs at least one input")

    def expand(self, pbegin):
        return (
            pbegin
            | "Sources" >> beam.Create([tuple(self._sources)])
            | "List" >> beam.FlatMap(list_sources).with_output_types(ImageRef)
            | "Spread" >> beam.Reshuffle()
        )
