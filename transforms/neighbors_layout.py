"""The neighbours job's output folder, stated once: its file names, the columns and schemas of its
tables, and the ``featurebeam.*`` metadata keys it adds to the source table's recipe.

``pipeline.neighbors`` writes this layout; the report (``transforms.report_data``) reads it back.
Both name it through these constants, so the two cannot drift apart. pyarrow only.
"""

import pyarrow as pa

#: Every row's neighbours.
NEIGHBORS_FILE = "neighbors.parquet"
#: Near-duplicate groups (``--duplicates``).
DUPLICATES_FILE = "duplicates.parquet"
#: The ``--query`` images' feature table.
QUERY_DIR = "query"
#: The ``--query`` rows' neighbours in the table (:data:`NEIGHBOR_SCHEMA`).
QUERY_NEIGHBORS_FILE = "query_neighbors.parquet"

# Columns. The id columns carry the feature table's own names.
IMAGE_ID = "image_id"
URI = "uri"
LABEL = "label"
SPLIT = "split"
NEIGHBOR_IDS = "neighbor_ids"
NEIGHBOR_URIS = "neighbor_uris"
SIMILARITIES = "similarities"
GROUP = "group"

#: ``neighbors.parquet`` and ``query_neighbors.parquet``: the first k neighbours of each row,
#: best first, with their cosine similarities.
NEIGHBOR_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string()),
        pa.field(URI, pa.string()),
        pa.field(NEIGHBOR_IDS, pa.list_(pa.string())),
        pa.field(NEIGHBOR_URIS, pa.list_(pa.string())),
        pa.field(SIMILARITIES, pa.list_(pa.float32())),
    ]
)
#: ``duplicates.parquet``: one row per member of a near-duplicate group.
DUPLICATE_SCHEMA = pa.schema(
    [
        pa.field(GROUP, pa.int64()),
        pa.field(IMAGE_ID, pa.string()),
        pa.field(URI, pa.string()),
        pa.field(SPLIT, pa.string()),
        pa.field(LABEL, pa.string()),
    ]
)
#: The id columns a duplicate group's members carry, copied from the source table.
DUPLICATE_ID_COLUMNS = (IMAGE_ID, URI, SPLIT, LABEL)

# Metadata keys (after ``transforms.table.METADATA_PREFIX``) added to the source table's recipe.
SOURCE_TABLE = "source_table"
#: The source table's fingerprint: a reader checks it against the table it is given.
SOURCE_FINGERPRINT = "source_fingerprint"
SOURCE_ROWS = "source_rows"
#: Neighbours per row.
K = "k"
#: ``exact`` or ``faiss``.
INDEX = "index"
#: The duplicate threshold (``duplicates.parquet``).
THRESHOLD = "threshold"
#: The query feature table (``query_neighbors.parquet``).
QUERY_TABLE = "query_table"
