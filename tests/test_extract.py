"""ExtractFeatures with the fake backbone: decode, embed, commit, errors as rows, counts; the
run metadata's tool version."""

from __future__ import annotations

import os
import pathlib
import re

import numpy as np
import pytest
from conftest import encode
from fakes import MeanColorHandler, add_bad_files, mean_color, run_extract
from PIL import Image

from transforms import table
from transforms.images import load_image
from transforms.listing import list_sources
from transforms.table_job import tool_version


def stages(out) -> list[tuple[str, str]]:
    errors = table.read_table(str(out), prefix=table.ERRORS)
    return sorted(
        (os.path.basename(u), s)
        for u, s in zip(errors["uri"].to_pylist(), errors["stage"].to_pylist(), strict=True)
    )


def test_unreadable_file_is_a_read_error(tmp_path):
    (tmp_path / "list.txt").write_text(str(tmp_path / "gone.jpg") + "\n")
    summary = run_extract(str(tmp_path / "list.txt"), tmp_path / "out")
    assert (summary["inputs"], summary["rows"], summary["errors"]) == (1, 0, 1)
    errors = table.read_table(str(tmp_path / "out"), prefix=table.ERRORS)
    assert errors["stage"].to_pylist() == ["read"]
    assert "FileNotFoundError" in errors["reason"][0].as_py()


def test_rows_match_a_direct_computation(image_tree, tmp_path):
    refs = list_sources([str(image_tree)])
    expected = {
        r.uri: tuple(
            np.round(mean_color(load_image(pathlib.Path(r.uri).read_bytes(), (8, 8)).pixels), 5)
        )
        for r in refs
    }
    run_extract(str(image_tree), tmp_path / "out", handler=MeanColorHandler(batch_size=5))
    t = table.read_table(str(tmp_path / "out"))
    got = {
        u: tuple(np.round(v, 5))
        for u, v in zip(t["uri"].to_pylist(), table.features_matrix(t), strict=True)
    }
    assert got == expected


def test_a_failing_batch_becomes_one_error_row_per_image(tmp_path):
    for i, shade in enumerate([0, 10, 250, 240]):
        (tmp_path / f"{i}.png").write_bytes(encode(Image.new("RGB", (8, 8), (shade,) * 3)))
    handler = MeanColorHandler(batch_size=1, fail_below=0.2)
    summary = run_extract(str(tmp_path), tmp_path / "out", handler=handler)
    assert (summary["rows"], summary["errors"]) == (2, 2)
    assert stages(tmp_path / "out") == [("0.png", "embed"), ("1.png", "embed")]
    rows = table.read_table(str(tmp_path / "out"))["uri"].to_pylist()
    assert sorted(os.path.basename(u) for u in rows) == ["2.png", "3.png"]


def test_extract_features_writes_a_reconciled_table(image_tree, tmp_path):
    expected_errors = add_bad_files(image_tree)
    out = tmp_path / "table"
    summary = run_extract(
        str(image_tree), out, chunk_size=6, max_pixels=4_000_000, run_id="20261129T000000abcd"
    )
    assert stages(out) == sorted(expected_errors.items())

    assert summary["inputs"] == 16
    assert (summary["rows"], summary["errors"]) == (12, len(expected_errors))
    assert summary["inputs"] == summary["rows"] + summary["errors"]
    assert summary["run"]["chunks"] == 3
    names = sorted(os.listdir(out))
    assert names[:3] == ["_RUNS", "_SUMMARY.json", "_errors"]
    names = names[1:]
    assert all(
        n.startswith("features-20261129T000000abcd-0000") and n.endswith("-of-00003.parquet")
        for n in names[2:]
    ), names
    assert [os.path.basename(f) for f in summary["feature_files"]] == names[2:]
    features = table.read_table(str(out))
    assert features.num_rows == 12
    assert features.schema.field("feature").type.list_size == 3
    assert table.table_metadata(features.schema)["backbone"] == "mean_color"
    assert set(features.column("label").to_pylist()) == {"cats", "dogs"}
    assert set(features.column("split").to_pylist()) == {"train", "val"}
    assert all(s > 0 for s in features.column("file_size").to_pylist())
    errors = table.read_table(str(out), prefix=table.ERRORS)
    assert sorted(errors.column("stage").to_pylist()) == sorted(expected_errors.values())
    # chunks are consecutive image-id ranges, each shard sorted, so the table is sorted
    ids = features.column("image_id").to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == 12


def test_same_inputs_give_identical_rows(image_tree, tmp_path):
    run_extract(str(image_tree), tmp_path / "a")
    run_extract(str(image_tree), tmp_path / "b")
    assert table.read_table(str(tmp_path / "a")).equals(table.read_table(str(tmp_path / "b")))


def test_no_images_still_writes_readable_empty_tables(tmp_path):
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    # Asked for with --allow-empty: without it an empty listing is refused (tests/test_safety.py).
    summary = run_extract(str(tmp_path / "in"), out, allow_empty=True)
    assert (summary["inputs"], summary["rows"], summary["errors"]) == (0, 0, 0)
    assert table.read_table(str(out)).num_rows == 0
    assert table.read_table(str(out), prefix=table.ERRORS).num_rows == 0


def test_pandas_reads_only_the_feature_rows(image_tree, tmp_path):
    pandas = pytest.importorskip("pandas")
    add_bad_files(image_tree)
    run_extract(str(image_tree), tmp_path / "t", max_pixels=4_000_000)
    frame = pandas.read_parquet(tmp_path / "t")
    assert len(frame) == 12 and frame["feature"].iloc[0].shape == (3,)


def test_tool_version_comes_from_the_installed_package():
    pyproject = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert tool_version() == re.search(r'^version = "(.+)"', pyproject, re.M).group(1)
