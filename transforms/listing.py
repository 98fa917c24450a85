"""Listing inputs: what the user points at becomes one row per image, as Arrow columns.

An input is one of:

- a directory or ``gs://bucket/prefix``: every file below it, recursively, whose extension is an
  image extension; files with **no** extension (object stores often key images by content hash) are
  sniffed by their first bytes with Pillow's own format checks and listed when they are images.
  Files with any other extension (``.txt``, ``.json``, ...) are skipped and *counted* (the run
  summary reports them, with examples); ``include_all_files`` lists every file instead;
- a glob (``data/*/*.jpg``, ``gs://b/**/*.png``): every match, whatever its extension;

only regular files are inputs: a named pipe, a socket or a device found in a folder or matched by
a glob (or named as the input itself) is skipped and counted too, since opening a pipe blocks until
someone writes to it (a manifest's URIs are not stat'ed: such a file becomes an error row when it
is read, as ``storage.read_bytes`` refuses it);
- a manifest (``.csv``, ``.tsv`` or ``.txt``): one URI per row, parsed by ``transforms.manifest``;
- a single image file.

Labels come from class folders: below a directory or glob root, an image's parent folder is its
label and the nearest enclosing folder named like a split (``train``, ``val``, ``test``, ...) is its
split, so ``hymenoptera/train/ants/x.jpg`` listed from ``hymenoptera`` gets ``label=ants,
split=train``. Images directly in the root get no label.

The listing is columnar (``transforms.image_rows.LISTING_SCHEMA``): planning a run over millions of
images compares Arrow arrays, not Python objects (see ``transforms.plan``).
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms import manifest, storage
from transforms.image_rows import (
    LISTING_SCHEMA,
    ImageRef,
    image_ids,
    image_keys,
    key_view,
    refs_from_table,
)

_LOG = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
SPLIT_NAMES = frozenset(
    {"train", "training", "val", "valid", "validation", "test", "testing", "dev"}
)
_GLOB_CHARS = frozenset("*?[")
#: Bytes read from an extensionless file to recognise an image format.
SNIFF_BYTES = 64
#: Skipped files named in the summary.
SKIPPED_EXAMPLES = 5
#: Why a file was skipped (the summary counts skipped files by reason).
NOT_AN_IMAGE = "not an image"
NOT_REGULAR = "not a regular file"


@dataclass(frozen=True)
class Listing:
    """What the inputs hold: the images (one row per distinct URI, first input wins), and the
    files that were not listed: their extension is not an image's, or they are not regular files
    (``skipped_reasons``: ``(reason, count)`` pairs)."""

    images: pa.Table
    skipped: int = 0
    skipped_examples: tuple[str, ...] = ()
    skipped_reasons: tuple[tuple[str, int], ...] = ()
    duplicates: int = 0
    #: URIs listed more than once with different labels (each keeps its first label).
    label_conflicts: int = 0
    label_conflict_examples: tuple[str, ...] = ()

    def refs(self) -> list[ImageRef]:
        return refs_from_table(self.images)


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


@functools.cache
def _image_formats() -> tuple:
    """Pillow's own format checks (``accept(prefix)``), for every format it can decode; gathered
    once per process, not per sniffed file."""
    from PIL import Image, ImageFile

    Image.init()
    return tuple(
        accept
        for factory, accept in Image.OPEN.values()
        if accept is not None
        and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
    )


def looks_like_image(prefix: bytes) -> bool:
    """True when the first bytes of a file are those of a format Pillow can decode."""
    return any(_accepts(accept, prefix) for accept in _image_formats())


def _accepts(accept, prefix: bytes) -> bool:
    # Not every one of Pillow's checks copes with a prefix shorter than its header (DIB's unpacks
    # 4 bytes: an empty file raised struct.error): a check that fails on the bytes rejects them.
    try:
        return bool(accept(prefix))
    except (struct.error, IndexError, ValueError):
        return False


def _sniff(info: storage.FileInfo) -> bool:
    try:
        with storage.open_file(info.uri) as f:
            return looks_like_image(f.read(SNIFF_BYTES))
    except OSError:
        return True  # unreadable now: list it, so the run records why as an error row


def _table(infos: Sequence[storage.FileInfo], root: str | None) -> pa.Table:
    uris = [i.uri for i in infos]
    labels_splits = [label_and_split(root, u) if root else (None, None) for u in uris]
    return pa.table(
        {
            "image_id": image_ids(pa.array(uris, pa.string())),
            "uri": pa.array(uris, pa.string()),
            "label": pa.array([ls[0] for ls in labels_splits], pa.string()),
            "split": pa.array([ls[1] for ls in labels_splits], pa.string()),
            "file_size": pa.array([i.size for i in infos], pa.int64()),
            "file_version": pa.array([i.version for i in infos], pa.string()),
        },
        schema=LISTING_SCHEMA,
    )


def _walk(source: str, include_all_files: bool) -> tuple[pa.Table, dict[str, str]]:
    others: list[str] = []
    files = storage.find_files(source, others=others)
    special = dict.fromkeys(others, NOT_REGULAR)
    if include_all_files:
        return _table(files, source), special
    images = [f for f in files if storage.extension(f.uri) in IMAGE_EXTENSIONS]
    unnamed = [f for f in files if not storage.extension(f.uri)]
    if unnamed:
        with ThreadPoolExecutor(16) as pool:
            sniffed = [f for f, ok in zip(unnamed, pool.map(_sniff, unnamed), strict=True) if ok]
        images = sorted(images + sniffed, key=lambda f: f.uri)
    listed = {f.uri for f in images}
    not_images = {f.uri: NOT_AN_IMAGE for f in files if f.uri not in listed}
    return _table(images, source), {**not_images, **special}


def list_source(
    source: str, *, include_all_files: bool = False, stat_manifest: bool = False
) -> tuple[pa.Table, dict[str, str]]:
    """Lists one input; returns its rows and the files skipped (URI -> why: :data:`NOT_AN_IMAGE`
    or :data:`NOT_REGULAR`)."""
    # fsspec lists local files by absolute path; roots must match for labels, and absolute URIs
    # keep image ids independent of the working directory.
    source = storage.absolute(source)
    if _GLOB_CHARS & set(source):
        others: list[str] = []
        files = storage.glob_files(source, others=others)
        return _table(files, _glob_root(source)), dict.fromkeys(others, NOT_REGULAR)
    if storage.is_dir(source):
        return _walk(source, include_all_files)
    if not storage.is_regular_file(source):
        return _table([], None), {source: NOT_REGULAR}
    if manifest.is_manifest(source):
        return manifest.read_manifest(source, stat=stat_manifest), {}
    return _table([storage.file_info(source)], None), {}


def list_inputs(
    sources: Sequence[str], *, include_all_files: bool = False, stat_manifest: bool = False
) -> Listing:
    """Lists every input; a URI reached from two inputs is listed once (the first wins)."""
    tables: list[pa.Table] = []
    skipped: dict[str, str] = {}
    for source in sources:
        t, passed_over = list_source(
            source, include_all_files=include_all_files, stat_manifest=stat_manifest
        )
        tables.append(t)
        skipped.update({uri: why for uri, why in passed_over.items() if uri not in skipped})
        for why, uris in _by_reason(passed_over).items():
            _LOG.info("%s: skipped %d files (%s), e.g. %s", source, len(uris), why, uris[0])
    images = pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()
    total = images.num_rows
    images, conflicts = _first_of_each(images)
    if total > images.num_rows:
        _LOG.info(
            "%d URIs were listed by more than one input; each is kept once", total - images.num_rows
        )
    if conflicts:
        _LOG.warning(
            "%d URIs are listed with different labels; each keeps the label it was first listed "
            "with, e.g. %s",
            len(conflicts),
            ", ".join(conflicts[:SKIPPED_EXAMPLES]),
        )
    examples = tuple(list(skipped)[:SKIPPED_EXAMPLES])
    reasons = tuple((why, len(uris)) for why, uris in sorted(_by_reason(skipped).items()))
    return Listing(
        images,
        len(skipped),
        examples,
        reasons,
        total - images.num_rows,
        label_conflicts=len(conflicts),
        label_conflict_examples=tuple(conflicts[:SKIPPED_EXAMPLES]),
    )


def _by_reason(skipped: dict[str, str]) -> dict[str, list[str]]:
    by_reason: dict[str, list[str]] = {}
    for uri, why in skipped.items():
        by_reason.setdefault(why, []).append(uri)
    return by_reason


def describe_skipped(reasons: Sequence[tuple[str, int]]) -> str:
    """``"not an image: 3, not a regular file: 1"`` (``"none"`` when nothing was skipped)."""
    return ", ".join(f"{why}: {n}" for why, n in reasons) or "none"


def _first_of_each(images: pa.Table) -> tuple[pa.Table, list[str]]:
    """The first row of every image id, in listing order (a stable sort of the 16-byte keys,
    which needs a fraction of the memory of a hash aggregation at 10M rows), and the URIs
    listed again with another label than their first."""
    if images.num_rows < 2:
        return images, []
    keys = key_view(image_keys(images["image_id"]))
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    repeated = np.zeros(len(keys), bool)
    repeated[1:] = ordered[1:] == ordered[:-1]
    if not repeated.any():
        return images, []
    # The first listing of each repeated row: the last position before it that is not repeated.
    starts = np.maximum.accumulate(np.where(~repeated, np.arange(len(keys)), 0))
    again = np.nonzero(repeated)[0]
    labels = pc.fill_null(images["label"], "")
    differs = pc.not_equal(
        labels.take(pa.array(order[again])), labels.take(pa.array(order[starts[again]]))
    )
    firsts = np.unique(order[starts[again[differs.to_numpy()]]])
    conflicts = images["uri"].take(pa.array(np.sort(firsts))).to_pylist()
    return images.take(pa.array(np.sort(order[~repeated]))), conflicts


def list_sources(sources: Sequence[str], **options) -> list[ImageRef]:
    """Every image under the inputs as :class:`ImageRef` tuples (see :func:`list_inputs`)."""
    listing = list_inputs(sources, **options)
    if listing.skipped:
        beam.metrics.Metrics.counter("featurebeam", "skipped_non_image_files").inc(listing.skipped)
    return listing.refs()


def check_sources(sources: Sequence[str]) -> None:
    """Fails fast, before anything is planned, on inputs that do not exist.

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
