"""gs:// for real: a local GCS emulator server, images and weights in a bucket, table to a bucket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import write_image_tree

from pipeline.extract import run
from transforms import storage, table

BUCKET = "featurebeam-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs_emulator():
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1"]
        + ["--port", str(port), "--in-memory", "--default-bucket", BUCKET],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {
        k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
    }
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    # gcsfs first probes the bucket type over gRPC, which the emulator does not serve (60 s wait).
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("the GCS emulator did not start")
                time.sleep(0.2)
        import fsspec

        fsspec.filesystem("gs").clear_instance_cache()
        yield f"gs://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_bucket_to_bucket_round_trip(gcs_emulator, tmp_path):
    import keras

    from transforms.models.build import build_model
    from transforms.models.recipe import FeatureRecipe

    local = tmp_path / "images"
    write_image_tree(local, per_class=2)
    (local / "val" / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    fs, _ = storage.filesystem(gcs_emulator)
    fs.put(str(local), f"{BUCKET}/images", recursive=True)

    # Weights travel through gcsfs too: a backbone saved locally, uploaded, then loaded by path.
    spec = FeatureRecipe("mobilenet_v3_small", weights="none", image_size=32)
    weights = tmp_path / "w.weights.h5"
    build_model(spec).save_weights(weights)
    keras.backend.clear_session()
    fs.put(str(weights), f"{BUCKET}/models/w.weights.h5")

    out = f"{gcs_emulator}/tables/run1"
    summary = run(
        ["--input", f"{gcs_emulator}/images", "--output", out]
        + ["--backbone", "mobilenet_v3_small", "--image-size", "32"]
        + ["--weights", f"{gcs_emulator}/models/w.weights.h5", "--cache-dir", str(tmp_path / "c")]
    )
    assert (summary["inputs"], summary["rows"], summary["errors"]) == (9, 8, 1)

    features = table.read_table(out)
    assert features.num_rows == 8
    assert all(u.startswith(f"{gcs_emulator}/images/") for u in features.column("uri").to_pylist())
    assert {(r["label"], r["split"]) for r in features.select(["label", "split"]).to_pylist()} == {
        ("cats", "train"),
        ("dogs", "train"),
        ("cats", "val"),
        ("dogs", "val"),
    }
    meta = table.table_metadata(features.schema)
    assert meta["weights_fingerprint"].startswith("h5-values-sha256:")
    assert np.isfinite(table.features_matrix(features)).all()
    errors = table.read_table(out, prefix=table.ERRORS)
    assert errors.column("uri").to_pylist() == [f"{gcs_emulator}/images/val/cats/broken.jpg"]
    assert table.read_summary(out)["rows"] == 8

    # Incremental on the bucket: a new object is embedded alone, a replaced object (new
    # generation) replaces its row, and the plan file is gone afterwards.
    fs.put(str(local / "train" / "cats" / "0.png"), f"{BUCKET}/images/train/cats/new.png")
    fs.put(str(local / "val" / "dogs" / "0.png"), f"{BUCKET}/images/train/dogs/0.png")
    again = run(
        ["--input", f"{gcs_emulator}/images", "--output", out, "--mode", "incremental"]
        + ["--backbone", "mobilenet_v3_small", "--image-size", "32"]
        + ["--weights", f"{gcs_emulator}/models/w.weights.h5", "--cache-dir", str(tmp_path / "c")]
    )
    assert again["run"]["embedded"] == 2 and again["run"]["stale_rows_removed"] == 1
    assert (again["inputs"], again["rows"], again["errors"]) == (10, 9, 1)
    ids = table.read_table(out).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 9
    assert not fs.exists(f"{BUCKET}/tables/run1/_plans") or not fs.ls(
        f"{BUCKET}/tables/run1/_plans"
    )


def test_lease_on_a_bucket(gcs_emulator, tmp_path):
    """One writer per table on GCS. The emulator ignores ``ifGenerationMatch`` preconditions (it
    accepts any create and any conditional delete), so what is checked here is the protocol's
    reading side: a live lease is refused by name, an expired or broken one is taken over, the
    holder gives it back, and a run whose lease was taken over sees it. The atomic create and the
    generation-matched takeover are what GCS itself enforces (tested on local disk in test_lease)."""
    from fakes import run_table

    from transforms import lease as leases

    local = tmp_path / "images"
    write_image_tree(local, per_class=1)
    fs, _ = storage.filesystem(gcs_emulator)
    fs.put(str(local), f"{BUCKET}/lease-images", recursive=True)
    out = f"{gcs_emulator}/tables/leased"

    held = leases.acquire(out, "20261130T000000live")
    assert leases.read_lease(out)["generation"]  # the takeover deletes exactly this generation
    with pytest.raises(leases.LeaseHeld, match="run 20261130T000000live"):
        run_table(f"{gcs_emulator}/lease-images", out)
    summary = run_table(f"{gcs_emulator}/lease-images", out, break_lease=True)
    assert summary["rows"] == 4
    with pytest.raises(leases.LeaseLost):
        held.check()
    assert leases.read_lease(out) is None  # the run gave it back

    leases.acquire(out, "20261130T000000dead", expiry_s=0.2)
    time.sleep(0.5)
    again = run_table(f"{gcs_emulator}/lease-images", out, mode="incremental")
    assert again["run"]["embedded"] == 0 and leases.read_lease(out) is None
