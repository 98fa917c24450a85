"""Manifests: a ``.csv``, ``.tsv`` or ``.txt`` file naming the images to list, parsed into listing
rows (``transforms.image_rows.LISTING_SCHEMA``) by pyarrow's CSV reader.

One URI per row, optionally with ``label``, ``split``, and the change signal ``file_size`` /
``file_version`` (etag, generation, md5...); relative URIs are resolved against the manifest's
folder. A header row is recognised by a URI column name (``uri``, ``path``, ``image``, ...);
without one the columns are ``uri, label, split, file_size, file_version``. A first line of
names that are none of these (``img_path,class``) is refused rather than read as an image. A ``.txt`` manifest
holds one URI per line (``#`` starts a comment). :func:`stat_uris` stats the URIs (in parallel)
when the manifest carries no signal.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from transforms import storage
from transforms.image_rows import LISTING_SCHEMA, image_ids

_LOG = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = frozenset({".csv", ".tsv", ".txt"})
_URI_COLUMNS = ("uri", "path", "image", "file", "filename", "url")
_HEADERLESS_COLUMNS = ("uri", "label", "split", "file_size", "file_version")
_READ_COLUMNS = frozenset((*_URI_COLUMNS, *_HEADERLESS_COLUMNS))
_WE_READ = f"a URI column ({' or '.join(_URI_COLUMNS)}) and label, split, file_size, file_version"
#: A header cell: a name, not a path (no ``/``, no ``.``, no ``://``).
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_ -]*$")


def _looks_like_header(cells: list[str]) -> bool:
    return bool(cells) and all(_NAME.match(c.strip()) for c in cells)


def _resolve(manifest: str, path: str) -> str:
    """A URI of the manifest, relative ones resolved against the manifest's folder."""
    if "://" in path or path.startswith("/"):
        return path
    base = os.path.dirname(manifest) if storage.is_local(manifest) else posixpath.dirname(manifest)
    return storage.join(base, path)


def is_manifest(uri: str) -> bool:
    """True when ``uri`` names a manifest by its extension."""
    return storage.extension(uri) in MANIFEST_EXTENSIONS


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
        unread = [c for c in cells if c.strip().lower() not in _READ_COLUMNS]
        if unread:
            _LOG.warning("%s: columns not read: %s (we read %s)", uri, ", ".join(unread), _WE_READ)
        return cells, True, delimiter
    if _looks_like_header(cells) and not storage.exists(_resolve(uri, cells[0].strip())):
        raise ValueError(
            f"{uri}: its first line {first!r} looks like a header, but names no column we read: "
            f"we read {_WE_READ}. Rename the columns (e.g. uri,label,split), or, for a file "
            "without a header, make the first field of each line an image's path (the first line's "
            f"{cells[0].strip()!r} is no file)"
        )
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
        ValueError: a header naming no column we read, a row without a URI (naming the line), or
            a ``file_size`` that is not a number.
    """
    ext = storage.extension(uri)
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
