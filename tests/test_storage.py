"""transforms/storage.py: local and gs:// names, and writes readers never see half done (gs:// for
real is in test_gcs.py)."""

from __future__ import annotations

import os

import pytest

from transforms import storage


@pytest.mark.parametrize(
    "uri, local",
    [
        ("/data/x.jpg", True),
        ("data/x.jpg", True),
        ("file:///data/x.jpg", True),
        ("gs://b/x", False),
    ],
)
def test_is_local(uri, local):
    assert storage.is_local(uri) is local


def test_join_uses_the_paths_own_separator():
    assert storage.join("gs://b/t", "_errors", "e.parquet") == "gs://b/t/_errors/e.parquet"
    assert storage.join("/t", "_errors") == os.path.join("/t", "_errors")


@pytest.mark.parametrize(
    "uri, ext",
    [
        ("gs://b/x.JPG", ".jpg"),
        ("/a/b.tar.gz", ".gz"),
        ("/a.d/file", ""),
        ("/a/folder.d/", ".d"),
        ("gs://b/", ""),
    ],
)
def test_extension_is_the_last_parts_in_lower_case(uri, ext):
    assert storage.extension(uri) == ext


def test_write_atomically_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    storage.write_atomically(str(target), lambda f: f.write(b"one"))
    storage.write_atomically(str(target), lambda f: f.write(b"two"))
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["f.bin"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def half(f):
        f.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write_atomically(str(target), half)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_local_files_are_used_in_place(tmp_path):
    path = tmp_path / "w.h5"
    path.write_bytes(b"w")
    assert storage.local_copy(str(path), str(tmp_path / "cache")) == str(path)
    assert storage.local_copy(f"file://{path}", str(tmp_path / "cache")) == str(path)
    assert not (tmp_path / "cache").exists()


def test_listing_and_reading_local_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"12345")
    (tmp_path / "y.jpg").write_bytes(b"1")
    found = sorted((f.uri, f.size) for f in storage.find_files(str(tmp_path)))
    assert found == [(str(tmp_path / "a" / "x.png"), 5), (str(tmp_path / "y.jpg"), 1)]
    assert [f.uri for f in storage.glob_files(str(tmp_path / "*.jpg"))] == [str(tmp_path / "y.jpg")]
    assert storage.read_bytes(str(tmp_path / "a" / "x.png")) == b"12345"
    assert storage.is_dir(str(tmp_path / "a")) and not storage.is_dir(str(tmp_path / "y.jpg"))
    assert storage.exists(str(tmp_path / "y.jpg")) and not storage.exists(str(tmp_path / "z"))


def test_stalled_reads_are_bounded_and_counted_back(monkeypatch):
    """A storage that stops answering: each read is abandoned after its timeout, and once
    MAX_STALLED_READS are stalled a read fails at once (no more threads); they are counted back
    as they return."""
    import threading
    import time

    release = threading.Event()
    monkeypatch.setattr(storage, "MAX_STALLED_READS", 3)
    monkeypatch.setattr(storage, "_read_whole", lambda uri: release.wait() and b"late")
    for _ in range(3):
        with pytest.raises(storage.ReadTimeout, match="within 0.05 s"):
            storage.read_bytes("/stalled", timeout=0.05)
    assert storage.stalled_reads() == 3
    started = time.monotonic()
    with pytest.raises(storage.ReadTimeout, match="3 earlier reads .* still stalled"):
        storage.read_bytes("/stalled", timeout=5)
    assert time.monotonic() - started < 1  # at once, not after the timeout
    release.set()
    deadline = time.monotonic() + 5
    while storage.stalled_reads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert storage.stalled_reads() == 0
    assert storage.read_bytes("/stalled", timeout=1) == b"late"
