"""Listing inputs: what the user points at becomes one row per image, as Arrow columns.

An input is one of:

- a directory or ``gs://bucket/prefix``: every file below it, recursively, whose extension is an
  image extension; files with **no** extension (object stores often key images by content hash) are
  sniffed by their first bytes with Pillow's own format checks and listed when they are images.
  Files with any other extension (``.txt``, ``.json``, ...) are skipped and *counted* (the run
  summary reports them, with examples); ``include_all_files`` lists every file instead;
- a glob (``data/*/*.jpg``, ``gs://b/**/*.png``): every match, whatever its extension;
- a manifest (``.csv``, ``.tsv`` or ``.txt``): one URI per row, optionally with ``label``,
  ``split``, and the change signal ``file_size`` / ``file_version`` (etag, generation, md5...);
  relative URIs are resolved against the manifest's folder. ``stat_manifest`` stats the URIs
  (in parallel) when the manifest carries no signal;
- a single image file.

Labels come from class folders: below a directory or glob root, an image's parent folder is its
label and the nearest enclosing folder named like a split (``train``, ``val``, ``test``, ...) is its
split, so ``hymenoptera/train/ants/x.jpg`` listed from ``hymenoptera`` gets ``label=ants,
split=train``. Images directly in the root get no label.

The listing is columnar (:data:`LISTING_SCHEMA`): planning a run over millions of images compares
Arrow arrays, not Python objects (see ``transforms.plan``). Manifests are parsed by pyarrow's CSV
reader.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

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
_HEADERLESS_COLUMNS = ("uri", "label", "split", "file_size", "file_version")
_GLOB_CHARS = frozenset("*?[")
#: Bytes read from an extensionless file to recognise an image format.
SNIFF_BYTES = 64
#: Skipped files named in the summary.
SKIPPED_EXAMPLES = 5
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


@dataclass(frozen=True)
class Listing:
    """What the inputs hold: the images (one row per distinct URI, first input wins), and the
    files that were not listed because their extension is not an image's."""

    images: pa.Table
    skipped: int = 0
    skipped_examples: tuple[str, ...] = ()
    duplicates: int = 0

    def refs(self) -> list[ImageRef]:
        return refs_from_table(self.images)


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


def refs_from_table(table: pa.Table) -> list[ImageRef]:
    """Listing (or plan) rows as :class:`ImageRef` tuples."""
    columns = [
        table.column(c).to_pylist()
        for c in ("uri", "image_id", "label", "split", "file_size", "file_version")
    ]
    return [
        ImageRef(u, i, lb, s, z or 0, v or "") for u, i, lb, s, z, v in zip(*columns, strict=True)
    ]


def _extension(uri: str) -> str:
    return posixpath.splitext(uri.rstrip("/").rsplit("/", 1)[-1])[1].lower()


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
    return any(accept(prefix) for accept in _image_formats())


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


def _walk(source: str, include_all_files: bool) -> tuple[pa.Table, list[str]]:
    files = storage.find_files(source)
    if include_all_files:
        return _table(files, source), []
    images = [f for f in files if _extension(f.uri) in IMAGE_EXTENSIONS]
    unnamed = [f for f in files if not _extension(f.uri)]
    if unnamed:
        with ThreadPoolExecutor(16) as pool:
            sniffed = [f for f, ok in zip(unnamed, pool.map(_sniff, unnamed), strict=True) if ok]
        images = sorted(images + sniffed, key=lambda f: f.uri)
    listed = {f.uri for f in images}
    return _table(images, source), [f.uri for f in files if f.uri not in listed]


def _manifest_columns(uri: str, ext: str) -> tuple[list[str], bool, str]:
    """(column names, whether the first line is a header, delimiter)."""
    import csv

    with storage.open_file(uri) as f:
        first = f.readline().decode("utf-8-sig", errors="replace").strip("\r\n")
    if ext == ".txt":
        return ["uri"], False, "\x1f"  # one URI per line: a delimiter that never occurs in paths
    delimiter = "\t" if ext == ".tsv" else ","
    cells = next(csv.reader([first], delimiter=delimiter), [])
    if any(c.strip().lower() in _URI_COLUMNS for c in cells):
        return cells, True, delimiter
    names = [*_HEADERLESS_COLUMNS, *(f"column{i}" for i in range(5, len(cells)))]
    return names[: max(len(cells), 1)], False, delimiter


def _read_ragged(uri: str, names: list[str], header: bool, delimiter: str) -> pa.Table:
    import csv
    import io

    text = storage.read_bytes(uri).decode("utf-8-sig")
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))[1 if header else 0 :]
    rows = [r for r in rows if r]  # empty lines, as pyarrow skips them
    return pa.table(
        {
            n: pa.array([r[i] if i < len(r) else "" for r in rows], pa.string())
            for i, n in enumerate(names)
        }
    )


def _blank_to_null(column):
    trimmed = pc.utf8_trim_whitespace(column)
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)


def _manifest_batches(uri, names, header, delimiter, ext):
    """The manifest as record batches of text columns, read as a stream (bounded memory)."""
    with storage.open_file(uri) as f:
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(
                column_names=[f"c{i}" for i in range(len(names))],
                skip_rows=1 if header else 0,
                block_size=16 << 20,
                encoding="utf8",
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, quote_char=False if ext == ".txt" else '"'
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={f"c{i}": pa.string() for i in range(len(names))},
                strings_can_be_null=False,
            ),
        )
        yield from reader


def _manifest_rows(raw, uri: str, names: list[str], ext: str, first_line: int) -> pa.Table:
    """Listing rows from one batch of a manifest's text columns."""
    header = [str(n).strip().lower().lstrip("\ufeff") for n in names]
    uri_column = next(c for c in (*_URI_COLUMNS, "uri") if c in header)
    columns = {("uri" if h == uri_column else h): raw.column(i) for i, h in enumerate(header)}
    uris = _blank_to_null(columns["uri"])
    if ext == ".txt":
        keep = pc.and_(pc.is_valid(uris), pc.invert(pc.starts_with(pc.fill_null(uris, ""), "#")))
    else:
        blank_rows = pc.is_null(uris)
        for name, column in columns.items():
            if name != "uri":
                blank_rows = pc.and_(blank_rows, pc.is_null(_blank_to_null(column)))
        missing = pc.and_(pc.is_null(uris), pc.invert(blank_rows))
        if pc.any(missing).as_py():
            row = pc.index(missing, True).as_py()
            raise ValueError(f"{uri}:{row + first_line}: manifest row has no URI")
        keep = pc.invert(blank_rows)
    uris = pc.filter(uris, keep)
    base = posixpath.dirname(uri) if not storage.is_local(uri) else os.path.dirname(uri)
    relative = pc.invert(pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/")))
    uris = pc.if_else(relative, pc.binary_join_element_wise(base, uris, "/"), uris)

    def optional(name: str):
        if name in columns:
            return pc.filter(_blank_to_null(columns[name]), keep)
        return pa.nulls(len(uris), pa.string())

    try:
        sizes = pc.fill_null(pc.cast(optional("file_size"), pa.int64()), 0)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{uri}: file_size must be a whole number of bytes ({exc})") from None
    return pa.table(
        {
            "image_id": image_ids(uris),
            "uri": uris,
            "label": optional("label"),
            "split": optional("split"),
            "file_size": sizes,
            "file_version": pc.fill_null(optional("file_version"), ""),
        },
        schema=LISTING_SCHEMA,
    )


def read_manifest(uri: str, *, stat: bool = False) -> pa.Table:
    """Parses a manifest file into listing rows (see the module docstring for the format),
    streaming it in blocks so that a manifest of millions of rows is never held as text.

    Raises:
        ValueError: a row without a URI (naming the line), or a ``file_size`` that is not a number.
    """
    ext = _extension(uri)
    names, header, delimiter = _manifest_columns(uri, ext)
    first_line = 2 if header else 1
    parts = []
    try:
        for batch in _manifest_batches(uri, names, header, delimiter, ext):
            parts.append(_manifest_rows(batch, uri, names, ext, first_line))
            first_line += batch.num_rows
    except pa.ArrowInvalid:
        # Rows of uneven length (hand-written files): Python's csv reader pads them.
        raw = _read_ragged(uri, names, header, delimiter)
        parts = [_manifest_rows(raw, uri, names, ext, 2 if header else 1)]
    table = pa.concat_tables(parts) if parts else LISTING_SCHEMA.empty_table()
    return stat_uris(table) if stat else table


def stat_uris(table: pa.Table, *, threads: int = 32) -> pa.Table:
    """Fills ``file_size``/``file_version`` by stat-ing every URI whose signal is unknown, in
    parallel; a URI that cannot be stat'ed keeps an unknown signal (its read fails later, as a row).
    """
    unknown = pc.and_(pc.equal(table["file_size"], 0), pc.equal(table["file_version"], ""))
    if not pc.any(unknown).as_py():
        return table
    uris = table["uri"].to_pylist()
    todo = [i for i, u in enumerate(pc.fill_null(unknown, False).to_pylist()) if u]

    def stat(i: int) -> tuple[int, str]:
        try:
            info = storage.file_info(uris[i])
            return info.size, info.version
        except OSError:
            return 0, ""

    sizes = table["file_size"].to_pylist()
    versions = table["file_version"].to_pylist()
    with ThreadPoolExecutor(threads) as pool:
        for i, (size, version) in zip(todo, pool.map(stat, todo), strict=True):
            sizes[i], versions[i] = size, version
    table = table.set_column(4, "file_size", pa.array(sizes, pa.int64()))
    return table.set_column(5, "file_version", pa.array(versions, pa.string()))


def list_source(
    source: str, *, include_all_files: bool = False, stat_manifest: bool = False
) -> tuple[pa.Table, list[str]]:
    """Lists one input; returns its rows and the files skipped as not images."""
    if storage.is_local(source):
        # fsspec lists local files by absolute path; roots must match for labels, and absolute
        # URIs keep image ids independent of the working directory.
        source = os.path.abspath(source.removeprefix("file://"))
    if _GLOB_CHARS & set(source):
        return _table(storage.glob_files(source), _glob_root(source)), []
    if storage.is_dir(source):
        return _walk(source, include_all_files)
    if _extension(source) in MANIFEST_EXTENSIONS:
        return read_manifest(source, stat=stat_manifest), []
    return _table([storage.file_info(source)], None), []


def list_inputs(
    sources: Sequence[str], *, include_all_files: bool = False, stat_manifest: bool = False
) -> Listing:
    """Lists every input; a URI reached from two inputs is listed once (the first wins)."""
    tables, skipped = [], {}
    for source in sources:
        t, not_images = list_source(
            source, include_all_files=include_all_files, stat_manifest=stat_manifest
        )
        tables.append(t)
        skipped.update(dict.fromkeys(not_images))
        if not_images:
            _LOG.info(
                "%s: skipped %d files that are not images, e.g. %s",
                source,
                len(not_images),
                not_images[0],
            )
    images = pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()
    total = images.num_rows
    images = _first_of_each(images)
    if total > images.num_rows:
        _LOG.info(
            "%d URIs were listed by more than one input; each is kept once", total - images.num_rows
        )
    examples = tuple(list(skipped)[:SKIPPED_EXAMPLES])
    return Listing(images, len(skipped), examples, total - images.num_rows)


def _first_of_each(images: pa.Table) -> pa.Table:
    """The first row of every image id, in listing order (a stable sort of the 16-byte keys,
    which needs a fraction of the memory of a hash aggregation at 10M rows)."""
    if images.num_rows < 2:
        return images
    keys = key_view(image_keys(images["image_id"]))
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    repeated = np.zeros(len(keys), bool)
    repeated[1:] = ordered[1:] == ordered[:-1]
    if not repeated.any():
        return images
    return images.take(pa.array(np.sort(order[~repeated])))


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
