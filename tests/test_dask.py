"""The extraction job on a real Dask cluster: a scheduler and 2 worker processes over loopback."""

from __future__ import annotations

import pytest

from pipeline.extract import run
from pipeline.runners import start_local_dask_cluster
from transforms import table

pytest.importorskip("distributed")

SMALL = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "64"]


@pytest.fixture(scope="module")
def dask_cluster():
    cluster = start_local_dask_cluster(2)
    yield cluster
    cluster.close()


def test_dask_runner_matches_the_direct_runner(image_tree, dask_cluster, tmp_path):
    from fakes import add_bad_files

    add_bad_files(image_tree)
    common = ["--input", str(image_tree), *SMALL, "--chunk-size", "3", "--max-pixels", "4000000"]
    on_dask = run(
        [*common, "--output", str(tmp_path / "dask"), "--runner", "dask"]
        + ["--dask_client_address", dask_cluster.scheduler_address]
    )
    direct = run([*common, "--output", str(tmp_path / "direct")])

    assert (on_dask["inputs"], on_dask["rows"], on_dask["errors"]) == (16, 12, 4)
    assert on_dask["inputs"] == on_dask["rows"] + on_dask["errors"]
    assert len(on_dask["run"]["workers"]) == 2, on_dask["run"]["workers"]
    assert on_dask["run"]["chunks"] == 6
    assert (direct["rows"], direct["errors"]) == (on_dask["rows"], on_dask["errors"])

    def rows(name):
        t = table.read_table(str(tmp_path / name)).sort_by("image_id")
        return t.drop_columns(["feature"]).to_pylist(), table.features_matrix(t)

    dask_rows, dask_vectors = rows("dask")
    direct_rows, direct_vectors = rows("direct")
    assert dask_rows == direct_rows
    assert abs(dask_vectors - direct_vectors).max() < 1e-5
    errors = table.read_table(str(tmp_path / "dask"), prefix=table.ERRORS)
    assert errors.num_rows == 4
