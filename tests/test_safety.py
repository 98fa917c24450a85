"""The front door: nothing lost. An overwrite that fails keeps the old table, a stopped run gives
its table back, a strange file never hangs a run, and an empty listing is refused."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import write_image_tree
from fakes import SMALL_REAL, MeanColorHandler, interrupt_real_job, run_extract
from fsspec.implementations.local import LocalFileSystem
from test_gcs import BUCKET, gcs_emulator  # noqa: F401 (a fixture)

from pipeline import cli
from pipeline import extract as extract_job
from pipeline.config import parse_args
from transforms import history, plan_files, storage, table
from transforms import lease as leases
from transforms import plan as plans


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes), but the run history (``_RUNS/``,
    which gains a record for every run that was planned: test_history)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != history.RUNS_DIR
    }


class BrokenModelHandler(MeanColorHandler):
    """A model that cannot load (bad weights, a crash in the worker)."""

    def load_model(self):
        raise RuntimeError("the weights file is damaged")


# --- 1. --overwrite is safe ---


def test_a_failed_overwrite_leaves_the_old_table_byte_identical(tmp_path):
    images = tmp_path / "images"
    write_image_tree(images, per_class=2)
    out = tmp_path / "t"
    run_extract(str(images), out, chunk_size=3)
    before = snapshot(out)
    assert any(name.startswith("features-") for name in before)

    with pytest.raises(Exception, match="damaged"):
        run_extract(str(images), out, handler=BrokenModelHandler(), overwrite=True, chunk_size=3)
    assert snapshot(out) == before  # every file, the same bytes, nothing added
    assert table.read_table(str(out)).num_rows == 8


def test_a_successful_overwrite_replaces_every_old_shard(tmp_path):
    images = tmp_path / "images"
    write_image_tree(images, per_class=2)
    out = tmp_path / "t"
    first = run_extract(str(images), out, chunk_size=3)
    old_files = set(first["feature_files"]) | set(first["error_files"])

    second = run_extract(str(images), out, overwrite=True, chunk_size=5)
    new_id = second["run"]["run_id"]
    shards = table.shard_files(str(out)) + table.shard_files(str(out), table.ERRORS)
    assert shards and not old_files & set(shards)
    assert all(f"-{new_id}-" in os.path.basename(f) for f in shards)
    assert sorted(second["feature_files"]) == table.shard_files(str(out))
    assert table.read_table(str(out)).num_rows == 8
    assert table.read_summary(str(out))["run"]["run_id"] == new_id
    leftovers = {p.name for p in out.iterdir()} - {os.path.basename(f) for f in shards}
    assert leftovers == {table.SUMMARY_FILE, table.ERRORS_DIR, history.RUNS_DIR}


def _bucket_snapshot(uri: str) -> dict[str, bytes]:
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache()
    return {
        p[len(path) :]: fs.cat_file(p)
        for p in sorted(fs.find(path))
        if not p[len(path) :].startswith(f"/{history.RUNS_DIR}/")
    }


def test_an_overwrite_on_a_bucket_is_safe_too(gcs_emulator, tmp_path):  # noqa: F811
    local = tmp_path / "images"
    write_image_tree(local, per_class=1)
    fs, _ = storage.filesystem(gcs_emulator)
    fs.put(str(local), f"{BUCKET}/safe-images", recursive=True)
    images, out = f"{gcs_emulator}/safe-images", f"{gcs_emulator}/safe-table"
    first = run_extract(images, out, chunk_size=2)
    before = _bucket_snapshot(out)
    assert any(name.startswith("/features-") for name in before)

    with pytest.raises(Exception, match="damaged"):
        run_extract(images, out, handler=BrokenModelHandler(), overwrite=True, chunk_size=2)
    assert _bucket_snapshot(out) == before
    assert [r["status"] for r in history.read_records(out)] == [history.FAILED, history.SUCCEEDED]

    second = run_extract(images, out, overwrite=True, chunk_size=3)
    shards = table.shard_files(out) + table.shard_files(out, table.ERRORS)
    assert shards and not set(first["feature_files"]) & set(shards)
    assert all(f"-{second['run']['run_id']}-" in f for f in shards)
    assert table.read_table(out).num_rows == 4
    after = _bucket_snapshot(out)
    assert not [name for name in after if name.startswith(("/_staging", "/_plans", "/_LEASE"))]


# --- 2. SIGTERM is Ctrl-C ---


@pytest.mark.slow
def test_sigterm_stops_a_run_and_gives_its_table_back(tmp_path):
    argv, job, err = interrupt_real_job(tmp_path, signum=signal.SIGTERM)
    out = tmp_path / "t"
    assert job.returncode == 143
    assert err.strip().splitlines()[-1] == "stopped by SIGTERM"
    assert not (out / leases.LEASE_FILE).exists()
    assert not (out / plans.PLANS_DIR).exists()

    # The table is free at once: the next run neither waits nor needs --break-lease.
    summary = extract_job.run([*argv, "--mode", "incremental"])
    assert (summary["inputs"], summary["rows"], summary["errors"]) == (120, 120, 0)


@pytest.fixture
def own_signals():
    """The test sets the stop signals' handlers itself; the caller's are put back after."""
    kept = {signum: signal.getsignal(signum) for signum in (*cli.STOP_SIGNALS, signal.SIGINT)}
    yield
    for signum, handler in kept.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize(
    ("signum", "status", "line"),
    [
        (signal.SIGTERM, 143, "stopped by SIGTERM"),
        (signal.SIGHUP, 129, "stopped by SIGHUP"),
        (signal.SIGINT, 130, "interrupted"),
    ],
)
def test_a_stop_signal_is_one_line_and_its_conventional_status(
    signum, status, line, capsys, own_signals
):
    # As in a terminal: a suite run under nohup inherits SIGHUP ignored (see the test below).
    signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    cleaned = []

    def job(argv):
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the signal arrives here
        finally:
            cleaned.append(True)  # clean-up (the lease, the plan) runs as for Ctrl-C

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        cli.run_main(job, [])
    assert stopped.value.code == status and cleaned == [True]
    assert capsys.readouterr().err == line + "\n"
    assert signal.getsignal(signal.SIGTERM) == before  # handlers are put back


def test_a_stop_signal_ignored_by_the_caller_stays_ignored(own_signals):
    """Under ``nohup`` (SIGHUP ignored) a closed terminal must not stop the job."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def job(argv):
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.2)  # a signal that stopped the job would arrive here
        return "finished"

    assert cli.run_main(job, []) == "finished"
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _hold(out: pathlib.Path, *, host: str, pid: int, machine: str | None = "here") -> None:
    """A lease on ``out`` recorded as held by ``pid`` on ``host`` (``machine``: this boot and
    pid namespace, another, or not recorded), renewed just now."""
    leases.acquire(str(out), "20261201T000000aaaa")
    record = json.loads((out / leases.LEASE_FILE).read_text())
    record.update(host=host, pid=pid)
    if machine != "here":
        record["machine"] = machine
    (out / leases.LEASE_FILE).write_text(json.dumps(record))


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    out = tmp_path / "t"
    pid = _dead_pid()
    _hold(out, host=socket.gethostname(), pid=pid)
    with caplog.at_level(logging.WARNING, logger="transforms.lease"):
        lease = leases.acquire(str(out), "20261201T000001bbbb")
    lease.check()
    assert f"(pid {pid}) is no longer running on this host" in caplog.text


@pytest.mark.parametrize(
    "holder",
    [
        "a live process here",
        "a process on another host",
        "another container or boot with this host name",
        "a lease that does not say where it ran",
    ],
)
def test_a_lease_of_a_live_process_or_another_host_is_respected(holder, tmp_path):
    out = tmp_path / "t"
    here = socket.gethostname()
    if holder == "a live process here":
        _hold(out, host=here, pid=os.getpid())
    elif holder == "a process on another host":
        _hold(out, host=here + "-elsewhere", pid=_dead_pid())
    elif holder == "a lease that does not say where it ran":
        _hold(out, host=here, pid=_dead_pid(), machine=None)
    else:  # a dead pid here says nothing about a process in another pid namespace
        _hold(out, host=here, pid=_dead_pid(), machine="another-boot:4026531836")
    with pytest.raises(leases.LeaseHeld, match="20261201T000000aaaa"):
        leases.acquire(str(out), "20261201T000001bbbb")


def test_a_dead_launcher_whose_workers_still_beat_is_respected(tmp_path):
    out = tmp_path / "t"
    _hold(out, host=socket.gethostname(), pid=_dead_pid())
    beat = {"time": time.time(), "host": "worker-7", "pid": 12}  # a worker on another machine
    (out / "_LEASE.20261201T000000aaaa.heartbeat").write_text(json.dumps(beat))
    with pytest.raises(leases.LeaseHeld):
        leases.acquire(str(out), "20261201T000001bbbb")


# --- 3. Nothing hangs on a strange file ---


def _with_fifo(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    images = tmp_path / "images"
    write_image_tree(images, per_class=1)  # 4 images
    fifo = images / "train" / "cats" / "pipe.jpg"
    os.mkfifo(fifo)  # opening it blocks until someone writes: it must never be read
    return images, fifo


@pytest.mark.parametrize("how", ["folder", "glob"])
def test_a_named_pipe_in_a_folder_or_glob_is_skipped_and_counted(how, tmp_path):
    images, fifo = _with_fifo(tmp_path)
    source = str(images) if how == "folder" else str(images / "**" / "*.*")
    summary = run_extract(source, tmp_path / "t", read_timeout_s=2)
    assert (summary["inputs"], summary["rows"], summary["errors"]) == (4, 4, 0)
    assert summary["skipped"] == 1 and summary["skipped_examples"] == [str(fifo)]
    assert summary["skipped_reasons"] == {"not a regular file": 1}


def test_a_manifest_naming_a_named_pipe_gives_it_an_error_row(tmp_path):
    images, fifo = _with_fifo(tmp_path)
    others = sorted(str(p) for p in images.rglob("*.*") if p != fifo)
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join([str(fifo), *others]) + "\n")
    summary = run_extract(str(manifest), tmp_path / "t", read_timeout_s=2)
    assert (summary["inputs"], summary["rows"], summary["errors"]) == (5, 4, 1)
    errors = table.read_table(str(tmp_path / "t"), prefix=table.ERRORS).to_pylist()
    assert [(e["uri"], e["stage"]) for e in errors] == [(str(fifo), "read")]
    assert "not a regular file" in errors[0]["reason"]


def test_a_read_that_never_ends_becomes_an_error_row_after_the_read_timeout(tmp_path, monkeypatch):
    images = tmp_path / "images"
    write_image_tree(images, per_class=1)
    stuck = str(images / "train" / "dogs" / "0.png")
    release = threading.Event()
    cat_file = LocalFileSystem.cat_file

    def stalling(self, path, *args, **kwargs):
        if path == stuck:  # a stalled network mount, a bucket that never answers
            release.wait(60)
        return cat_file(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", stalling)
    try:
        started = time.monotonic()
        summary = run_extract(str(images), tmp_path / "t", read_timeout_s=1)
        assert time.monotonic() - started < 50
    finally:
        release.set()
    assert (summary["inputs"], summary["rows"], summary["errors"]) == (4, 3, 1)
    (error,) = table.read_table(str(tmp_path / "t"), prefix=table.ERRORS).to_pylist()
    assert (error["uri"], error["stage"]) == (stuck, "read")
    assert "1 s" in error["reason"] and "--read-timeout" in error["reason"]


def test_read_timeout_is_a_flag_with_its_default_in_help(capsys):
    with pytest.raises(SystemExit):
        extract_job.run(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    described = help_text[help_text.index("--read-timeout SECONDS an image") :]
    assert "(default: 60.0)" in described[: described.index(" --", 20)]
    config, _ = parse_args(["--input", "x", "--output", "y"])
    assert config.read_timeout_s == 60
    config, _ = parse_args(["--input", "x", "--output", "y", "--read-timeout", "5"])
    assert config.read_timeout_s == 5


# --- 4. An empty listing is an error ---


def _nothing_to_embed(tmp_path: pathlib.Path) -> pathlib.Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("no images here")
    os.mkfifo(empty / "pipe.jpg")
    return empty


def test_an_empty_listing_is_one_line_and_exit_2_naming_the_skipped_files(tmp_path, capsys):
    empty = _nothing_to_embed(tmp_path)
    out = tmp_path / "t"
    argv = ["--input", str(empty), "--output", str(out), *SMALL_REAL]
    with pytest.raises(SystemExit) as refused:
        extract_job.main(argv)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: no images listed") and str(empty) in err
    assert "not a regular file: 1" in err and "not an image: 1" in err and "--allow-empty" in err
    assert not out.exists()  # a refused run on a new output leaves no folder behind


def test_an_empty_query_names_neighbors_own_flag(tmp_path, capsys):
    from pipeline import neighbors as neighbors_job

    images = tmp_path / "images"
    write_image_tree(images, per_class=1, size=(32, 32))
    features = tmp_path / "features"
    extract_job.main(["--input", str(images), "--output", str(features), *SMALL_REAL])
    capsys.readouterr()
    empty = _nothing_to_embed(tmp_path)
    argv = ["--features", str(features), "--output", str(tmp_path / "nn"), "--k", "2"]
    argv += ["--query", str(empty)]
    with pytest.raises(SystemExit) as refused:
        neighbors_job.main(argv)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "no images listed from --query" in err and "check --query" in err
    assert "--allow-empty" not in err and "--input" not in err


def test_stopped_pickles_and_names_its_signal():
    import pickle

    stopped = pickle.loads(pickle.dumps(cli.Stopped(signal.SIGTERM)))
    assert (stopped.signum, str(stopped)) == (signal.SIGTERM, "SIGTERM")


def test_allow_empty_writes_an_empty_table(tmp_path):
    empty = _nothing_to_embed(tmp_path)
    summary = run_extract(str(empty), tmp_path / "t", allow_empty=True)
    assert (summary["inputs"], summary["rows"], summary["errors"], summary["skipped"]) == (
        0,
        0,
        0,
        2,
    )
    assert table.read_table(str(tmp_path / "t")).num_rows == 0


def test_an_empty_listing_never_prunes_a_table(tmp_path):
    images = tmp_path / "images"
    write_image_tree(images, per_class=1)
    out = tmp_path / "t"
    run_extract(str(images), out, mode="incremental")
    before = snapshot(out)
    empty = _nothing_to_embed(tmp_path)  # a bucket listed empty by mistake
    with pytest.raises(ValueError, match="--prune .*--allow-empty"):
        run_extract(str(empty), out, mode="incremental", prune=True)
    assert snapshot(out) == before

    # Said explicitly, the table follows its (empty) inputs.
    summary = run_extract(str(empty), out, mode="incremental", prune=True, allow_empty=True)
    assert summary["run"]["unlisted_rows_removed"] == 4
    assert table.read_table(str(out)).num_rows == 0


def _overwritten(tmp_path):
    """A table of 8 images (3 shards), its snapshot, and the images."""
    images = tmp_path / "images"
    write_image_tree(images, per_class=2)
    out = tmp_path / "t"
    run_extract(str(images), out, chunk_size=3)
    return images, out, snapshot(out)


def test_an_overwrite_that_fails_after_staging_chunks_leaves_the_old_table(tmp_path, monkeypatch):
    images, out, before = _overwritten(tmp_path)
    written = []
    original = table.write_parquet

    def full_disk_after_one_shard(uri, rows):
        if written:
            raise OSError(28, "No space left on device")
        written.append(uri)
        return original(uri, rows)

    monkeypatch.setattr(table, "write_parquet", full_disk_after_one_shard)
    with pytest.raises(Exception, match="No space left"):
        run_extract(str(images), out, overwrite=True, chunk_size=3)
    assert plans.STAGING_DIR in written[0]  # a chunk was committed to the staging folder
    assert snapshot(out) == before  # and is gone with it; the old table as it was


def _moves_into_the_table(monkeypatch, *, allowed: int):
    """Cuts ``--overwrite``'s move of staged shards into the table after ``allowed`` files."""
    original, moved = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if plans.STAGING_DIR in str(src) and plans.STAGING_DIR not in str(dst):
            if len(moved) == allowed:
                raise OSError(5, "Input/output error")
            moved.append(dst)
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(storage.os, "replace", replace)
    return moved


def test_a_swap_cut_short_before_the_summary_is_rolled_back(tmp_path, monkeypatch):
    images, out, before = _overwritten(tmp_path)
    moved = _moves_into_the_table(monkeypatch, allowed=2)
    with pytest.raises(Exception, match="Input/output error"):
        run_extract(str(images), out, overwrite=True, chunk_size=2)
    assert len(moved) == 2  # two new shards were in the table beside the old ones
    assert snapshot(out) == before


def test_a_swap_cut_short_after_the_summary_is_completed(tmp_path, monkeypatch):
    images, out, _ = _overwritten(tmp_path)
    original, calls = plan_files._remove, []

    def fails_once(*args):
        calls.append(args)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return original(*args)

    monkeypatch.setattr(plan_files, "_remove", fails_once)  # removing the old shards
    with pytest.raises(Exception, match="Input/output error"):
        run_extract(str(images), out, overwrite=True, chunk_size=5)
    run_id = table.read_summary(str(out))["run"]["run_id"]
    shards = table.shard_files(str(out)) + table.shard_files(str(out), table.ERRORS)
    assert shards and {table.shard_run(f) for f in shards} == {run_id}
    assert table.read_table(str(out)).num_rows == 8
    assert not (out / plans.STAGING_DIR).exists()


def test_an_overwrite_that_died_mid_swap_is_settled_by_the_next_run(tmp_path, monkeypatch):
    """kill -9 in the middle of the swap: nothing cleaned up. The next run settles it before
    it plans, so it plans against the old table, whole, and not a mix of two."""
    images, out, before = _overwritten(tmp_path)
    _moves_into_the_table(monkeypatch, allowed=2)  # the (empty) error shard, a row shard
    monkeypatch.setattr(plan_files, "discard", lambda run: None)  # the process died
    with pytest.raises(Exception, match="Input/output error"):
        run_extract(str(images), out, overwrite=True, chunk_size=2)
    monkeypatch.undo()
    runs = {table.shard_run(f) for f in table.shard_files(str(out))}
    assert len(runs) == 2  # mixed: the old shards and a new one
    summary = run_extract(str(images), out, mode="incremental", chunk_size=3)
    assert summary["run"]["embedded"] == 0 and summary["rows"] == 8
    assert snapshot(out) == {**before, table.SUMMARY_FILE: snapshot(out)[table.SUMMARY_FILE]}


def test_a_retried_swap_keeps_the_new_table(tmp_path):
    """A runner that runs the last step again after it finished (or the launcher settling a run
    that had finished) changes nothing."""
    images, out, _ = _overwritten(tmp_path)
    second = run_extract(str(images), out, overwrite=True, chunk_size=5)
    new = snapshot(out)
    run_id = second["run"]["run_id"]
    planned = plans.RunPlan(
        run_id=run_id,
        output_dir=str(out),
        plan_uri=None,
        num_chunks=2,
        chunk_size=5,
        listed=8,
        to_embed=8,
        staging_dir=str(out / plans.STAGING_DIR / run_id),
    )
    files, errors = plan_files.move_staged_in(planned, table.FEATURES)
    assert sorted(files) == sorted(second["feature_files"])
    plan_files.remove_replaced(planned)
    assert plan_files.settle(str(out), run_id) == "completed"
    assert snapshot(out) == new


def test_symbolic_links_are_followed_and_a_dangling_one_is_an_error_row(tmp_path):
    """A dataset of links (to photos elsewhere, as many are) is its photos; a dangling link is
    an error row that says why, never a skip."""
    photos = tmp_path / "photos"
    write_image_tree(photos, per_class=1)  # 4 images
    links = tmp_path / "links" / "train"
    links.mkdir(parents=True)
    for i, photo in enumerate(sorted(photos.rglob("*.png"))):
        (links / f"{i}.png").symlink_to(photo)
    (links / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "links" / "more").symlink_to(photos, target_is_directory=True)
    summary = run_extract(str(tmp_path / "links"), tmp_path / "t")
    assert (summary["rows"], summary["skipped"]) == (4, 1)  # the folder link: counted, not walked
    assert summary["skipped_reasons"] == {"not a regular file": 1}
    assert summary["errors"] == 1 and summary["inputs"] == 5
    errors = table.read_table(str(tmp_path / "t"), prefix=table.ERRORS).to_pylist()
    assert errors[0]["uri"].endswith("gone.png") and errors[0]["stage"] == "read"
    info = storage.file_info(str(links / "0.png"))
    assert (
        info.size == sorted(photos.rglob("*.png"))[0].stat().st_size
    )  # the photo's, not the link's


def test_an_empty_folder_is_named_as_holding_no_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "t"), *SMALL_REAL]
    with pytest.raises(SystemExit):
        extract_job.main(argv)
    err = capsys.readouterr().err
    assert f"no images listed from --input {tmp_path / 'empty'} (no file at all)" in err, err


def test_a_runner_that_returns_without_the_last_step_is_not_a_finished_run(
    image_tree, tmp_path, monkeypatch
):
    """A runner that returns as if done but never ran the pipeline's last step (a Dask client
    that lost its scheduler does): the run fails in one line naming the rerun, the lease is given
    back, its plan removed, its record failed, and the previous run's summary is not taken for
    this run's."""
    from fakes import run_table

    from pipeline import launch, runners

    out = tmp_path / "out"
    run_table(str(image_tree), str(out))
    before = table.read_summary(str(out))
    (image_tree / "extra.png").write_bytes((image_tree / "train" / "cats" / "0.png").read_bytes())
    monkeypatch.setattr(runners, "run_graph", lambda *args, **kwargs: None)
    with pytest.raises(launch.RunIncomplete, match="rerun with --mode incremental"):
        run_table(str(image_tree), str(out), mode="incremental")
    assert table.read_summary(str(out)) == before
    assert not (out / leases.LEASE_FILE).exists()
    assert not list(out.glob("_plans/*"))
    # Oldest first by start time: two runs in one second have run ids that do not sort.
    statuses = [r["status"] for r in reversed(history.read_records(str(out)))]
    assert statuses == ["succeeded", "failed"]
