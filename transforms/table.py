"""The Parquet feature table: its schema (declared once), writing shards, and reading tables back.

A table is a folder of zero-padded shards (rows built by :func:`feature_row` and
:func:`error_row`, beside the schemas they fill)::

    features-RUN-00000-of-00002.parquet   one row per image; the vector is fixed_size_list<float32>[D]
    features-RUN-00001-of-00002.parquet   (RUN: the run id; an incremental run adds its own shards)
    _errors/errors-RUN-00000-of-00002.parquet   one row per input that could not become a feature row
    _SUMMARY.json                     counts (inputs = rows + errors) and the table metadata

The extraction job writes one shard per chunk of work (``transforms.extract``). Readers here also
accept shard names without a run id (``features-NNNNN-of-MMMMM.parquet``). Shards are named for
what they hold: ``classify`` writes ``predictions-*.parquet`` (:data:`PREDICTIONS`) where
extraction writes ``features-*.parquet``; both are a table's row shards (:data:`ROW_PREFIXES`), so
every reader here (``shard_files``, ``read_table``) and every job that reads a table finds either.

Readers skip names starting with ``_`` or ``.``, so ``pandas.read_parquet(folder)``,
``pyarrow.dataset`` and DuckDB's ``folder/*.parquet`` see exactly the feature rows. Rows inside a
shard are sorted by ``image_id``. Each shard is committed only when complete (see
``storage.write_atomically``), so readers never see half a file. We write shards ourselves instead
of using Beam's ``WriteToParquet`` because its temp-file finalisation depends on the runner (on the
DaskRunner it leaves the rows in ``beam-temp-*``) and its shard names are not stable across runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transforms import storage

if TYPE_CHECKING:
    from transforms.image_rows import ImageRef

FEATURES = "features"
#: The row shards of a prediction table (``classify``).
PREDICTIONS = "predictions"
#: Prefixes of a table's row shards: asking :func:`shard_files` for ``FEATURES`` (the default)
#: finds the rows whatever they hold.
ROW_PREFIXES = (FEATURES, PREDICTIONS)
ERRORS = "errors"
SUMMARY_FILE = "_SUMMARY.json"
ERRORS_DIR = "_errors"
METADATA_PREFIX = "featurebeam."

#: The source file's size and version (generation/etag/mtime) when it was read: the change
#: signal incremental runs compare against.
SOURCE_FIELDS = (
    pa.field("file_size", pa.int64()),
    pa.field("file_version", pa.string()),
)

ERROR_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        *SOURCE_FIELDS,
    ]
)

_SHARD_RE = re.compile(
    r"^(?P<prefix>[a-z]+)-(?:(?P<run>[0-9A-Za-z]+)-)?(?P<index>\d{5})-of-(?P<count>\d{5})\.parquet$"
)


#: The columns that identify an image; every per-image table starts with them.
IMAGE_FIELDS = (
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("split", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
)


def feature_schema(dim: int, metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """The feature table's schema, with ``metadata`` stored under ``featurebeam.*`` keys."""
    schema = pa.schema(
        [
            *IMAGE_FIELDS,
            *SOURCE_FIELDS,
            pa.field("feature", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )
    if metadata:
        schema = schema.with_metadata(
            {f"{METADATA_PREFIX}{k}": str(v) for k, v in metadata.items()}
        )
    return schema


#: Error reasons are cut to this many characters (a traceback can be long).
MAX_REASON_CHARS = 2000


def error_row(ref: ImageRef, stage: str, reason: str) -> dict[str, Any]:
    """One row of :data:`ERROR_SCHEMA`."""
    return {
        "image_id": ref.image_id,
        "uri": ref.uri,
        "stage": stage,
        "reason": reason[:MAX_REASON_CHARS],
        "file_size": ref.size,
        "file_version": ref.version,
    }


def feature_row(ref: ImageRef, width: int, height: int, vector: np.ndarray) -> dict[str, Any]:
    """One row of :func:`feature_schema`."""
    return {
        "image_id": ref.image_id,
        "uri": ref.uri,
        "label": ref.label,
        "split": ref.split,
        "width": width,
        "height": height,
        "file_size": ref.size,
        "file_version": ref.version,
        "feature": vector,
    }


def table_metadata(schema: pa.Schema) -> dict[str, str]:
    """The ``featurebeam.*`` metadata of a schema, without the prefix."""
    raw = schema.metadata or {}
    return {
        k.decode()[len(METADATA_PREFIX) :]: v.decode()
        for k, v in raw.items()
        if k.decode().startswith(METADATA_PREFIX)
    }


def shard_name(prefix: str, index: int, count: int, *, run_id: str = "") -> str:
    """``features-RUN-00003-of-00010.parquet`` (``RUN`` omitted when empty)."""
    run = f"{run_id}-" if run_id else ""
    return f"{prefix}-{run}{index:05d}-of-{count:05d}.parquet"


def shard_run(uri: str) -> str | None:
    """The run id in a shard's name (``features-RUN-00003-of-00010.parquet``), or None."""
    match = _SHARD_RE.match(uri.rstrip("/").rsplit("/", 1)[-1])
    return match["run"] if match else None


def to_arrow(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Builds a table from row dicts, sorted by ``image_id``; vectors become fixed-size lists."""
    rows = sorted(rows, key=lambda r: r["image_id"])
    columns = []
    for field in schema:
        values = [r.get(field.name) for r in rows]
        if pa.types.is_fixed_size_list(field.type):
            size = field.type.list_size
            flat = (
                np.stack([np.asarray(v, dtype=np.float32) for v in values]).reshape(-1)
                if values
                else np.zeros(0, dtype=np.float32)
            )
            if flat.size != size * len(values):
                raise ValueError(f"{field.name}: vectors are not all {size}-d")
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), size))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def write_parquet(uri: str, table: pa.Table) -> None:
    """Writes one Parquet file atomically."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_atomically(uri, lambda f: f.write(buffer.getvalue()))


def table_dir_for(output_dir: str, prefix: str) -> str:
    """Where a prefix's shards live: features at the top, errors in ``_errors/``."""
    return storage.join(output_dir, ERRORS_DIR) if prefix == ERRORS else output_dir


def shard_files(output_dir: str, prefix: str = FEATURES) -> list[str]:
    """The complete shard files of one table prefix, sorted; ``FEATURES`` (the default) stands
    for the table's row shards, ``features-*`` or ``predictions-*`` (:data:`ROW_PREFIXES`)."""
    table_dir = table_dir_for(output_dir, prefix)
    fs, path = storage.filesystem(table_dir)
    if not fs.exists(path):
        return []
    wanted = ROW_PREFIXES if prefix == FEATURES else (prefix,)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [
        storage.join(table_dir, n)
        for n in names
        if (m := _SHARD_RE.match(n)) and m["prefix"] in wanted
    ]


def read_table(
    output_dir: str, *, prefix: str = FEATURES, columns: list[str] | None = None
) -> pa.Table:
    """Reads every shard of a table (local or ``gs://``) into one Arrow table.

    Raises:
        FileNotFoundError: no shards in the folder.
    """
    files = shard_files(output_dir, prefix)
    if not files:
        raise FileNotFoundError(f"no {prefix}-*.parquet shards in {output_dir}")
    fs, _ = storage.filesystem(files[0])
    paths = [storage.filesystem(f)[1] for f in files]
    try:
        return pq.read_table(paths, filesystem=fs, columns=columns)
    except (pa.ArrowException, OSError):
        for uri in files:  # name the shard that cannot be read
            with reading(uri):
                pq.read_table(storage.filesystem(uri)[1], filesystem=fs, columns=columns)
        raise


@contextlib.contextmanager
def reading(uri: str):
    """Names ``uri`` in any error reading it: a truncated or damaged shard is one line saying
    which file and what to do, not pyarrow's message alone."""
    try:
        yield
    except pa.ArrowInvalid as exc:  # no Parquet footer, a file of 0 bytes, ...
        raise CorruptFile(
            f"{uri} is not a readable Parquet file ({_first_line(exc)}); move it out of the table "
            "(its rows are then missing: a --mode incremental run embeds those images again)"
        ) from exc
    except OSError as exc:  # damaged pages ("Corrupt snappy compressed data"), storage errors
        if uri in str(exc):
            raise
        raise OSError(f"{uri}: {_first_line(exc)}") from exc


class CorruptFile(ValueError):
    """A table's shard or summary that cannot be read; the message names the file."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def write_summary(table_dir: str, summary: Mapping[str, Any]) -> None:
    data = json.dumps(summary, indent=2, sort_keys=True).encode()
    storage.write_atomically(storage.join(table_dir, SUMMARY_FILE), lambda f: f.write(data))


def read_summary(table_dir: str) -> dict[str, Any]:
    """A table's ``_SUMMARY.json``.

    Raises:
        CorruptFile: it is not JSON (naming the file).
    """
    uri = storage.join(table_dir, SUMMARY_FILE)
    try:
        return json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFile(
            f"{uri} is not valid JSON ({_first_line(exc)}); it is rewritten by the next run that "
            "finishes: move it away and run again"
        ) from exc


def features_matrix(table: pa.Table, column: str = "feature") -> np.ndarray:
    """The vectors of a feature table as a ``(rows, D)`` float32 array, without copying rows."""
    chunks = table.column(column).combine_chunks()
    dim = chunks.type.list_size
    return chunks.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
