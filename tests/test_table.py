"""transforms/table.py: the schemas, the rows that fill them, shard names, and reading back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from transforms import table
from transforms.image_rows import ImageRef

REF = ImageRef("/d/train/cats/0.png", "b" * 32, "cats", "train", 123, "v1")
OTHER = ImageRef("/d/val/dogs/1.png", "a" * 32, None, None, 0, "")


def test_error_rows_have_exactly_the_error_schemas_columns():
    row = table.error_row(REF, "decode", "cannot identify image file")
    assert list(row) == table.ERROR_SCHEMA.names
    assert row == {
        "image_id": "b" * 32,
        "uri": "/d/train/cats/0.png",
        "stage": "decode",
        "reason": "cannot identify image file",
        "file_size": 123,
        "file_version": "v1",
    }
    errors = table.to_arrow([row], table.ERROR_SCHEMA)
    assert errors.schema == table.ERROR_SCHEMA and errors.to_pylist() == [row]


def test_a_long_reason_is_cut_to_the_limit():
    limit = table.MAX_REASON_CHARS
    assert table.error_row(REF, "embed", "x" * limit)["reason"] == "x" * limit
    assert table.error_row(REF, "embed", "x" * (limit + 1))["reason"] == "x" * limit


def test_feature_rows_fill_the_feature_schema_sorted_by_id():
    schema = table.feature_schema(3)
    rows = [
        table.feature_row(REF, 40, 30, np.array([0.1, 0.2, 0.3])),
        table.feature_row(OTHER, 8, 6, np.array([1, 2, 3])),
    ]
    assert [list(r) for r in rows] == [schema.names] * 2
    t = table.to_arrow(rows, schema)
    assert t.schema.field("feature").type == pa.list_(pa.float32(), 3)
    assert t.column("image_id").to_pylist() == ["a" * 32, "b" * 32]
    assert t.column("label").to_pylist() == [None, "cats"]
    assert (t.column("width").to_pylist(), t.column("file_size").to_pylist()) == ([8, 40], [0, 123])
    np.testing.assert_array_equal(
        table.features_matrix(t), np.array([[1, 2, 3], [0.1, 0.2, 0.3]], np.float32)
    )


def test_vectors_of_the_wrong_width_are_refused():
    row = table.feature_row(REF, 1, 1, np.zeros(2))
    with pytest.raises(ValueError, match="feature: vectors are not all 3-d"):
        table.to_arrow([row], table.feature_schema(3))


def test_no_rows_give_an_empty_table_of_the_schema():
    t = table.to_arrow([], table.feature_schema(4))
    assert t.num_rows == 0 and t.schema == table.feature_schema(4)


def test_metadata_is_stored_under_the_prefix_and_read_back_without_it():
    schema = table.feature_schema(3, {"backbone": "resnet50", "feature_dim": 3})
    assert schema.metadata == {
        b"featurebeam.backbone": b"resnet50",
        b"featurebeam.feature_dim": b"3",
    }
    other = schema.with_metadata({**schema.metadata, b"pandas": b"{}"})
    assert table.table_metadata(other) == {"backbone": "resnet50", "feature_dim": "3"}
    assert table.table_metadata(table.feature_schema(3)) == {}


def test_shard_names_are_zero_padded_with_an_optional_run():
    assert table.shard_name("features", 3, 10) == "features-00003-of-00010.parquet"
    assert table.shard_name("errors", 0, 1, run_id="r1") == "errors-r1-00000-of-00001.parquet"


def test_only_complete_shards_of_the_prefix_are_read(tmp_path):
    out = tmp_path / "t"
    schema = table.feature_schema(3)
    for i, ref in enumerate((REF, OTHER)):
        part = table.to_arrow([table.feature_row(ref, 1, 1, np.full(3, i))], schema)
        table.write_parquet(str(out / table.shard_name(table.FEATURES, i, 2, run_id="r")), part)
    (out / ".features-r-00002-of-00002.parquet.1234.tmp").write_bytes(b"half written")
    (out / "features-final.parquet").write_bytes(b"not a shard name")
    errors = table.to_arrow([table.error_row(REF, "read", "gone")], table.ERROR_SCHEMA)
    table.write_parquet(str(out / table.ERRORS_DIR / table.shard_name(table.ERRORS, 0, 1)), errors)

    names = [f.rsplit("/", 1)[-1] for f in table.shard_files(str(out))]
    assert names == ["features-r-00000-of-00002.parquet", "features-r-00001-of-00002.parquet"]
    assert table.read_table(str(out)).num_rows == 2
    assert table.read_table(str(out), prefix=table.ERRORS).to_pylist() == errors.to_pylist()
    assert table.read_table(str(out), columns=["uri"]).column_names == ["uri"]
    with pytest.raises(FileNotFoundError, match="no features-\\*.parquet shards in"):
        table.read_table(str(tmp_path / "empty"))
    assert table.shard_files(str(tmp_path / "empty"), table.ERRORS) == []


def test_the_summary_round_trips(tmp_path):
    table.write_summary(str(tmp_path), {"rows": 2, "errors": 1})
    assert table.read_summary(str(tmp_path)) == {"rows": 2, "errors": 1}
    assert (tmp_path / table.SUMMARY_FILE).read_text().startswith("{\n")
