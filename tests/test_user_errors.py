"""A user or environment error ends a job with one line and exit 2, naming the file (issue: "no
traceback for a user or environment error"): an output that cannot be written, a lease lost to
another run, a damaged shard or summary, an unreachable bucket."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline import cli, extract, neighbors, report
from transforms import lease as leases
from transforms import table

SMALL = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--image-size", "32"]


def _one_line(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture
def small_table(image_tree, tmp_path):
    out = tmp_path / "table"
    extract.run(["--input", str(image_tree), "--output", str(out), *SMALL])
    return out


def test_an_output_under_a_file_is_one_line(image_tree, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = _one_line(
        extract.main, ["--input", str(image_tree), "--output", str(blocker / "out"), *SMALL], capsys
    )
    assert str(blocker) in line


def test_an_output_that_cannot_be_written_mid_run_is_one_line(
    image_tree, tmp_path, capsys, monkeypatch
):
    """A read-only bucket or disk (simulated: tests run as root, which ignores file modes)."""

    def read_only(uri, table_):
        raise PermissionError(13, "Permission denied", uri)

    monkeypatch.setattr(table, "write_parquet", read_only)
    out = tmp_path / "out"
    line = _one_line(
        extract.main, ["--input", str(image_tree), "--output", str(out), *SMALL], capsys
    )
    assert "Permission denied" in line and str(out) in line
    assert not (out / leases.LEASE_FILE).exists()


def test_a_lease_lost_to_another_run_is_one_line(image_tree, tmp_path, capsys, monkeypatch):
    def taken(self):
        raise leases.LeaseLost(f"{self.output_dir}: another run (run x on host y) took the lease")

    monkeypatch.setattr(leases.Lease, "check", taken)
    line = _one_line(
        extract.main,
        ["--input", str(image_tree), "--output", str(tmp_path / "out"), *SMALL],
        capsys,
    )
    assert "took the lease" in line


def _damage(shard):
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def test_a_damaged_shard_is_named_by_the_next_run(image_tree, small_table, capsys):
    (shard,) = small_table.glob("features-*.parquet")
    _damage(shard)
    argv = ["--input", str(image_tree), "--output", str(small_table), "--mode", "incremental"]
    line = _one_line(extract.main, [*argv, *SMALL], capsys)
    assert f"{shard} is not a readable Parquet file" in line


def test_a_damaged_shard_is_named_by_the_readers(small_table, tmp_path, capsys):
    (shard,) = small_table.glob("features-*.parquet")
    _damage(shard)
    with pytest.raises(table.CorruptFile, match=str(shard)):
        table.read_table(str(small_table))
    argv = ["--features", str(small_table), "--output", str(tmp_path / "nn")]
    line = _one_line(neighbors.main, argv, capsys)
    assert str(shard) in line


def test_a_damaged_summary_is_named(small_table, tmp_path, capsys):
    summary = small_table / table.SUMMARY_FILE
    summary.write_text('{"inputs": 12, "rows": ')
    with pytest.raises(table.CorruptFile, match=f"{summary} is not valid JSON"):
        table.read_summary(str(small_table))
    line = _one_line(
        report.main, ["--features", str(small_table), "--output", str(tmp_path / "r.html")], capsys
    )
    assert f"{summary} is not valid JSON" in line


def test_a_message_of_several_lines_is_still_one_line(capsys):
    def run(argv):
        raise ValueError("the first line says what\nand the library goes on\nfor lines")

    line = _one_line(lambda argv: cli.run_main(run, argv), [], capsys)
    assert line == "error: the first line says what (more with -v)"


@pytest.mark.slow
def test_an_unreachable_bucket_is_one_line(tmp_path):
    """Storage that does not answer (a bucket through an endpoint nobody serves): gcsfs retries,
    then the job stops with one line, in a real process."""
    env = {
        **os.environ,
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9",  # the discard port: nothing listens
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    argv = ["--input", "gs://bucket/images", "--output", str(tmp_path / "out"), *SMALL]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.extract", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "127.0.0.1:9" in lines[-1]
    assert "Traceback" not in done.stderr
